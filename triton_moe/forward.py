"""The Triton pipeline, top to bottom (SPEC 3-7).

    permute -> gather+quantize -> GEMM1 -> SiLU*up+quantize -> GEMM2 -> un-permute

A few tokens with per-token scales take ``triton_moe.decode`` instead: the same
arithmetic without the permutation (GEMM1+SiLU per pair, then GEMM2+combine per token).

With per-token activation scales (``act_block_m = 1``) the first quantization runs per
token and stores each result at the token's top_k rows (``quant_per_token``).

Every buffer is sized from M, top_k and E, and no stage reads a device value back to the
host, so the whole forward can be captured in a CUDA graph. ``gemm`` is the only piece a
backend swaps (``triton_moe.gemm.grouped_gemm`` or ``cutlass_backend.grouped_gemm``);
both take the signature documented in docs/design.md.
"""
from __future__ import annotations

from typing import Callable

import torch

from triton_moe.decode import decode_fits, moe_forward_decode
from triton_moe.gemm import grouped_gemm as triton_grouped_gemm
from triton_moe.permute import permute
from triton_moe.quant import permute_quantize, silu_mul_quantize
from triton_moe.quant_per_token import quantize_scatter
from triton_moe.unpermute import unpermute


def _no_callback(_stage: str) -> None:
    return None


def moe_forward_triton(hidden_states: torch.Tensor, weights, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor, *, act_block_m: int,
                       expert_map: torch.Tensor | None = None,
                       gemm: Callable | None = None,
                       stage_callback: Callable[[str], None] | None = None,
                       decode: bool | None = None) -> torch.Tensor:
    """Run the forward on validated inputs (see ``triton_moe.api.moe_forward``).

    ``topk_ids`` int32 [M, top_k]; ``act_block_m`` already resolved to an int.
    ``decode``: take the small-batch path (``triton_moe.decode``); default: when it
    applies (per-token scales, Triton's GEMM, ``decode_fits``). Both paths give the same
    results.
    """
    if gemm is None:
        gemm = triton_grouped_gemm
    stage = stage_callback or _no_callback
    cfg = weights.config
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0:
        return hidden_states.new_empty(hidden_states.shape)
    if decode is None:
        decode = (act_block_m == 1 and gemm is triton_grouped_gemm
                  and decode_fits(num_tokens * top_k, weights.num_experts,
                                  weights.w13_q[0].numel() + weights.w2_q[0].numel()))
    if decode:
        if act_block_m != 1:
            raise ValueError(f"the decode path needs per-token activation scales "
                             f"(act_block_m=1), got act_block_m={act_block_m}")
        stage("decode_gate_up")
        out = moe_forward_decode(hidden_states, weights, topk_weights, topk_ids,
                                 expert_map=expert_map, stage_callback=stage)
        stage("end")
        return out
    scale_opts = dict(block_k=cfg.block_k, q_max=cfg.q_max,
                      super_group_size=cfg.super_group_size,
                      scale_rounding=cfg.scale_rounding)
    quant_opts = dict(scale_opts, act_block_m=act_block_m)
    gemm_opts = dict(act_block_m=act_block_m, block_n=cfg.block_n, block_k=cfg.block_k,
                     super_group_size=cfg.super_group_size, out_dtype=hidden_states.dtype)

    stage("permute_quantize")
    perm = permute(topk_ids, weights.num_experts, expert_map=expert_map,
                   act_block_m=act_block_m)
    if act_block_m == 1:
        # Per-token scales: each token is quantized once and stored at its top_k rows.
        a_q, a_qscale, a_fscale = quantize_scatter(
            hidden_states, perm.pair_to_row, perm.expert_offsets, top_k=top_k, **scale_opts)
    else:
        a_q, a_qscale, a_fscale = permute_quantize(
            hidden_states, perm.sorted_pair_ids, perm.expert_offsets,
            perm.scale_row_offsets, top_k=top_k, **quant_opts)

    stage("gemm1")
    h = gemm(a_q, a_qscale, a_fscale, weights.w13_q, weights.w13_qscale,
             weights.w13_fscale, perm.expert_offsets, perm.scale_row_offsets, **gemm_opts)

    stage("silu_quantize")
    a2_q, a2_qscale, a2_fscale = silu_mul_quantize(
        h, perm.expert_offsets, perm.scale_row_offsets, **quant_opts)

    stage("gemm2")
    mm2 = gemm(a2_q, a2_qscale, a2_fscale, weights.w2_q, weights.w2_qscale,
               weights.w2_fscale, perm.expert_offsets, perm.scale_row_offsets, **gemm_opts)

    stage("unpermute")
    out = unpermute(mm2, topk_weights, perm.pair_to_row)
    stage("end")
    return out
