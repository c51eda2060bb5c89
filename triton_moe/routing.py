"""Routing kernels (SPEC 2): router logits [M, E] -> (topk_weights fp32, topk_ids int32).

Two kernels share one selection loop: softmax routing and DeepSeek-V3 grouped sigmoid
routing. Oracle: ``reference/routing.py``; test: ``tests/test_routing.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Routing configs, chosen by BLOCK_E = next_power_of_2(E): (largest BLOCK_E, BLOCK_M,
# num_warps). A program routes BLOCK_M tokens at once; BLOCK_M * BLOCK_E stays <= 2048
# fp32 per live tile (<= 16 registers a thread at 4 warps), so small E packs many tokens
# per program and E = 2048 still fits one token per program.
ROUTING_CONFIGS = (
    (32, 64, 4),
    (128, 16, 4),
    (512, 4, 4),
    (2048, 1, 8),
)
MAX_EXPERTS = ROUTING_CONFIGS[-1][0]


def _routing_config(num_experts: int):
    block_e = triton.next_power_of_2(num_experts)
    for max_block_e, block_m, num_warps in ROUTING_CONFIGS:
        if block_e <= max_block_e:
            return block_e, block_m, num_warps
    raise AssertionError(f"routing supports E <= {MAX_EXPERTS}, got {num_experts}")


@triton.jit
def _select_topk(scores, values, alive, offs_e, TOP_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pick TOP_K lanes of each row of ``scores`` [BLOCK_M, BLOCK_E] among ``alive`` ones.

    Iterative arg-max: each step takes the largest live score, breaks ties by the lowest
    expert index (SPEC 2: deterministic), records the lane and its entry of ``values``,
    then retires the lane. The ``alive`` mask (not a -inf fill) retires lanes, so experts
    whose own score is -inf stay selectable, in index order, like a stable sort.
    Returns (ids int32 [BLOCK_M, BLOCK_K], picked values fp32 [BLOCK_M, BLOCK_K]); columns
    >= TOP_K hold 0.
    """
    offs_k = tl.arange(0, BLOCK_K)
    topk_ids = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
    picked = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for j in range(TOP_K):
        best = tl.max(tl.where(alive, scores, float("-inf")), axis=1)
        is_best = alive & (scores == best[:, None])
        best_id = tl.min(tl.where(is_best, offs_e[None, :], BLOCK_E), axis=1)
        chosen = offs_e[None, :] == best_id[:, None]
        value = tl.sum(tl.where(chosen, values, 0.0), axis=1)
        alive = alive & ~chosen
        topk_ids = tl.where(offs_k[None, :] == j, best_id[:, None], topk_ids)
        picked = tl.where(offs_k[None, :] == j, value[:, None], picked)
    return topk_ids, picked


@triton.jit
def _load_logits_tile(logits_ptr, M, E, stride_lm, stride_le,
                      BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_E] tile of logits in fp32, with its expert lanes,
    64-bit row indices, row mask and the mask of real (not padded) experts."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    row_mask = offs_m < M
    expert_mask = offs_e < E
    rows = offs_m.to(tl.int64)  # M * stride_lm may exceed 2**31
    # Rows past M load zeros (not -inf): their results, never stored, stay finite.
    logits_ptrs = logits_ptr + rows[:, None] * stride_lm + offs_e[None, :] * stride_le
    logits = tl.load(logits_ptrs, mask=row_mask[:, None] & expert_mask[None, :],
                     other=0.0).to(tl.float32)
    alive = tl.broadcast_to(expert_mask[None, :], (BLOCK_M, BLOCK_E))
    return offs_e, rows, row_mask, logits, alive


@triton.jit
def _route_softmax_kernel(
    logits_ptr, topk_weights_ptr, topk_ids_ptr,
    M, E,
    stride_lm, stride_le, stride_om,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Softmax top-k routing for BLOCK_M tokens per program.

    Each program loads a [BLOCK_M, BLOCK_E] tile of logits (E padded to a power of two;
    padded lanes are never alive), selects on the logits themselves (softmax is monotone,
    so the order, ties included, is the order of the logits) and weights each chosen expert
    by exp(g - max g), divided by the row's full sum of exponentials, or by the sum over
    the chosen experts when RENORMALIZE. Divisions are IEEE (div_rn).
    """
    offs_e, rows, row_mask, logits, alive = _load_logits_tile(
        logits_ptr, M, E, stride_lm, stride_le, BLOCK_M, BLOCK_E)

    row_max = tl.max(tl.where(alive, logits, float("-inf")), axis=1)
    exps = tl.where(alive, tl.exp(logits - row_max[:, None]), 0.0)

    topk_ids, topk_exps = _select_topk(logits, exps, alive, offs_e, TOP_K,
                                       BLOCK_M, BLOCK_E, BLOCK_K)
    if RENORMALIZE:
        denom = tl.sum(topk_exps, axis=1)
    else:
        denom = tl.sum(exps, axis=1)
    topk_weights = tl.math.div_rn(topk_exps, tl.broadcast_to(denom[:, None], (BLOCK_M, BLOCK_K)))

    offs_k = tl.arange(0, BLOCK_K)
    out_offs = rows[:, None] * stride_om + offs_k[None, :]
    out_mask = row_mask[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(topk_weights_ptr + out_offs, topk_weights, mask=out_mask)
    tl.store(topk_ids_ptr + out_offs, topk_ids, mask=out_mask)


@triton.jit
def _route_sigmoid_grouped_kernel(
    logits_ptr, correction_bias_ptr, topk_weights_ptr, topk_ids_ptr,
    M, E, routed_scaling_factor,
    stride_lm, stride_le, stride_om,
    TOP_K: tl.constexpr, NUM_GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    TOPK_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """DeepSeek-V3 grouped sigmoid routing (SPEC 2) for BLOCK_M tokens per program.

    s = sigmoid(g) in fp32, computed as 1 / (1 + e) for g >= 0 and e / (1 + e) for g < 0
    with e = exp(-|g|), so s neither overflows nor flushes early for very negative g. The
    selection score is s + correction_bias. Experts form NUM_GROUPS contiguous groups of
    GROUP_SIZE (E = NUM_GROUPS * GROUP_SIZE, any size, not only powers of two); when
    TOPK_GROUP < NUM_GROUPS a loop over groups scores each by the sum of its two best
    selection scores (the best one alone when GROUP_SIZE == 1), then TOPK_GROUP iterative
    arg-max steps (ties to the lower group) keep groups and the experts outside them are
    retired. The shared top-k loop then picks the experts; their weights are the unbiased
    s, divided by their sum when RENORMALIZE (IEEE div_rn), times routed_scaling_factor.
    """
    offs_e, rows, row_mask, logits, alive = _load_logits_tile(
        logits_ptr, M, E, stride_lm, stride_le, BLOCK_M, BLOCK_E)

    exp_neg_abs = tl.exp(-tl.abs(logits))
    one_plus = 1.0 + exp_neg_abs
    ones = tl.full([BLOCK_M, BLOCK_E], 1.0, dtype=tl.float32)
    scores = tl.where(logits >= 0, tl.math.div_rn(ones, one_plus),
                      tl.math.div_rn(exp_neg_abs, one_plus))
    select_scores = scores
    if HAS_BIAS:
        bias = tl.load(correction_bias_ptr + offs_e, mask=offs_e < E, other=0.0)
        select_scores = scores + bias.to(tl.float32)[None, :]

    if TOPK_GROUP < NUM_GROUPS:
        offs_g = tl.arange(0, BLOCK_G)
        group_of_expert = offs_e // GROUP_SIZE  # padded lanes land past NUM_GROUPS
        group_scores = tl.full([BLOCK_M, BLOCK_G], float("-inf"), dtype=tl.float32)
        for g in range(NUM_GROUPS):
            in_group = alive & (group_of_expert[None, :] == g)
            member_scores = tl.where(in_group, select_scores, float("-inf"))
            top1 = tl.max(member_scores, axis=1)
            group_score = top1
            if GROUP_SIZE > 1:
                first = tl.min(tl.where(in_group & (member_scores == top1[:, None]),
                                        offs_e[None, :], BLOCK_E), axis=1)
                runner_up = tl.where(offs_e[None, :] == first[:, None], float("-inf"),
                                     member_scores)
                group_score = top1 + tl.max(runner_up, axis=1)
            group_scores = tl.where(offs_g[None, :] == g, group_score[:, None], group_scores)

        group_alive = tl.broadcast_to((offs_g < NUM_GROUPS)[None, :], (BLOCK_M, BLOCK_G))
        expert_kept = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.int1)
        for _ in range(TOPK_GROUP):
            best = tl.max(tl.where(group_alive, group_scores, float("-inf")), axis=1)
            is_best = group_alive & (group_scores == best[:, None])
            best_group = tl.min(tl.where(is_best, offs_g[None, :], BLOCK_G), axis=1)
            group_alive = group_alive & (offs_g[None, :] != best_group[:, None])
            expert_kept = expert_kept | (group_of_expert[None, :] == best_group[:, None])
        alive = alive & expert_kept

    topk_ids, topk_scores = _select_topk(select_scores, scores, alive, offs_e, TOP_K,
                                         BLOCK_M, BLOCK_E, BLOCK_K)
    topk_weights = topk_scores
    if RENORMALIZE:
        denom = tl.sum(topk_scores, axis=1)
        topk_weights = tl.math.div_rn(topk_scores,
                                      tl.broadcast_to(denom[:, None], (BLOCK_M, BLOCK_K)))
    topk_weights = topk_weights * routed_scaling_factor

    offs_k = tl.arange(0, BLOCK_K)
    out_offs = rows[:, None] * stride_om + offs_k[None, :]
    out_mask = row_mask[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(topk_weights_ptr + out_offs, topk_weights, mask=out_mask)
    tl.store(topk_ids_ptr + out_offs, topk_ids, mask=out_mask)


_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _allocate_outputs(router_logits: torch.Tensor, top_k: int):
    assert router_logits.dim() == 2 and router_logits.dtype in _LOGIT_DTYPES
    num_experts = router_logits.shape[1]
    assert 1 <= top_k <= num_experts, "top_k must be in [1, E]"
    num_tokens = router_logits.shape[0]
    device = router_logits.device
    topk_weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    topk_ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    return topk_weights, topk_ids


def route_softmax(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True):
    """Softmax top-k routing; same contract as ``reference.routing.route_softmax``.

    Returns (topk_weights fp32 [M, top_k], topk_ids int32 [M, top_k]), rows in descending
    logit order, ties to the lower expert index.
    """
    topk_weights, topk_ids = _allocate_outputs(router_logits, top_k)
    num_tokens, num_experts = router_logits.shape
    if num_tokens == 0:
        return topk_weights, topk_ids
    block_e, block_m, num_warps = _routing_config(num_experts)
    grid = (triton.cdiv(num_tokens, block_m),)
    _route_softmax_kernel[grid](
        router_logits, topk_weights, topk_ids,
        num_tokens, num_experts,
        router_logits.stride(0), router_logits.stride(1), topk_ids.stride(0),
        TOP_K=top_k, RENORMALIZE=renormalize,
        BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
        num_warps=num_warps,
    )
    return topk_weights, topk_ids


def route_sigmoid_grouped(router_logits: torch.Tensor, top_k: int, *,
                          num_expert_group: int | None = None, topk_group: int | None = None,
                          correction_bias: torch.Tensor | None = None,
                          renormalize: bool = True, routed_scaling_factor: float = 1.0):
    """DeepSeek-V3 grouped sigmoid routing; same contract as
    ``reference.routing.route_sigmoid_grouped`` (None groups = one group, None topk_group =
    all groups).

    Returns (topk_weights fp32 [M, top_k], topk_ids int32 [M, top_k]), rows in descending
    selection-score order, ties to the lower expert index.
    """
    topk_weights, topk_ids = _allocate_outputs(router_logits, top_k)
    num_tokens, num_experts = router_logits.shape
    num_groups = 1 if num_expert_group is None else num_expert_group
    kept_groups = num_groups if topk_group is None else topk_group
    group_size = num_experts // num_groups
    assert group_size * num_groups == num_experts, "num_expert_group must divide E"
    assert 1 <= kept_groups <= num_groups, "topk_group must be in [1, num_expert_group]"
    assert top_k <= kept_groups * group_size, "top_k exceeds the experts of the kept groups"
    has_bias = correction_bias is not None
    if has_bias:
        assert correction_bias.shape == (num_experts,)
        correction_bias = correction_bias.contiguous()  # read with unit stride
    if num_tokens == 0:
        return topk_weights, topk_ids
    block_e, block_m, num_warps = _routing_config(num_experts)
    grid = (triton.cdiv(num_tokens, block_m),)
    _route_sigmoid_grouped_kernel[grid](
        router_logits, correction_bias if has_bias else router_logits,  # dummy, never read
        topk_weights, topk_ids,
        num_tokens, num_experts, float(routed_scaling_factor),
        router_logits.stride(0), router_logits.stride(1), topk_ids.stride(0),
        TOP_K=top_k, NUM_GROUPS=num_groups, GROUP_SIZE=group_size, TOPK_GROUP=kept_groups,
        HAS_BIAS=has_bias, RENORMALIZE=renormalize,
        BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_G=triton.next_power_of_2(num_groups),
        num_warps=num_warps,
    )
    return topk_weights, topk_ids


def route(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax",
          renormalize: bool = True, num_expert_group: int | None = None,
          topk_group: int | None = None, correction_bias: torch.Tensor | None = None,
          routed_scaling_factor: float = 1.0):
    """Dispatch to :func:`route_softmax` or :func:`route_sigmoid_grouped` by ``scoring``
    (arguments validated by ``triton_moe.api.route``)."""
    if scoring == "softmax":
        return route_softmax(router_logits, top_k, renormalize=renormalize)
    if scoring == "sigmoid":
        return route_sigmoid_grouped(
            router_logits, top_k, num_expert_group=num_expert_group, topk_group=topk_group,
            correction_bias=correction_bias, renormalize=renormalize,
            routed_scaling_factor=routed_scaling_factor)
    raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
