"""The whole MoE layer in plain PyTorch: the fp32 truth and the INT8 hybrid emulation.

* ``moe_float``: SPEC section 1 in fp32 with the unquantized weights (the accuracy yardstick).
* ``moe_forward``: SPEC sections 3-7 stage by stage with the reference stage functions,
  bit-for-bit the arithmetic every backend must reproduce. Slow, and it syncs the host
  (it loops over experts); it is the oracle and the ``torch`` backend, not a fast path.
"""
from __future__ import annotations

import torch

from reference import gemm as ref_gemm
from reference import permute as ref_permute
from reference import quant as ref_quant
from reference import unpermute as ref_unpermute


def moe_float(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 truth (SPEC 1): y[t] = sum_j w_j * w2[e_j] @ (silu(gate_j) * up_j).

    Returns fp32 [M, K]; pairs whose expert is not local (expert_map == -1) add nothing.
    """
    inter = w2.shape[2]

    def expert_mlp(x, w13_e, w2_e):
        h = x @ w13_e.float().t()
        return (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w2_e.float().t()

    return _sum_over_experts(hidden_states, w13, w2, topk_weights, topk_ids, expert_map,
                             expert_mlp)


def _sum_over_experts(hidden_states, w13, w2, topk_weights, topk_ids, expert_map,
                      expert_mlp) -> torch.Tensor:
    """fp32 y[t] = sum_j w[t, j] * expert_mlp(x[t], w13[e_j], w2[e_j]), one expert at a
    time (pairs dropped by expert_map, or with invalid ids, add nothing)."""
    x = hidden_states.float()
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    local = ref_permute.local_expert_ids(topk_ids, w13.shape[0], expert_map)
    weights = topk_weights.float().reshape(-1)
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    token_of_pair = torch.arange(num_tokens * top_k, device=x.device) // top_k
    for expert in torch.unique(local[local >= 0]).tolist():
        pairs = (local == expert).nonzero().squeeze(1)
        tokens = token_of_pair[pairs]
        y = expert_mlp(x[tokens], w13[expert], w2[expert])
        out.index_add_(0, tokens, y * weights[pairs, None])
    return out


def moe_forward(hidden_states: torch.Tensor,
                w13_q: torch.Tensor, w13_qscale: torch.Tensor, w13_fscale: torch.Tensor,
                w2_q: torch.Tensor, w2_qscale: torch.Tensor, w2_fscale: torch.Tensor,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                block_n: int, block_k: int, q_max: int, super_group_size: int,
                scale_rounding: str, act_block_m: int,
                expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """INT8 hybrid MoE forward, emulated exactly (SPEC 3-7); output in hidden_states.dtype.

    Weights as produced by ``reference.quant.quantize_weight`` (layouts: docs/design.md).
    ``act_block_m`` is the resolved activation scale block (an int; 1 = per-token).
    """
    num_experts = w13_q.shape[0]
    top_k = topk_ids.shape[1]
    quant_opts = dict(act_block_m=act_block_m, block_k=block_k, q_max=q_max,
                      super_group_size=super_group_size, scale_rounding=scale_rounding)
    gemm_opts = dict(act_block_m=act_block_m, block_n=block_n, block_k=block_k,
                     super_group_size=super_group_size, out_dtype=hidden_states.dtype)

    perm = ref_permute.permute(topk_ids, num_experts, expert_map=expert_map,
                               act_block_m=act_block_m)
    # Permutation gather: permuted row r holds token sorted_pair_ids[r] // top_k.
    rows = perm.sorted_pair_ids.long().clamp(min=0) // top_k
    x_perm = hidden_states[rows]
    a_q, a_qscale, a_fscale = ref_quant.quantize_activations(
        x_perm, perm.expert_offsets, perm.scale_row_offsets, **quant_opts)
    h = ref_gemm.grouped_gemm(a_q, a_qscale, a_fscale, w13_q, w13_qscale, w13_fscale,
                              perm.expert_offsets, perm.scale_row_offsets, **gemm_opts)
    act = ref_quant.silu_mul(h)
    a2_q, a2_qscale, a2_fscale = ref_quant.quantize_activations(
        act, perm.expert_offsets, perm.scale_row_offsets, **quant_opts)
    mm2 = ref_gemm.grouped_gemm(a2_q, a2_qscale, a2_fscale, w2_q, w2_qscale, w2_fscale,
                                perm.expert_offsets, perm.scale_row_offsets, **gemm_opts)
    return ref_unpermute.unpermute(mm2, topk_weights, perm.pair_to_row)


def _fake_quant_plain(x: torch.Tensor, block_rows: int, block_k: int) -> torch.Tensor:
    """x quantized to int8 with plain fp32 block scales and dequantized again."""
    scale = ref_quant.block_scales(x, block_rows, block_k)
    scale = ref_quant._element_scales(scale, block_rows, block_k, *x.shape[-2:])
    return ref_quant.quantize_int8(x, scale).float() * scale


def moe_blockwise_float(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                        topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                        block_n: int = 64, block_k: int = 128, act_block_m: int = 128,
                        expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """Plain blockwise INT8 with fp32 block scales (common practice, no Q/F split): the
    accuracy yardstick the hybrid format is measured against (issue: accuracy report).

    Same blocks as the hybrid path (weights ``block_n x block_k``, activations
    ``act_block_m`` rows of one expert's segment x ``block_k``); products and sums in
    fp32. Returns fp32 [M, K].
    """
    def expert_mlp(x, w13_e, w2_e):
        a = _fake_quant_plain(x, act_block_m, block_k)
        h = a @ _fake_quant_plain(w13_e.float(), block_n, block_k).t()
        a2 = _fake_quant_plain(ref_quant.silu_mul(h), act_block_m, block_k)
        return a2 @ _fake_quant_plain(w2_e.float(), block_n, block_k).t()

    return _sum_over_experts(hidden_states, w13, w2, topk_weights, topk_ids, expert_map,
                             expert_mlp)
