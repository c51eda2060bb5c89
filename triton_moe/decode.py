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
from triton_moe.quant_per_token import _group_scales, quantize_rows
from triton_moe.jit_utils import to_output_dtype

# Configs as data. ``max_pairs``: up to this many (token, expert) pairs take this path
# (M * top_k; measured against the general path, bench/results/decode_tuning.md).
# ``max_prologue_values``: the padded values a program quantizes at once in its prologue
# (the x row; the top_k h rows); larger rows take the general path.
# BLOCK_N / BLOCK_OUT: weight rows per program (more programs to stream the weights).
DECODE_CONFIG = {
    "max_pairs": 16, "prologue": True,
    "max_prologue_values": 8192,
    "BLOCK_N": 32, "gate_up_warps": 4, "gate_up_stages": 4,
    "BLOCK_OUT": 16, "down_warps": 4, "down_stages": 2,
}


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
def _dot4(a, b):
    """Per int32 element: the sum of the products of its four signed bytes in ``a`` and
    ``b`` (four int8 values packed along K), exact in int32. Compiled: one ``dp4a``
    instruction (4 multiply-adds; the decode GEMVs would otherwise be bound by unpacking
    int8 and integer multiply-adds). Interpreter: the same sum by shifts."""
    if INTERPRETED:
        total = tl.zeros_like(a)
        for i in tl.static_range(4):
            total += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
    else:
        total = tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, tl.zeros_like(a)],
            dtype=tl.int32, is_pure=True, pack=1)
    return total


@triton.jit
def _quantize_to_scratch(src_ptr, stride_src, row_ids, row_ok, group, q_ptr, qs_ptr, fs_ptr,
                         NUM_BLOCKS: tl.constexpr, BLOCK_K: tl.constexpr,
                         SUPER_GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                         Q_MAX: tl.constexpr, ROUNDING: tl.constexpr):
    """Quantize activation rows per token (``quant_per_token``'s arithmetic) into the
    scratch the main loop reads: tile row t is super group ``group[t]`` of source row
    ``row_ids[t]`` (int64), quantized from its values alone, as a super group's scales
    depend on nothing else; rows with ``row_ok`` false are neither read nor stored.
    Stores int8 values at ``q_ptr`` [rows, NUM_BLOCKS * BLOCK_K], Q at ``qs_ptr`` [rows,
    NUM_BLOCKS], F at ``fs_ptr`` [rows, number of groups], then a barrier, so that every
    thread of the program sees what the others stored."""
    NUM_COLS: tl.constexpr = NUM_BLOCKS * BLOCK_K
    NUM_GROUPS: tl.constexpr = (NUM_BLOCKS + SUPER_GROUP - 1) // SUPER_GROUP
    offs_b = tl.arange(0, GROUP_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    blocks = group[:, None] * SUPER_GROUP + offs_b[None, :]
    in_group = (offs_b[None, :] < SUPER_GROUP) & (blocks < NUM_BLOCKS)
    cols = blocks[:, :, None] * BLOCK_K + offs_k[None, None, :]
    mask = in_group[:, :, None] & row_ok[:, None, None]
    values = tl.load(src_ptr + (row_ids * stride_src)[:, None, None] + cols, mask=mask,
                     other=0.0).to(tl.float32)
    block_amax = tl.max(tl.abs(values), axis=2)
    any_nan = tl.max(tl.max((values != values).to(tl.int32), axis=2), axis=1)
    fscale, qscale, scale = _group_scales(block_amax, any_nan, in_group, Q_MAX, ROUNDING)
    values_q = _quantize_exact(values, tl.broadcast_to(scale[:, :, None], values.shape))
    tl.store(q_ptr + (row_ids * NUM_COLS)[:, None, None] + cols, values_q, mask=mask)
    tl.store(qs_ptr + (row_ids * NUM_BLOCKS)[:, None] + blocks, qscale,
             mask=in_group & row_ok[:, None])
    tl.store(fs_ptr + row_ids * NUM_GROUPS + group, fscale, mask=row_ok)
    tl.debug_barrier()


@triton.jit
def _gate_up_kernel(
        x_ptr, topk_ids_ptr, expert_map_ptr, w32_ptr, w_qscale_ptr, w_fscale_ptr,
        x_q_ptr, x_q32_ptr, x_qs_ptr, x_fs_ptr, h_ptr,
        num_pairs, num_experts, num_global_experts, inter,
        stride_xm, stride_we, stride_wn, stride_wqe, stride_wqn, stride_wqk,
        stride_wfe, stride_wfn, stride_wfg, stride_hm,
        HAS_EXPERT_MAP: tl.constexpr, TOP_K: tl.constexpr, NUM_BLOCKS: tl.constexpr,
        BLOCK_K: tl.constexpr, SUPER_GROUP: tl.constexpr, GROUPS_PAD: tl.constexpr,
        GROUP_PAD: tl.constexpr, Q_MAX: tl.constexpr, ROUNDING: tl.constexpr,
        SCALE_BLOCK_N: tl.constexpr, BLOCK_N: tl.constexpr, GEMM_DTYPE: tl.constexpr,
        PROLOGUE: tl.constexpr, NUM_STAGES: tl.constexpr):
    """h[pair, cols] = silu(gate) * up in fp32 for ``cols`` = BLOCK_N columns of h.

    Prologue: quantize the token's row into the scratch (every program of the token
    stores the same bytes). Main loop, one step per K-block: the exact int32 dots of the
    gate and up rows with the token's row (``_dot4`` on 4 packed int8 values; weights
    read as int32 through ``w32_ptr``, strides in int32 units), Q-weighting into the super
    group's int32 sum, and at the group's last block the fp32 flush: ``gemm.py``'s steps
    in its order. Nothing is written for a pair with no local expert (dropped by
    ``expert_map``, or an invalid id): ``_down_kernel`` does not read its row.
    """
    pair = tl.program_id(0)
    expert = _local_expert_ids(topk_ids_ptr, expert_map_ptr, pair, num_pairs, num_experts,
                               num_global_experts, HAS_EXPERT_MAP)
    if expert < 0:
        return
    token = (pair // TOP_K).to(tl.int64)
    NUM_GROUPS: tl.constexpr = (NUM_BLOCKS + SUPER_GROUP - 1) // SUPER_GROUP
    if PROLOGUE:
        groups = tl.minimum(tl.arange(0, GROUPS_PAD), NUM_GROUPS - 1)  # padding repeats
        _quantize_to_scratch(x_ptr, stride_xm, token + tl.zeros([GROUPS_PAD], tl.int64),
                             tl.full([GROUPS_PAD], 1, tl.int1), groups, x_q_ptr, x_qs_ptr,
                             x_fs_ptr, NUM_BLOCKS, BLOCK_K, SUPER_GROUP, GROUP_PAD, Q_MAX,
                             ROUNDING)

    K4: tl.constexpr = BLOCK_K // 4
    offs_k4 = tl.arange(0, K4)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < inter
    w_expert = w32_ptr + expert.to(tl.int64) * stride_we
    gate_rows = w_expert + cols.to(tl.int64) * stride_wn  # rows 0..N-1 of w13: gate
    up_rows = w_expert + (cols + inter).to(tl.int64) * stride_wn  # rows N..2N-1: up
    gate_q = w_qscale_ptr + expert * stride_wqe + (cols // SCALE_BLOCK_N) * stride_wqn
    up_q = w_qscale_ptr + expert * stride_wqe + ((cols + inter) // SCALE_BLOCK_N) * stride_wqn
    gate_f = w_fscale_ptr + expert * stride_wfe + (cols // SCALE_BLOCK_N) * stride_wfn
    up_f = w_fscale_ptr + expert * stride_wfe + ((cols + inter) // SCALE_BLOCK_N) * stride_wfn
    x_row4 = x_q32_ptr + token * (NUM_BLOCKS * K4)

    acc_gate = tl.zeros([BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_N], tl.float32)
    sum_gate = tl.zeros([BLOCK_N], tl.int32)
    sum_up = tl.zeros([BLOCK_N], tl.int32)
    for kb in tl.range(0, NUM_BLOCKS, num_stages=NUM_STAGES):
        group = kb // SUPER_GROUP
        x4 = tl.broadcast_to(tl.load(x_row4 + kb * K4 + offs_k4)[None, :], [BLOCK_N, K4])
        w_gate = tl.load(gate_rows[:, None] + kb * K4 + offs_k4[None, :],
                         mask=col_mask[:, None], other=0)
        w_up = tl.load(up_rows[:, None] + kb * K4 + offs_k4[None, :], mask=col_mask[:, None],
                       other=0)
        q_a = tl.load(x_qs_ptr + token * NUM_BLOCKS + kb)
        q_gate = tl.load(gate_q + kb * stride_wqk, mask=col_mask, other=0)
        q_up = tl.load(up_q + kb * stride_wqk, mask=col_mask, other=0)
        # int32 weighting: |Q_A Q_B dot| <= q_max^2 * BLOCK_K * 127^2 (SPEC 5).
        sum_gate += tl.sum(_dot4(w_gate, x4), axis=1) * (q_a * q_gate)
        sum_up += tl.sum(_dot4(w_up, x4), axis=1) * (q_a * q_up)
        f_a = tl.load(x_fs_ptr + token * NUM_GROUPS + group)
        f_gate = tl.load(gate_f + group * stride_wfg, mask=col_mask, other=0.0)
        f_up = tl.load(up_f + group * stride_wfg, mask=col_mask, other=0.0)
        if ((kb % SUPER_GROUP) == SUPER_GROUP - 1) | (kb == NUM_BLOCKS - 1):
            acc_gate = _flush(acc_gate, f_a * f_gate, sum_gate)
            acc_up = _flush(acc_up, f_a * f_up, sum_up)
            sum_gate = tl.zeros_like(sum_gate)
            sum_up = tl.zeros_like(sum_up)

    # GEMM1's output dtype, then SiLU as the general path computes it.
    gate = to_output_dtype(acc_gate, GEMM_DTYPE).to(tl.float32)
    up = to_output_dtype(acc_up, GEMM_DTYPE).to(tl.float32)
    tl.store(h_ptr + pair.to(tl.int64) * stride_hm + cols, _silu_mul(gate, up), mask=col_mask)


@triton.jit
def _down_kernel(
        h_ptr, topk_ids_ptr, expert_map_ptr, topk_weights_ptr, w32_ptr, w_qscale_ptr,
        w_fscale_ptr, h_q_ptr, h_q32_ptr, h_qs_ptr, h_fs_ptr, out_ptr,
        num_pairs, num_experts, num_global_experts, hidden,
        stride_hm, stride_twm, stride_twj, stride_we, stride_wn, stride_wqe, stride_wqn,
        stride_wqk, stride_wfe, stride_wfn, stride_wfg, stride_om,
        HAS_EXPERT_MAP: tl.constexpr, TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr,
        NUM_BLOCKS: tl.constexpr, BLOCK_K: tl.constexpr, SUPER_GROUP: tl.constexpr,
        GROUPS_PAD: tl.constexpr, GROUP_PAD: tl.constexpr, Q_MAX: tl.constexpr,
        ROUNDING: tl.constexpr, SCALE_BLOCK_N: tl.constexpr, BLOCK_OUT: tl.constexpr,
        GEMM_DTYPE: tl.constexpr, PROLOGUE: tl.constexpr, NUM_STAGES: tl.constexpr):
    """out[token, cols] = sum_j w_j * mm2_j[cols] for ``cols`` = BLOCK_OUT output columns.

    Prologue: quantize the token's top_k h rows into the scratch. Main loop, one step per
    K-block, with the top_k pairs as a batch dimension so the weight rows of all of the
    token's experts stream at once; then ``unpermute``'s combine in order of j. A pair
    without a local expert adds nothing; an invalid id makes the token NaN.
    """
    token = tl.program_id(0)
    NUM_GROUPS: tl.constexpr = (NUM_BLOCKS + SUPER_GROUP - 1) // SUPER_GROUP
    if PROLOGUE:
        offs_r = tl.arange(0, TOP_K_PAD * GROUPS_PAD)  # tile row: (pair slot, super group)
        slot_r = offs_r // GROUPS_PAD
        experts_r = _local_expert_ids(topk_ids_ptr, expert_map_ptr, token * TOP_K + slot_r,
                                      num_pairs, num_experts, num_global_experts,
                                      HAS_EXPERT_MAP)
        _quantize_to_scratch(h_ptr, stride_hm, (token * TOP_K + slot_r).to(tl.int64),
                             (slot_r < TOP_K) & (experts_r >= 0),
                             tl.minimum(offs_r % GROUPS_PAD, NUM_GROUPS - 1),
                             h_q_ptr, h_qs_ptr, h_fs_ptr, NUM_BLOCKS, BLOCK_K, SUPER_GROUP,
                             GROUP_PAD, Q_MAX, ROUNDING)

    slot = tl.arange(0, TOP_K_PAD)
    pairs = (token * TOP_K + slot).to(tl.int64)
    experts = _local_expert_ids(topk_ids_ptr, expert_map_ptr, pairs, num_pairs, num_experts,
                                num_global_experts, HAS_EXPERT_MAP)
    experts = tl.where(slot < TOP_K, experts, -1)
    kept = experts >= 0
    safe_experts = tl.maximum(experts, 0).to(tl.int64)
    K4: tl.constexpr = BLOCK_K // 4
    offs_k4 = tl.arange(0, K4)
    cols = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    col_mask = cols < hidden
    w_rows = (w32_ptr + safe_experts[:, None] * stride_we
              + cols.to(tl.int64)[None, :] * stride_wn)  # [TOP_K_PAD, BLOCK_OUT]
    w_mask = (kept[:, None] & col_mask[None, :])
    q_rows = (w_qscale_ptr + safe_experts[:, None] * stride_wqe
              + (cols // SCALE_BLOCK_N)[None, :] * stride_wqn)
    f_rows = (w_fscale_ptr + safe_experts[:, None] * stride_wfe
              + (cols // SCALE_BLOCK_N)[None, :] * stride_wfn)
    h_rows4 = h_q32_ptr + pairs * (NUM_BLOCKS * K4)

    acc = tl.zeros([TOP_K_PAD, BLOCK_OUT], tl.float32)
    group_sum = tl.zeros([TOP_K_PAD, BLOCK_OUT], tl.int32)
    for kb in tl.range(0, NUM_BLOCKS, num_stages=NUM_STAGES):
        group = kb // SUPER_GROUP
        h4 = tl.load(h_rows4[:, None] + kb * K4 + offs_k4[None, :], mask=kept[:, None],
                     other=0)
        w = tl.load(w_rows[:, :, None] + kb * K4 + offs_k4[None, None, :],
                    mask=w_mask[:, :, None], other=0)
        dots = tl.sum(_dot4(w, tl.broadcast_to(h4[:, None, :], [TOP_K_PAD, BLOCK_OUT, K4])),
                      axis=2)
        q_a = tl.load(h_qs_ptr + pairs * NUM_BLOCKS + kb, mask=kept, other=0)
        q_w = tl.load(q_rows + kb * stride_wqk, mask=w_mask, other=0)
        group_sum += dots * (q_a[:, None] * q_w)
        f_a = tl.load(h_fs_ptr + pairs * NUM_GROUPS + group, mask=kept, other=0.0)
        f_w = tl.load(f_rows + group * stride_wfg, mask=w_mask, other=0.0)
        if ((kb % SUPER_GROUP) == SUPER_GROUP - 1) | (kb == NUM_BLOCKS - 1):
            acc = _flush(acc, f_a[:, None] * f_w, group_sum)
            group_sum = tl.zeros_like(group_sum)

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


def _group_pads(num_blocks: int, super_group_size: int) -> tuple[int, int]:
    """(GROUPS_PAD, GROUP_PAD): a row's super groups and a group's K-blocks, each padded
    to a power of two."""
    num_groups = -(-num_blocks // super_group_size)
    return (triton.next_power_of_2(num_groups),
            triton.next_power_of_2(min(super_group_size, num_blocks)))


def decode_fits(num_tokens: int, top_k: int, hidden: int, inter: int, block_k: int,
                super_group_size: int) -> bool:
    """Whether this path takes the call: few pairs, and the rows each program quantizes
    in its prologue (the x row; the top_k h rows) within ``max_prologue_values``. Host
    ints only."""
    if num_tokens * top_k > DECODE_CONFIG["max_pairs"]:
        return False
    limit = DECODE_CONFIG["max_prologue_values"]
    x_groups, x_group = _group_pads(hidden // block_k, super_group_size)
    h_groups, h_group = _group_pads(inter // block_k, super_group_size)
    return (x_groups * x_group * block_k <= limit
            and triton.next_power_of_2(top_k) * h_groups * h_group * block_k <= limit)


def _as_int32(w_q: torch.Tensor) -> torch.Tensor:
    """int8 weights [..., C] viewed as int32 [..., C // 4] (4 K-values per element)."""
    return w_q.view(torch.int32)


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
    block_k = cfg.block_k
    assert hidden % block_k == 0 and inter % block_k == 0 and block_k % 4 == 0
    gemm_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
                  torch.float32: tl.float32}[hidden_states.dtype]
    if expert_map is None:
        map_arg, num_global, has_map = topk_ids, num_experts, False  # never read
    else:
        map_arg, num_global, has_map = expert_map, expert_map.numel(), True
    common = dict(HAS_EXPERT_MAP=has_map, TOP_K=top_k, BLOCK_K=block_k,
                  SUPER_GROUP=cfg.super_group_size, Q_MAX=cfg.q_max,
                  ROUNDING=cfg.scale_rounding, SCALE_BLOCK_N=cfg.block_n,
                  GEMM_DTYPE=gemm_dtype, PROLOGUE=conf["prologue"])
    device = hidden_states.device

    prologue = conf["prologue"]

    def quantized(src: torch.Tensor):
        """int8 values (and their int32 view), Q and F of the rows of ``src``: a scratch
        the kernel's prologue fills, or quantize_rows' output (a launch of its own)."""
        rows, cols = src.shape
        if prologue:
            num_blocks = cols // block_k
            values = torch.empty(rows, cols, dtype=torch.int8, device=device)
            q = torch.empty(rows, num_blocks, dtype=torch.int32, device=device)
            f = torch.empty(rows, -(-num_blocks // cfg.super_group_size),
                            dtype=torch.float32, device=device)
        else:
            values, q, f = quantize_rows("rows", src, rows, cols, None, block_k=block_k,
                                         q_max=cfg.q_max, super_group_size=cfg.super_group_size,
                                         scale_rounding=cfg.scale_rounding)
        return values, values.view(torch.int32), q, f

    h = torch.empty(num_pairs, inter, dtype=torch.float32, device=device)
    w13 = _as_int32(weights.w13_q)
    w13_qs, w13_fs = weights.w13_qscale, weights.w13_fscale
    x_groups, x_group = _group_pads(hidden // block_k, cfg.super_group_size)
    grid = (num_pairs, triton.cdiv(inter, conf["BLOCK_N"]))
    _gate_up_kernel[grid](
        hidden_states, topk_ids, map_arg, w13, w13_qs, w13_fs,
        *quantized(hidden_states), h,
        num_pairs, num_experts, num_global, inter,
        hidden_states.stride(0), w13.stride(0), w13.stride(1),
        w13_qs.stride(0), w13_qs.stride(1), w13_qs.stride(2),
        w13_fs.stride(0), w13_fs.stride(1), w13_fs.stride(2), h.stride(0),
        NUM_BLOCKS=hidden // block_k, GROUPS_PAD=x_groups, GROUP_PAD=x_group,
        BLOCK_N=conf["BLOCK_N"], NUM_STAGES=conf["gate_up_stages"],
        num_warps=conf["gate_up_warps"], **common)

    if stage_callback is not None:
        stage_callback("decode_down")
    w2 = _as_int32(weights.w2_q)
    w2_qs, w2_fs = weights.w2_qscale, weights.w2_fscale
    h_groups, h_group = _group_pads(inter // block_k, cfg.super_group_size)
    grid = (num_tokens, triton.cdiv(hidden, conf["BLOCK_OUT"]))
    _down_kernel[grid](
        h, topk_ids, map_arg, topk_weights, w2, w2_qs, w2_fs, *quantized(h), out,
        num_pairs, num_experts, num_global, hidden,
        h.stride(0), topk_weights.stride(0), topk_weights.stride(1),
        w2.stride(0), w2.stride(1), w2_qs.stride(0), w2_qs.stride(1), w2_qs.stride(2),
        w2_fs.stride(0), w2_fs.stride(1), w2_fs.stride(2), out.stride(0),
        TOP_K_PAD=triton.next_power_of_2(top_k), NUM_BLOCKS=inter // block_k,
        GROUPS_PAD=h_groups, GROUP_PAD=h_group, BLOCK_OUT=conf["BLOCK_OUT"],
        NUM_STAGES=conf["down_stages"], num_warps=conf["down_warps"],
        enable_fp_fusion=False, **common)
    return out
