"""Routing oracle (SPEC 2): router logits [M, E] -> (topk_weights fp32, topk_ids int32).

Plain PyTorch, CPU or CUDA. Every selection is a stable descending sort, so each output
row lists experts by descending selection score with ties going to the lower expert index
(and, for grouped routing, tied groups to the lower group index). ``torch.topk`` is not
used: it promises no order between equal values.
"""
from __future__ import annotations

import torch


def _top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest entries of each row, descending, ties -> lower index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :count]


def route_softmax(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True):
    """Softmax routing: the top_k experts by logit (softmax is monotone), weighted by their
    softmax probability, divided by the sum of the selected probabilities when ``renormalize``.

    Returns (topk_weights fp32 [M, top_k], topk_ids int32 [M, top_k]).
    """
    logits = router_logits.float()
    topk_ids = _top_indices(logits, top_k)
    topk_weights = torch.softmax(logits, dim=-1).gather(1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids.to(torch.int32)


def route_sigmoid_grouped(router_logits: torch.Tensor, top_k: int, *,
                          num_expert_group: int | None = None, topk_group: int | None = None,
                          correction_bias: torch.Tensor | None = None,
                          renormalize: bool = True, routed_scaling_factor: float = 1.0):
    """DeepSeek-V3 grouped sigmoid routing (SPEC 2).

    s = sigmoid(logits) in fp32; the selection score is s + correction_bias. The E experts
    form ``num_expert_group`` equal contiguous groups (None = one group); a group scores the
    sum of its two best selection scores (its only one when a group holds one expert); the
    ``topk_group`` best groups are kept (None = all); the top_k best selection scores inside
    the kept groups are chosen. Weights are the unbiased s of the chosen experts, divided by
    their sum when ``renormalize``, then multiplied by ``routed_scaling_factor``.

    Returns (topk_weights fp32 [M, top_k], topk_ids int32 [M, top_k]).
    """
    num_tokens, num_experts = router_logits.shape
    num_groups = 1 if num_expert_group is None else num_expert_group
    kept_groups = num_groups if topk_group is None else topk_group
    group_size = num_experts // num_groups
    assert group_size * num_groups == num_experts, "num_expert_group must divide E"
    assert top_k <= kept_groups * group_size, "top_k exceeds the experts of the kept groups"

    scores = torch.sigmoid(router_logits.float())
    select_scores = scores if correction_bias is None else scores + correction_bias.float()

    # Group score: sum of the group's two best selection scores (SPEC 2).
    grouped = select_scores.view(num_tokens, num_groups, group_size)
    best_in_group = torch.sort(grouped, dim=-1, descending=True).values
    group_scores = best_in_group[..., : min(2, group_size)].sum(dim=-1)

    kept_group_ids = _top_indices(group_scores, kept_groups)
    group_kept = torch.zeros(num_tokens, num_groups, dtype=torch.bool,
                             device=router_logits.device)
    group_kept.scatter_(1, kept_group_ids, True)
    expert_kept = group_kept.repeat_interleave(group_size, dim=1)

    masked_scores = select_scores.masked_fill(~expert_kept, float("-inf"))
    topk_ids = _top_indices(masked_scores, top_k)
    topk_weights = scores.gather(1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    topk_weights = topk_weights * routed_scaling_factor
    return topk_weights, topk_ids.to(torch.int32)


def route(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax",
          renormalize: bool = True, num_expert_group: int | None = None,
          topk_group: int | None = None, correction_bias: torch.Tensor | None = None,
          routed_scaling_factor: float = 1.0):
    """Dispatch to :func:`route_softmax` or :func:`route_sigmoid_grouped` by ``scoring``."""
    if scoring == "softmax":
        return route_softmax(router_logits, top_k, renormalize=renormalize)
    if scoring == "sigmoid":
        return route_sigmoid_grouped(
            router_logits, top_k, num_expert_group=num_expert_group, topk_group=topk_group,
            correction_bias=correction_bias, renormalize=renormalize,
            routed_scaling_factor=routed_scaling_factor)
    raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
