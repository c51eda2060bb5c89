"""Small-batch (decode) forward: the whole MoE in two launches, no permutation.

For a few tokens the general pipeline (``forward.py``: permute, quantize, GEMM1, SiLU,
GEMM2, un-permute) costs six launches, and at one token the launches, not the 25 MB of
expert weights, set its time. With per-token activation scales (``act_block_m = 1``) a
pair's arithmetic does not depend on the other pairs, so the path can be regrouped
without changing a bit of it:

1. ``_gate_up_kernel``, one program per (pair, BLOCK_N columns of h): quantizes its
   token's row (``quant_per_token``'s arithmetic), runs GEMM1's gate and up columns for
   the pair's expert (``gemm.py``'s K-block weighting and super-group flush), rounds them
   to the activation dtype as GEMM1's output is, and writes ``silu(gate) * up`` in fp32
   (``quant._silu_mul``) to a [P, N] scratch.
2. ``_down_kernel``, one program per (token, BLOCK_OUT output columns): for all top_k
   pairs of the token at once, quantizes their h rows, runs GEMM2 for the pair's expert,
   rounds to the activation dtype, and adds ``w_j * mm2_j`` in order of j in fp32
   (``unpermute``'s combine).

Same results as the general path: bit for bit under the interpreter (the tests compare
them); compiled, the fp32 super-group flush is an explicit FMA in both kernels, as the
general GEMM's compiled code contracts it. The int8 GEMV is a ``tl.dot`` with the
token's row padded to 16 (the smallest MMA width): the tensor cores do the integer work
and the kernels stream the weights.

Used by ``forward.moe_forward_triton`` when ``act_block_m == 1``, the GEMM is Triton's,
there are at most ``DECODE_CONFIG["max_pairs"]`` pairs and a row's quantization tile
fits (``decode_fits``); otherwise the general path runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_moe.jit_utils import INTERPRETED
from triton_moe.permute import INVALID_PAIR, _local_expert_ids
from triton_moe.quant import _quantize_exact, _silu_mul
from triton_moe.quant_per_token import _group_scales
from triton_moe.jit_utils import to_output_dtype

# Configs as data. ``max_pairs``: up to this many (token, expert) pairs take this path
# (M * top_k; measured against the general path, bench/results/decode_tuning.md).
# ``max_group_values``: values of one super group of the top_k h rows, which a program of
# ``_down_kernel`` quantizes at once; wider super groups take the general path.
# BLOCK_N / BLOCK_OUT: weight rows per program (more programs to stream the weights).
DECODE_CONFIG = {
    "max_pairs": 16,
    "max_group_values": 8192,
    "BLOCK_N": 32, "gate_up_warps": 4, "gate_up_stages": 4,
    "BLOCK_OUT": 16, "down_warps": 4, "down_stages": 2,
}
MMA_MIN = 16  # rows of the padded activation operand (smallest tl.dot width)


@triton.jit
def _flush(acc, f_ab, group_sum):
    """acc + F_A F_B * float(S_g): an explicit FMA where compiled (what the general GEMM's
    ``acc + (f_a * f_b) * S`` contracts to), separate roundings under the interpreter (as
    there)."""
    if INTERPRETED:
        out = acc + f_ab * group_sum.to(tl.float32)
    else:
        out = tl.fma(f_ab, group_sum.to(tl.float32), acc)
    return out


@triton.jit
def _quantize_groups(values, in_group, Q_MAX: tl.constexpr, ROUNDING: tl.constexpr):
    """Per-token quantization of ``values`` fp32 [R, GROUP_PAD, BLOCK_K], each row one
    super group of one row (``quant_per_token``'s arithmetic): ``(F [R], Q int32 [R,
    GROUP_PAD], int8 values)``."""
    block_amax = tl.max(tl.abs(values), axis=2)
    any_nan = tl.max(tl.max((values != values).to(tl.int32), axis=2), axis=1)
    fscale, qscale, scale = _group_scales(block_amax, any_nan, in_group, Q_MAX, ROUNDING)
    return fscale, qscale, _quantize_exact(values, tl.broadcast_to(scale[:, :, None],
                                                                   values.shape))


@triton.jit
def _block_dots(w, x_q, PAD: tl.constexpr):
    """Exact int32 dots of weight rows ``w`` int8 [B, R, BLOCK_K] with one int8 vector per
    batch entry ``x_q`` [B, BLOCK_K]: [B, R]. An MMA needs at least 16 columns, so the
    vector is column 0 of a zero [BLOCK_K, PAD] operand."""
    pad = tl.arange(0, PAD)
    x_pad = tl.where(pad[None, None, :] == 0, x_q[:, :, None],
                     tl.zeros([x_q.shape[0], x_q.shape[1], PAD], tl.int8))
    dots = tl.dot(w, x_pad, out_dtype=tl.int32)
    return tl.sum(tl.where(pad[None, None, :] == 0, dots, 0), axis=2)


@triton.jit
def _gate_up_kernel(
        x_ptr, topk_ids_ptr, expert_map_ptr, w_ptr, w_qscale_ptr, w_fscale_ptr, h_ptr,
        num_pairs, num_experts, num_global_experts, inter,
        stride_xm, stride_we, stride_wn, stride_wqe, stride_wqn, stride_wqk,
        stride_wfe, stride_wfn, stride_wfg, stride_hm,
        HAS_EXPERT_MAP: tl.constexpr, TOP_K: tl.constexpr, NUM_BLOCKS: tl.constexpr,
        BLOCK_K: tl.constexpr, SUPER_GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        Q_MAX: tl.constexpr, ROUNDING: tl.constexpr, SCALE_BLOCK_N: tl.constexpr,
        BLOCK_N: tl.constexpr, PAD: tl.constexpr, GEMM_DTYPE: tl.constexpr,
        NUM_STAGES: tl.constexpr):
    """h[pair, cols] = silu(gate) * up in fp32 for ``cols`` = BLOCK_N columns of h.

    One loop step per super group: quantize the token's values of the group (their
    scales depend on the group alone), one batched MMA over the group's K-blocks for the
    gate and the up rows, Q-weighting and the int32 group sum, then the fp32 flush.
    Nothing is written for a pair with no local expert (dropped by ``expert_map``, or an
    invalid id): ``_down_kernel`` does not read its row.
    """
    pair = tl.program_id(0)
    expert = _local_expert_ids(topk_ids_ptr, expert_map_ptr, pair, num_pairs, num_experts,
                               num_global_experts, HAS_EXPERT_MAP)
    if expert < 0:
        return
    x_row = x_ptr + (pair // TOP_K).to(tl.int64) * stride_xm
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < inter
    offs_b = tl.arange(0, GROUP_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    gate_rows = w_expert + cols.to(tl.int64) * stride_wn  # rows 0..N-1 of w13: gate
    up_rows = w_expert + (cols + inter).to(tl.int64) * stride_wn  # rows N..2N-1: up
    q_expert = w_qscale_ptr + expert * stride_wqe
    f_expert = w_fscale_ptr + expert * stride_wfe
    gate_scale_rows = cols // SCALE_BLOCK_N
    up_scale_rows = (cols + inter) // SCALE_BLOCK_N

    acc_gate = tl.zeros([BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_N], tl.float32)
    for group in tl.range(0, tl.cdiv(NUM_BLOCKS, SUPER_GROUP), num_stages=NUM_STAGES):
        blocks = group * SUPER_GROUP + offs_b
        in_group = (offs_b < SUPER_GROUP) & (blocks < NUM_BLOCKS)
        x_vals = tl.load(x_row + blocks[:, None] * BLOCK_K + offs_k[None, :],
                         mask=in_group[:, None], other=0.0).to(tl.float32)
        f_x, q_x, x_q = _quantize_groups(x_vals[None, :, :], in_group[None, :], Q_MAX,
                                         ROUNDING)
        w_offs = blocks[:, None, None] * BLOCK_K + offs_k[None, None, :]
        w_mask = in_group[:, None, None] & col_mask[None, :, None]
        w_gate = tl.load(gate_rows[None, :, None] + w_offs, mask=w_mask, other=0)
        w_up = tl.load(up_rows[None, :, None] + w_offs, mask=w_mask, other=0)
        x_q = tl.reshape(x_q, [GROUP_PAD, BLOCK_K])
        dot_gate = _block_dots(w_gate, x_q, PAD)  # [GROUP_PAD, BLOCK_N]
        dot_up = _block_dots(w_up, x_q, PAD)
        qf_mask = in_group[:, None] & col_mask[None, :]
        q_gate = tl.load(q_expert + gate_scale_rows[None, :] * stride_wqn
                         + blocks[:, None] * stride_wqk, mask=qf_mask, other=0)
        q_up = tl.load(q_expert + up_scale_rows[None, :] * stride_wqn
                       + blocks[:, None] * stride_wqk, mask=qf_mask, other=0)
        q_a = tl.reshape(q_x, [GROUP_PAD])[:, None]
        # int32 weighting and group sum (exact: SPEC 5's bound; wraps alike in any order).
        sum_gate = tl.sum(dot_gate * (q_a * q_gate), axis=0)
        sum_up = tl.sum(dot_up * (q_a * q_up), axis=0)
        f_gate = tl.load(f_expert + gate_scale_rows * stride_wfn + group * stride_wfg,
                         mask=col_mask, other=0.0)
        f_up = tl.load(f_expert + up_scale_rows * stride_wfn + group * stride_wfg,
                       mask=col_mask, other=0.0)
        f_a = tl.sum(f_x, axis=0)
        acc_gate = _flush(acc_gate, f_a * f_gate, sum_gate)
        acc_up = _flush(acc_up, f_a * f_up, sum_up)

    # GEMM1's output dtype, then SiLU as the general path computes it.
    gate = to_output_dtype(acc_gate, GEMM_DTYPE).to(tl.float32)
    up = to_output_dtype(acc_up, GEMM_DTYPE).to(tl.float32)
    tl.store(h_ptr + pair.to(tl.int64) * stride_hm + cols, _silu_mul(gate, up), mask=col_mask)


@triton.jit
def _down_kernel(
        h_ptr, topk_ids_ptr, expert_map_ptr, topk_weights_ptr, w_ptr, w_qscale_ptr,
        w_fscale_ptr, out_ptr,
        num_pairs, num_experts, num_global_experts, hidden,
        stride_hm, stride_twm, stride_twj, stride_we, stride_wn, stride_wqe, stride_wqn,
        stride_wqk, stride_wfe, stride_wfn, stride_wfg, stride_om,
        HAS_EXPERT_MAP: tl.constexpr, TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr,
        NUM_BLOCKS: tl.constexpr, BLOCK_K: tl.constexpr, SUPER_GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr, Q_MAX: tl.constexpr, ROUNDING: tl.constexpr,
        SCALE_BLOCK_N: tl.constexpr, BLOCK_OUT: tl.constexpr, PAD: tl.constexpr,
        GEMM_DTYPE: tl.constexpr, NUM_STAGES: tl.constexpr):
    """out[token, cols] = sum_j w_j * mm2_j[cols] for ``cols`` = BLOCK_OUT output columns.

    The token's top_k pairs and a super group's K-blocks form the batch dimension
    [TOP_K_PAD * GROUP_PAD] of one batched MMA per super group, so the weight rows of all
    of the token's experts stream at once. A pair without a local expert adds nothing;
    an invalid id makes the token NaN (as ``unpermute``).
    """
    token = tl.program_id(0)
    slot = tl.arange(0, TOP_K_PAD)
    experts = _local_expert_ids(topk_ids_ptr, expert_map_ptr, token * TOP_K + slot,
                                num_pairs, num_experts, num_global_experts, HAS_EXPERT_MAP)
    experts = tl.where(slot < TOP_K, experts, -1)
    kept = experts >= 0
    h_rows = h_ptr + tl.where(kept, token * TOP_K + slot, 0).to(tl.int64) * stride_hm
    # Batch entry r = (pair slot r // GROUP_PAD, K-block r % GROUP_PAD of the group).
    offs_r = tl.arange(0, TOP_K_PAD * GROUP_PAD)
    slot_r = offs_r // GROUP_PAD
    block_r = offs_r % GROUP_PAD
    experts_r = _local_expert_ids(topk_ids_ptr, expert_map_ptr, token * TOP_K + slot_r,
                                  num_pairs, num_experts, num_global_experts, HAS_EXPERT_MAP)
    kept_r = (slot_r < TOP_K) & (experts_r >= 0)
    safe_experts_r = tl.maximum(experts_r, 0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    col_mask = cols < hidden
    offs_b = tl.arange(0, GROUP_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = (w_ptr + safe_experts_r[:, None] * stride_we
              + cols.to(tl.int64)[None, :] * stride_wn)  # [TOP_K_PAD * GROUP_PAD, BLOCK_OUT]
    q_rows = (w_qscale_ptr + safe_experts_r[:, None] * stride_wqe
              + (cols // SCALE_BLOCK_N)[None, :] * stride_wqn)
    safe_experts = tl.maximum(experts, 0).to(tl.int64)
    f_rows = (w_fscale_ptr + safe_experts[:, None] * stride_wfe
              + (cols // SCALE_BLOCK_N)[None, :] * stride_wfn)  # [TOP_K_PAD, BLOCK_OUT]
    f_mask = kept[:, None] & col_mask[None, :]

    acc = tl.zeros([TOP_K_PAD, BLOCK_OUT], tl.float32)
    for group in tl.range(0, tl.cdiv(NUM_BLOCKS, SUPER_GROUP), num_stages=NUM_STAGES):
        blocks = group * SUPER_GROUP + offs_b
        in_group = (offs_b < SUPER_GROUP) & (blocks < NUM_BLOCKS)
        h_vals = tl.load(h_rows[:, None, None] + blocks[None, :, None] * BLOCK_K
                         + offs_k[None, None, :],
                         mask=kept[:, None, None] & in_group[None, :, None], other=0.0)
        f_h, q_h, h_q = _quantize_groups(h_vals, in_group[None, :], Q_MAX, ROUNDING)
        blocks_r = group * SUPER_GROUP + block_r
        in_group_r = kept_r & (block_r < SUPER_GROUP) & (blocks_r < NUM_BLOCKS)
        w = tl.load(w_rows[:, :, None] + (blocks_r * BLOCK_K)[:, None, None]
                    + offs_k[None, None, :],
                    mask=in_group_r[:, None, None] & col_mask[None, :, None], other=0)
        dots = _block_dots(w, tl.reshape(h_q, [TOP_K_PAD * GROUP_PAD, BLOCK_K]), PAD)
        q_w = tl.load(q_rows + blocks_r[:, None] * stride_wqk,
                      mask=in_group_r[:, None] & col_mask[None, :], other=0)
        weighted = dots * (tl.reshape(q_h, [TOP_K_PAD * GROUP_PAD])[:, None] * q_w)
        group_sum = tl.sum(tl.reshape(weighted, [TOP_K_PAD, GROUP_PAD, BLOCK_OUT]), axis=1)
        f_w = tl.load(f_rows + group * stride_wfg, mask=f_mask, other=0.0)
        acc = _flush(acc, f_h[:, None] * f_w, group_sum)

    mm2 = to_output_dtype(acc, GEMM_DTYPE).to(tl.float32)  # GEMM2's output dtype
    out = tl.zeros([BLOCK_OUT], tl.float32)
    for j in tl.static_range(TOP_K):
        weight = tl.load(topk_weights_ptr + token.to(tl.int64) * stride_twm
                         + j * stride_twj).to(tl.float32)
        expert_j = tl.sum(tl.where(slot == j, experts, 0), axis=0)
        mm2_j = tl.sum(tl.where((slot == j)[:, None], mm2, 0.0), axis=0)
        # unpermute's combine: product and sum rounded apart (kernel built without FMA
        # contraction; the flush above is an explicit FMA).
        out = tl.where(expert_j >= 0, out + weight * mm2_j, out)
        out = tl.where(expert_j == INVALID_PAIR, float("nan"), out)
    tl.store(out_ptr + token.to(tl.int64) * stride_om + cols,
             to_output_dtype(out, out_ptr.dtype.element_ty), mask=col_mask)


def _group_pad(num_blocks: int, super_group_size: int) -> int:
    """K-blocks of a super group, padded to a power of two."""
    return triton.next_power_of_2(min(super_group_size, num_blocks))


def decode_fits(num_tokens: int, top_k: int, hidden: int, inter: int, block_k: int,
                super_group_size: int) -> bool:
    """Whether this path takes the call: few pairs, and one super group of the top_k h
    rows (what ``_down_kernel`` quantizes per step) within ``max_group_values``. Host
    ints only."""
    if num_tokens * top_k > DECODE_CONFIG["max_pairs"]:
        return False
    group_values = (triton.next_power_of_2(top_k)
                    * max(_group_pad(hidden // block_k, super_group_size),
                          _group_pad(inter // block_k, super_group_size)) * block_k)
    return group_values <= DECODE_CONFIG["max_group_values"]


def moe_forward_decode(hidden_states: torch.Tensor, weights, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor, *, expert_map: torch.Tensor | None = None,
                       config: dict | None = None,
                       stage_callback=None) -> torch.Tensor:
    """The forward of ``forward.moe_forward_triton`` at ``act_block_m = 1`` in two
    launches (inputs validated by ``triton_moe.api``; ``topk_ids`` int32 [M, top_k]).
    ``config`` overrides ``DECODE_CONFIG`` entries; ``stage_callback("decode_down")`` is
    called between the launches. No host sync."""
    cfg = weights.config
    conf = dict(DECODE_CONFIG, **(config or {}))
    num_tokens, top_k = topk_ids.shape
    hidden = hidden_states.shape[1]
    inter = weights.intermediate_size
    num_experts = weights.num_experts
    num_pairs = num_tokens * top_k
    out = torch.empty_like(hidden_states)
    if num_tokens == 0:
        return out
    assert hidden % cfg.block_k == 0 and inter % cfg.block_k == 0
    gemm_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
                  torch.float32: tl.float32}[hidden_states.dtype]
    if expert_map is None:
        map_arg, num_global, has_map = topk_ids, num_experts, False  # never read
    else:
        map_arg, num_global, has_map = expert_map, expert_map.numel(), True
    common = dict(HAS_EXPERT_MAP=has_map, TOP_K=top_k, BLOCK_K=cfg.block_k,
                  SUPER_GROUP=cfg.super_group_size, Q_MAX=cfg.q_max,
                  ROUNDING=cfg.scale_rounding, SCALE_BLOCK_N=cfg.block_n, PAD=MMA_MIN,
                  GEMM_DTYPE=gemm_dtype)

    h = torch.empty(num_pairs, inter, dtype=torch.float32, device=hidden_states.device)
    w13_q, w13_qs, w13_fs = weights.w13_q, weights.w13_qscale, weights.w13_fscale
    grid = (num_pairs, triton.cdiv(inter, conf["BLOCK_N"]))
    _gate_up_kernel[grid](
        hidden_states, topk_ids, map_arg, w13_q, w13_qs, w13_fs, h,
        num_pairs, num_experts, num_global, inter,
        hidden_states.stride(0), w13_q.stride(0), w13_q.stride(1),
        w13_qs.stride(0), w13_qs.stride(1), w13_qs.stride(2),
        w13_fs.stride(0), w13_fs.stride(1), w13_fs.stride(2), h.stride(0),
        NUM_BLOCKS=hidden // cfg.block_k,
        GROUP_PAD=_group_pad(hidden // cfg.block_k, cfg.super_group_size),
        BLOCK_N=conf["BLOCK_N"], NUM_STAGES=conf["gate_up_stages"],
        num_warps=conf["gate_up_warps"], **common)

    if stage_callback is not None:
        stage_callback("decode_down")
    w2_q, w2_qs, w2_fs = weights.w2_q, weights.w2_qscale, weights.w2_fscale
    grid = (num_tokens, triton.cdiv(hidden, conf["BLOCK_OUT"]))
    _down_kernel[grid](
        h, topk_ids, map_arg, topk_weights, w2_q, w2_qs, w2_fs, out,
        num_pairs, num_experts, num_global, hidden,
        h.stride(0), topk_weights.stride(0), topk_weights.stride(1),
        w2_q.stride(0), w2_q.stride(1), w2_qs.stride(0), w2_qs.stride(1), w2_qs.stride(2),
        w2_fs.stride(0), w2_fs.stride(1), w2_fs.stride(2), out.stride(0),
        TOP_K_PAD=triton.next_power_of_2(top_k), NUM_BLOCKS=inter // cfg.block_k,
        GROUP_PAD=_group_pad(inter // cfg.block_k, cfg.super_group_size),
        BLOCK_OUT=conf["BLOCK_OUT"],
        NUM_STAGES=conf["down_stages"], num_warps=conf["down_warps"],
        enable_fp_fusion=False, **common)
    return out
