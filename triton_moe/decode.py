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
# ``max_row_values``: the padded values of one quantized row a program holds at once
# (the x row in kernel 1, top_k h rows in kernel 2); larger rows take the general path.
# BLOCK_N / BLOCK_OUT: weight rows per program (more programs to stream the weights).
DECODE_CONFIG = {
    "max_pairs": 16,
    "max_row_values": 8192,
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
def _row_scales(row_ptr, blocks, in_group, BLOCK_K: tl.constexpr, Q_MAX: tl.constexpr,
                ROUNDING: tl.constexpr):
    """Per-token scales of one row (or several stacked), laid out ``[R, GROUP_PAD]`` with a
    row per super group: ``blocks`` the K-block index of each entry, ``in_group`` which
    exist, ``row_ptr`` [R] the start of each entry's row. Returns ``(F [R], Q, scale)``
    as ``quant_per_token`` computes them."""
    offs_k = tl.arange(0, BLOCK_K)
    ptrs = row_ptr[:, None, None] + (blocks * BLOCK_K)[:, :, None] + offs_k[None, None, :]
    values = tl.load(ptrs, mask=in_group[:, :, None], other=0.0).to(tl.float32)
    block_amax = tl.max(tl.abs(values), axis=2)
    any_nan = tl.max(tl.max((values != values).to(tl.int32), axis=2), axis=1)
    return _group_scales(block_amax, any_nan, in_group, Q_MAX, ROUNDING)


@triton.jit
def _pick(values, hit):
    """The entries of ``values`` [R, C] where ``hit`` (one per row), summed over C: [R].
    Other entries (NaN included) add exact zeros."""
    return tl.sum(tl.where(hit, values, tl.zeros_like(values)), axis=1)


@triton.jit
def _gate_up_kernel(
        x_ptr, topk_ids_ptr, expert_map_ptr, w_ptr, w_qscale_ptr, w_fscale_ptr, h_ptr,
        num_pairs, num_experts, num_global_experts, inter,
        stride_xm, stride_we, stride_wn, stride_wqe, stride_wqn, stride_wqk,
        stride_wfe, stride_wfn, stride_wfg, stride_hm,
        HAS_EXPERT_MAP: tl.constexpr, TOP_K: tl.constexpr, NUM_BLOCKS: tl.constexpr,
        BLOCK_K: tl.constexpr, SUPER_GROUP: tl.constexpr, GROUPS_PAD: tl.constexpr,
        GROUP_PAD: tl.constexpr, Q_MAX: tl.constexpr, ROUNDING: tl.constexpr,
        SCALE_BLOCK_N: tl.constexpr, BLOCK_N: tl.constexpr, PAD: tl.constexpr,
        GEMM_DTYPE: tl.constexpr, NUM_STAGES: tl.constexpr):
    """h[pair, cols] = silu(gate) * up in fp32 for ``cols`` = BLOCK_N columns of h.

    Nothing is written for a pair with no local expert (dropped by ``expert_map`` or an
    invalid id): ``_down_kernel`` does not read its row.
    """
    pair = tl.program_id(0)
    expert = _local_expert_ids(topk_ids_ptr, expert_map_ptr, pair, num_pairs, num_experts,
                               num_global_experts, HAS_EXPERT_MAP)
    if expert < 0:
        return
    x_row = x_ptr + (pair // TOP_K).to(tl.int64) * stride_xm

    # The token's scales: one [GROUP_PAD] row per super group.
    offs_sg = tl.arange(0, GROUPS_PAD)
    offs_g = tl.arange(0, GROUP_PAD)
    blocks = offs_sg[:, None] * SUPER_GROUP + offs_g[None, :]
    in_group = (offs_g[None, :] < SUPER_GROUP) & (blocks < NUM_BLOCKS)
    row_starts = x_row + tl.zeros([GROUPS_PAD], tl.int64)
    f_x, q_x, scale_x = _row_scales(row_starts, blocks, in_group, BLOCK_K, Q_MAX, ROUNDING)

    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < inter
    offs_k = tl.arange(0, BLOCK_K)
    pad = tl.arange(0, PAD)
    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    gate_rows = w_expert + cols.to(tl.int64) * stride_wn  # rows 0..N-1 of w13: gate
    up_rows = w_expert + (cols + inter).to(tl.int64) * stride_wn  # rows N..2N-1: up
    w_mask = col_mask[:, None]
    # Weight scale rows of the gate and up columns (one or more scale blocks).
    gate_q_ptrs = w_qscale_ptr + expert * stride_wqe + (cols // SCALE_BLOCK_N) * stride_wqn
    up_q_ptrs = w_qscale_ptr + expert * stride_wqe + ((cols + inter) // SCALE_BLOCK_N) * stride_wqn
    gate_f_ptrs = w_fscale_ptr + expert * stride_wfe + (cols // SCALE_BLOCK_N) * stride_wfn
    up_f_ptrs = w_fscale_ptr + expert * stride_wfe + ((cols + inter) // SCALE_BLOCK_N) * stride_wfn

    acc_gate = tl.zeros([BLOCK_N, PAD], tl.float32)
    acc_up = tl.zeros([BLOCK_N, PAD], tl.float32)
    sum_gate = tl.zeros([BLOCK_N, PAD], tl.int32)
    sum_up = tl.zeros([BLOCK_N, PAD], tl.int32)
    for kb in tl.range(0, NUM_BLOCKS, num_stages=NUM_STAGES):
        group = kb // SUPER_GROUP
        hit = blocks == kb
        scale = tl.sum(_pick(scale_x, hit), axis=0)
        q_a = tl.sum(_pick(q_x, hit), axis=0)
        f_a = tl.sum(tl.where(offs_sg == group, f_x, 0.0), axis=0)
        x_vals = tl.load(x_row + kb * BLOCK_K + offs_k).to(tl.float32)
        x_q = _quantize_exact(x_vals, tl.zeros_like(x_vals) + scale)
        # The token's int8 row as row 0 of a [PAD, BLOCK_K] MMA operand.
        x_pad = tl.where(pad[:, None] == 0, x_q[None, :], tl.zeros([PAD, BLOCK_K], tl.int8))
        w_gate = tl.load(gate_rows[:, None] + kb * BLOCK_K + offs_k[None, :], mask=w_mask,
                         other=0)
        w_up = tl.load(up_rows[:, None] + kb * BLOCK_K + offs_k[None, :], mask=w_mask, other=0)
        dot_gate = tl.dot(w_gate, tl.trans(x_pad), out_dtype=tl.int32)
        dot_up = tl.dot(w_up, tl.trans(x_pad), out_dtype=tl.int32)
        q_gate = tl.load(gate_q_ptrs + kb * stride_wqk, mask=col_mask, other=0)
        q_up = tl.load(up_q_ptrs + kb * stride_wqk, mask=col_mask, other=0)
        sum_gate += dot_gate * (q_a * q_gate)[:, None]
        sum_up += dot_up * (q_a * q_up)[:, None]
        f_gate = tl.load(gate_f_ptrs + group * stride_wfg, mask=col_mask, other=0.0)
        f_up = tl.load(up_f_ptrs + group * stride_wfg, mask=col_mask, other=0.0)
        if ((kb % SUPER_GROUP) == SUPER_GROUP - 1) | (kb == NUM_BLOCKS - 1):
            acc_gate = _flush(acc_gate, (f_a * f_gate)[:, None], sum_gate)
            acc_up = _flush(acc_up, (f_a * f_up)[:, None], sum_up)
            sum_gate = tl.zeros_like(sum_gate)
            sum_up = tl.zeros_like(sum_up)

    # Column 0 is the token; GEMM1's output dtype, then SiLU as the general path does.
    first = pad[None, :] == 0
    gate = to_output_dtype(_pick(acc_gate, first), GEMM_DTYPE).to(tl.float32)
    up = to_output_dtype(_pick(acc_up, first), GEMM_DTYPE).to(tl.float32)
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
        GROUPS_PAD: tl.constexpr, GROUP_PAD: tl.constexpr, Q_MAX: tl.constexpr,
        ROUNDING: tl.constexpr, SCALE_BLOCK_N: tl.constexpr, BLOCK_OUT: tl.constexpr,
        PAD: tl.constexpr, GEMM_DTYPE: tl.constexpr, NUM_STAGES: tl.constexpr):
    """out[token, cols] = sum_j w_j * mm2_j[cols] for ``cols`` = BLOCK_OUT output columns.

    The top_k pairs are a batch dimension of every tensor (a batched ``tl.dot``), so the
    weight rows of all of the token's experts stream at once. A pair without a local
    expert adds nothing; an invalid id makes the token NaN (as ``unpermute``).
    """
    token = tl.program_id(0)
    slot = tl.arange(0, TOP_K_PAD)
    pairs = token * TOP_K + slot
    experts = _local_expert_ids(topk_ids_ptr, expert_map_ptr, pairs, num_pairs, num_experts,
                                num_global_experts, HAS_EXPERT_MAP)
    experts = tl.where(slot < TOP_K, experts, -1)
    kept = experts >= 0
    safe_experts = tl.maximum(experts, 0).to(tl.int64)
    h_rows = h_ptr + tl.where(kept, pairs, 0).to(tl.int64) * stride_hm

    # Every pair's scales: [TOP_K_PAD * GROUPS_PAD, GROUP_PAD], a row per (pair, super
    # group); the pair of row r is slot r // GROUPS_PAD.
    offs_r = tl.arange(0, TOP_K_PAD * GROUPS_PAD)
    offs_g = tl.arange(0, GROUP_PAD)
    slot_r = offs_r // GROUPS_PAD
    pairs_r = token * TOP_K + slot_r
    experts_r = _local_expert_ids(topk_ids_ptr, expert_map_ptr, pairs_r, num_pairs,
                                  num_experts, num_global_experts, HAS_EXPERT_MAP)
    kept_r = (slot_r < TOP_K) & (experts_r >= 0)
    blocks = (offs_r % GROUPS_PAD)[:, None] * SUPER_GROUP + offs_g[None, :]
    in_group = (offs_g[None, :] < SUPER_GROUP) & (blocks < NUM_BLOCKS) & kept_r[:, None]
    row_starts = h_ptr + tl.where(kept_r, pairs_r, 0).to(tl.int64) * stride_hm
    f_h, q_h, scale_h = _row_scales(row_starts, blocks, in_group, BLOCK_K, Q_MAX, ROUNDING)

    cols = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    col_mask = cols < hidden
    offs_k = tl.arange(0, BLOCK_K)
    pad = tl.arange(0, PAD)
    w_rows = (w_ptr + safe_experts[:, None] * stride_we
              + cols.to(tl.int64)[None, :] * stride_wn)  # [TOP_K_PAD, BLOCK_OUT]
    w_mask = (kept[:, None] & col_mask[None, :])[:, :, None]
    q_ptrs = (w_qscale_ptr + safe_experts[:, None] * stride_wqe
              + (cols // SCALE_BLOCK_N)[None, :] * stride_wqn)
    f_ptrs = (w_fscale_ptr + safe_experts[:, None] * stride_wfe
              + (cols // SCALE_BLOCK_N)[None, :] * stride_wfn)
    qf_mask = kept[:, None] & col_mask[None, :]

    acc = tl.zeros([TOP_K_PAD, BLOCK_OUT, PAD], tl.float32)
    group_sum = tl.zeros([TOP_K_PAD, BLOCK_OUT, PAD], tl.int32)
    for kb in tl.range(0, NUM_BLOCKS, num_stages=NUM_STAGES):
        group = kb // SUPER_GROUP
        # This K-block's scale and Q of every pair ([TOP_K_PAD]), and its group's F.
        hit = blocks == kb
        scale = tl.sum(tl.reshape(_pick(scale_h, hit), [TOP_K_PAD, GROUPS_PAD]), axis=1)
        q_a = tl.sum(tl.reshape(_pick(q_h, hit), [TOP_K_PAD, GROUPS_PAD]), axis=1)
        f_a = tl.sum(tl.reshape(tl.where((offs_r % GROUPS_PAD) == group, f_h, 0.0),
                                [TOP_K_PAD, GROUPS_PAD]), axis=1)
        h_vals = tl.load(h_rows[:, None] + kb * BLOCK_K + offs_k[None, :],
                         mask=kept[:, None], other=0.0)
        h_q = _quantize_exact(h_vals, tl.broadcast_to(scale[:, None], [TOP_K_PAD, BLOCK_K]))
        h_pad = tl.where(pad[None, :, None] == 0, h_q[:, None, :],
                         tl.zeros([TOP_K_PAD, PAD, BLOCK_K], tl.int8))
        w = tl.load(w_rows[:, :, None] + kb * BLOCK_K + offs_k[None, None, :], mask=w_mask,
                    other=0)
        dot = tl.dot(w, tl.permute(h_pad, (0, 2, 1)), out_dtype=tl.int32)
        q_w = tl.load(q_ptrs + kb * stride_wqk, mask=qf_mask, other=0)
        group_sum += dot * (q_a[:, None] * q_w)[:, :, None]
        f_w = tl.load(f_ptrs + group * stride_wfg, mask=qf_mask, other=0.0)
        if ((kb % SUPER_GROUP) == SUPER_GROUP - 1) | (kb == NUM_BLOCKS - 1):
            acc = _flush(acc, (f_a[:, None] * f_w)[:, :, None], group_sum)
            group_sum = tl.zeros_like(group_sum)

    # Column 0 of each pair is its GEMM2 row, rounded to GEMM2's output dtype.
    mm2 = to_output_dtype(tl.sum(tl.where(pad[None, None, :] == 0, acc, 0.0), axis=2),
                          GEMM_DTYPE).to(tl.float32)  # [TOP_K_PAD, BLOCK_OUT]
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


def _groups(num_blocks: int, super_group_size: int) -> tuple[int, int]:
    """(GROUPS_PAD, GROUP_PAD): padded super groups of a row and blocks per group."""
    group_pad = triton.next_power_of_2(min(super_group_size, num_blocks))
    groups_pad = triton.next_power_of_2(-(-num_blocks // super_group_size))
    return groups_pad, group_pad


def decode_fits(num_tokens: int, top_k: int, hidden: int, inter: int, block_k: int,
                super_group_size: int) -> bool:
    """Whether this path takes the call: few pairs, and each program's quantization tile
    (the x row; the top_k h rows) within ``max_row_values``. Host ints only."""
    if num_tokens * top_k > DECODE_CONFIG["max_pairs"]:
        return False
    limit = DECODE_CONFIG["max_row_values"]
    x_groups, x_group = _groups(hidden // block_k, super_group_size)
    h_groups, h_group = _groups(inter // block_k, super_group_size)
    return (x_groups * x_group * block_k <= limit
            and triton.next_power_of_2(top_k) * h_groups * h_group * block_k <= limit)


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
    x_groups, x_group = _groups(hidden // cfg.block_k, cfg.super_group_size)
    grid = (num_pairs, triton.cdiv(inter, conf["BLOCK_N"]))
    _gate_up_kernel[grid](
        hidden_states, topk_ids, map_arg, w13_q, w13_qs, w13_fs, h,
        num_pairs, num_experts, num_global, inter,
        hidden_states.stride(0), w13_q.stride(0), w13_q.stride(1),
        w13_qs.stride(0), w13_qs.stride(1), w13_qs.stride(2),
        w13_fs.stride(0), w13_fs.stride(1), w13_fs.stride(2), h.stride(0),
        NUM_BLOCKS=hidden // cfg.block_k, GROUPS_PAD=x_groups, GROUP_PAD=x_group,
        BLOCK_N=conf["BLOCK_N"], NUM_STAGES=conf["gate_up_stages"],
        num_warps=conf["gate_up_warps"], **common)

    if stage_callback is not None:
        stage_callback("decode_down")
    w2_q, w2_qs, w2_fs = weights.w2_q, weights.w2_qscale, weights.w2_fscale
    h_groups, h_group = _groups(inter // cfg.block_k, cfg.super_group_size)
    grid = (num_tokens, triton.cdiv(hidden, conf["BLOCK_OUT"]))
    _down_kernel[grid](
        h, topk_ids, map_arg, topk_weights, w2_q, w2_qs, w2_fs, out,
        num_pairs, num_experts, num_global, hidden,
        h.stride(0), topk_weights.stride(0), topk_weights.stride(1),
        w2_q.stride(0), w2_q.stride(1), w2_qs.stride(0), w2_qs.stride(1), w2_qs.stride(2),
        w2_fs.stride(0), w2_fs.stride(1), w2_fs.stride(2), out.stride(0),
        TOP_K_PAD=triton.next_power_of_2(top_k), NUM_BLOCKS=inter // cfg.block_k,
        GROUPS_PAD=h_groups, GROUP_PAD=h_group, BLOCK_OUT=conf["BLOCK_OUT"],
        NUM_STAGES=conf["down_stages"], num_warps=conf["down_warps"],
        enable_fp_fusion=False, **common)
    return out
