"""Baselines the INT8 backends are compared with, on the same inputs.

- `grouped_mm_moe`: an unquantized MoE in the activation dtype (bf16 by default) built on
  `torch._grouped_mm`: argsort the (token, expert) pairs by expert, gather the token rows,
  one grouped GEMM with per-expert row offsets for w13, SiLU(gate) * up, one grouped GEMM
  for w2, scatter-add back to the tokens. No host sync, so it can be captured in a CUDA
  graph. Where `torch._grouped_mm` is missing or refuses the dtype/device, the two GEMMs
  run as a per-expert loop (which reads the offsets back to the host, so no graph).
- vLLM / SGLang fused MoE (unquantized, activation dtype) when importable; neither is a
  dependency.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def _grouped_gemms(x_perm, w13, w2, expert_ends, route_weight, use_grouped_mm):
    """h = x_perm @ w13[e]^T per expert segment; a = silu(gate) * up * route_weight;
    return a @ w2[e]^T per segment. `expert_ends` int32 [E]: end row of each segment."""
    inter = w2.shape[2]
    if use_grouped_mm:
        # w13 [E, 2N, K] viewed as [E, K, 2N] column-major: _grouped_mm takes either major
        h = torch._grouped_mm(x_perm, w13.transpose(1, 2), offs=expert_ends)
    else:
        ends = expert_ends.tolist()  # host sync: the fallback cannot be graph-captured
        h = x_perm.new_empty(x_perm.shape[0], 2 * inter)
        start = 0
        for expert, end in enumerate(ends):
            if end > start:
                torch.mm(x_perm[start:end], w13[expert].t(), out=h[start:end])
            start = end
    # plain activation-dtype elementwise ops, as a PyTorch model runs them; the routing
    # weight is applied to the [P, N] activation rather than the [P, K] output (w2 is
    # linear and N <= K in the presets), so the scatter-add below only sums
    act = F.silu(h[:, :inter]) * h[:, inter:]
    act.mul_(route_weight[:, None].to(act.dtype))
    if use_grouped_mm:
        return torch._grouped_mm(act, w2.transpose(1, 2), offs=expert_ends)
    out = x_perm.new_empty(x_perm.shape[0], w2.shape[1])
    start = 0
    for expert, end in enumerate(ends):
        if end > start:
            torch.mm(act[start:end], w2[expert].t(), out=out[start:end])
        start = end
    return out


def grouped_mm_moe(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                   use_grouped_mm: bool = True) -> torch.Tensor:
    """Unquantized MoE forward in the dtype of `hidden_states` (SPEC 1, no quantization).

    hidden_states [M, K], w13 [E, 2N, K], w2 [E, K, N] (same dtype), topk_weights [M, top_k]
    (any float), topk_ids [M, top_k] (int). Returns [M, K] in the dtype of hidden_states.
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    flat_ids = topk_ids.reshape(-1)
    # stable: pairs of one expert stay in ascending pair order (SPEC 3)
    order = torch.argsort(flat_ids, stable=True)
    token_of_row = torch.div(order, top_k, rounding_mode="floor")
    # segment ends by binary search on the sorted ids: no bincount, whose output size
    # would need a host sync
    experts = torch.arange(num_experts, device=flat_ids.device, dtype=flat_ids.dtype)
    expert_ends = torch.searchsorted(flat_ids[order].contiguous(), experts,
                                     right=True).to(torch.int32)
    x_perm = hidden_states.index_select(0, token_of_row)
    route_weight = topk_weights.reshape(-1).index_select(0, order)
    out_rows = _grouped_gemms(x_perm, w13, w2, expert_ends, route_weight, use_grouped_mm)
    out = torch.zeros_like(hidden_states)
    # weighted rows are summed back in the activation dtype, as torchtitan does
    return out.index_add_(0, token_of_row, out_rows)


def probe_grouped_mm(device: torch.device | str, dtype: torch.dtype) -> Optional[str]:
    """None if torch._grouped_mm runs here for `dtype` (checked on a small problem with an
    empty group, against a loop), else the reason it cannot be used."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(48, 64, device=device, dtype=dtype, generator=gen)
        w = torch.randn(3, 32, 64, device=device, dtype=dtype, generator=gen)
        ends = torch.tensor([16, 16, 48], device=device, dtype=torch.int32)
        got = torch._grouped_mm(x, w.transpose(1, 2), offs=ends).float()
        want = torch.cat([x[:16].float() @ w[0].float().t(), x[16:].float() @ w[2].float().t()])
        err = (got - want).norm() / want.norm()
        if not bool(err < 2e-2):  # bf16/fp16 rounding of a 64-long dot is far below this
            return f"torch._grouped_mm gave a wrong answer here (rel err {float(err):.2e})"
    except Exception as exc:  # unsupported dtype, device or build
        return f"torch._grouped_mm unusable for {dtype} on {device}: {_short(exc)}"
    return None


def _short(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------------------
# Peers: fused MoE kernels of serving frameworks, unquantized, same weight layout
# (w1 = w13 [E, 2N, K] with gate rows first, w2 [E, K, N]).

PEER_MODULES = {
    "vllm": "vllm.model_executor.layers.fused_moe",
    "sglang": "sglang.srt.layers.moe.fused_moe_triton.fused_moe",
}


def peer_unavailable(name: str) -> Optional[str]:
    """None if the peer package is installed (its import is tried later), else why not."""
    top = PEER_MODULES[name].split(".")[0]
    if importlib.util.find_spec(top) is None:
        return f"{top} is not installed"
    return None


def make_peer(name: str) -> Callable:
    """Return forward(hidden, w13, w2, topk_weights, topk_ids) -> [M, K] for a peer.

    Raises (ImportError or anything else) when the peer cannot be set up; the caller
    reports the reason."""
    module = importlib.import_module(PEER_MODULES[name])
    fused_experts = module.fused_experts

    def forward(hidden, w13, w2, topk_weights, topk_ids):
        try:
            # the long-standing signature (vLLM, SGLang <= 0.4)
            return fused_experts(hidden, w13, w2, topk_weights, topk_ids)
        except TypeError:
            if name != "sglang":
                raise
        # newer SGLang takes a TopKOutput
        from sglang.srt.layers.moe.topk import StandardTopKOutput
        router_logits = torch.empty(0, device=hidden.device)
        return fused_experts(hidden, w13, w2,
                             StandardTopKOutput(topk_weights, topk_ids, router_logits))

    return forward
