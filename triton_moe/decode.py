"""Small-batch (decode) forward: three or four launches, no permutation, weights streamed
per pair.

For a few tokens the general pipeline (``forward.py``: permute, quantize, GEMM1, SiLU,
GEMM2, un-permute) is bound by its six launches and its 16-row GEMM tiles, not by the
expert weights it must read. With per-token activation scales (``act_block_m = 1``) a
pair's arithmetic does not depend on the other pairs, so the path can be regrouped
without changing a bit of it:

1. quantize the M token rows (``quant_per_token``, mode "rows"), or, when gate/up takes
   all of K in one step of whole super groups (``quantize_x_in_gate_up``), let every
   gate/up program quantize its token's row in registers (``_quantize_token``: the same
   arithmetic) while its weight loads are in flight;
2. ``_gate_up_kernel``, one program per (pair, BLOCK_N columns of h): GEMM1's gate and up
   columns of the pair's expert (``gemm.py``'s K-block weighting and super-group flush),
   rounded to the activation dtype as GEMM1's output is, then ``silu(gate) * up`` in fp32
   (``quant._silu_mul``) into h [P, N];
3. quantize the P rows of h (mode "rows");
4. ``_down_kernel``, one program per (token, BLOCK_OUT output columns): GEMM2 for all of
   the token's top_k pairs at once (a batch dimension), rounded to the activation dtype,
   then ``unpermute``'s combine ``sum_j w_j * mm2_j`` in order of j.

Same results as the general path: bit for bit under the interpreter, and in every GPU
comparison so far (compiled, the fp32 super-group flush is an explicit FMA, which the
general GEMM's ``acc + (f_a * f_b) * S`` contracts to). The int8 dots run on ``dp4a``
(``_dot4``): at one token a GEMV gives the tensor cores nothing to reuse, and int8
``tl.dot`` with the token padded to 16 columns measured slower (tuning log).

The weight kernels walk K in steps of ``CHUNK`` K-blocks (``chunk_blocks``: a step lies
in one super group or holds whole ones, flushed in order; all of K in one step may be
padded past K to a power of two, the padding masked). On sm_90+ the launches are
chained by programmatic dependent launch (``jit_utils.pdl_wait``): each kernel lets the
next start at once, and a program waits for the previous kernel's output only after it
has found its experts and, when K fits one step, issued its weight loads.

The path reads a pair's weights once per pair (the general path: once per expert hit),
so it pays where pairs do not outnumber the experts. ``forward.moe_forward_triton``
takes it when ``act_block_m == 1``, the GEMM is Triton's, and ``decode_fits``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_moe.jit_utils import INTERPRETED, pdl_launch_dependents, pdl_wait, to_output_dtype
from triton_moe.permute import INVALID_PAIR, _local_expert_ids
from triton_moe.quant import _group_scales, _quantize_exact, _silu_mul
from triton_moe.quant_per_token import quantize_rows

# Configs as data (bench/results/decode_tuning.md: H100, CUDA graph, against the general
# path in the same session). The path takes at most ``max_pairs`` pairs, at most one pair
# per expert (``experts_per_pair``: pairs that share an expert read its weights once
# each) and at most ``max_weight_bytes`` of int8 weights per call (pairs x one expert's
# weights). Measured at 6ca9cd5, decode vs general (us): 35B-A3B (E = 256, 3 MB per
# expert) M = 1 20 vs 40, M = 8 (64 pairs) 76 vs 87; Qwen3-30B-A3B (E = 128) M = 4 65 vs
# 76, M = 8 96 vs 105; Mixtral (E = 8, 8 pairs at M = 4) M = 4 362 vs 395; DeepSeek-V3
# (44 MB per expert) M = 4 (32 pairs, 1.4 GB) 435 vs 470. Larger cases were not measured.
# BLOCK_N / BLOCK_OUT: weight rows per program; *_chunk: K-blocks per loop step, and
# *_one_step: the most K-blocks (padded to a power of two) done in one unpipelined step
# (``chunk_blocks``); stages: steps in flight; *_maxnreg: a register cap (None: none);
# pdl: programmatic dependent launch.
DECODE_CONFIG = {
    "max_pairs": 64, "experts_per_pair": 1, "max_weight_bytes": 3 * 2**29,
    "BLOCK_N": 16, "gate_up_chunk": 16, "gate_up_one_step": 16, "gate_up_warps": 4,
    "gate_up_stages": 3,
    "BLOCK_OUT": 16, "down_chunk": 4, "down_one_step": 8, "down_warps": 8,
    "down_stages": 2, "gate_up_maxnreg": None, "down_maxnreg": None,
    "pdl": True,
    # x quantized by every gate/up program, in registers, while its weight loads are in
    # flight (when gate/up runs one step over all of K in whole super groups): one launch
    # fewer, and gate/up, now the first launch, issues its weight loads at once instead of
    # ~1 us in, after the quantization kernel's start (decode_tuning.md, session 10, H100,
    # us: 35B-A3B 2 / 4 / 8 tokens 26.40 / 44.32 / 72.40 -> 25.54 / 43.07 / 71.47;
    # Qwen3-30B-A3B 1 / 2 / 4 / 8 tokens 22.24 / 34.56 / 57.30 / 91.84 -> 21.09 / 34.40 /
    # 57.36 / 92.45). It takes gate/up from 173 to 217 registers on sm_90: still two
    # programs per SM.
    "quantize_x_in_gate_up": True,
    # Waves (``_wave_config``; decode_tuning.md, session 9, H100): registers bound how
    # many gate/up programs an SM holds (two: "resident" 2). When gate/up's grid fits one
    # such wave, x is quantized by its own launch (gate/up at 173 registers) and down runs
    # on 4 warps (158 registers): one down program then fits beside two gate/up ones (2 x
    # 22528 + 20480 registers of 65536; tests/test_decode.py checks the sum) and loads its
    # weights under gate/up instead of after it (35B-A3B, one token: 17.6 -> 16.8 us; with
    # x quantized in gate/up instead, 17.5).
    "wave_rule": True, "gate_up_resident": 2,
    "one_wave": {"down_warps": 4, "quantize_x_in_gate_up": False},
    # When gate/up takes more than one wave, down's programs become resident only as its
    # last wave leaves. If down runs one step and its grid at these wider tiles still
    # gives each SM at most one program (154 registers on 8 warps, no spill), it takes
    # them: half the programs, each reading the token's h rows once for twice the columns
    # (decode_tuning.md, session 10, H100: 35B-A3B two tokens 25.41 -> 25.07 and 25.23 ->
    # 24.82 us in two calls; Qwen3-30B-A3B one and two tokens unchanged; Mixtral, whose
    # down takes pipelined steps, one token 135.4 -> 145.6 without the one-step condition).
    "wide_down": {"BLOCK_OUT": 32},
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
    instruction (4 multiply-adds). Interpreter: the same sum by shifts."""
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
def _weighted_products(w, x4, q_ab):
    """Q_A Q_B * (the 4-product sums of ``w, x [..., CHUNK, K4]``, int8 x4 as int32), with
    ``q_ab [..., CHUNK]`` per K-block: summed over a super group's blocks and K, the
    group's int32 sum. Weighting before the sum lets a step reduce once per group
    instead of once per K-block (the K axis spans threads: shuffles). Exact: SPEC 5
    keeps a group's total within int32, and int32 sums wrap exactly on the way, so any
    order of the sum gives the total."""
    return _dot4(w, x4) * tl.expand_dims(q_ab, -1)


@triton.jit
def _flush_groups(acc, f_ab, group_sums, GROUPS: tl.constexpr):
    """``acc`` after the flushes of GROUPS whole super groups, in order: ``f_ab`` and
    ``group_sums`` hold one group per entry of their last axis."""
    offs = tl.arange(0, GROUPS)
    for g in tl.static_range(GROUPS):
        acc = _flush(acc, tl.sum(tl.where(offs == g, f_ab, 0.0), axis=-1),
                     tl.sum(tl.where(offs == g, group_sums, 0), axis=-1))
    return acc


@triton.jit
def _step_fscales(f_rows, kb, stride_wfg, mask, CHUNK: tl.constexpr,
                  SUPER_GROUP: tl.constexpr):
    """The weights' F of the groups a step flushes: the one group it lies in (shaped as
    ``f_rows``), or its CHUNK // SUPER_GROUP whole groups (a last axis more)."""
    if CHUNK <= SUPER_GROUP:
        f_w = tl.load(f_rows + (kb // SUPER_GROUP) * stride_wfg, mask=mask, other=0.0)
    else:
        groups = kb // SUPER_GROUP + tl.arange(0, CHUNK // SUPER_GROUP)
        f_w = tl.load(tl.expand_dims(f_rows, -1) + groups * stride_wfg,
                      mask=tl.expand_dims(mask, -1), other=0.0)
    return f_w


@triton.jit
def _in_k(blocks, NUM_BLOCKS: tl.constexpr, CHUNK: tl.constexpr):
    """Which of a step's K-blocks exist: all, except when the steps of CHUNK blocks do
    not divide K, i.e. in a step padded to a power of two (``chunk_blocks``), whose
    blocks past K are masked (a constant where not padded, so the compiled code has no
    mask there)."""
    if NUM_BLOCKS % CHUNK != 0:
        in_k = blocks < NUM_BLOCKS
    else:
        in_k = tl.full(blocks.shape, 1, tl.int1)
    return in_k


@triton.jit
def _quantize_token(x_ptr, token, stride_xm, NUM_BLOCKS: tl.constexpr, BLOCK_K: tl.constexpr,
                    SUPER_GROUP: tl.constexpr, Q_MAX: tl.constexpr, ROUNDING: tl.constexpr):
    """The token's row quantized in registers, as ``quant_per_token`` mode "rows" does it
    (its ``_group_scales`` and ``_quantize_exact``: same bits): ``(x4 int32 [NUM_BLOCKS,
    BLOCK_K // 4]`` (4 int8 per element, the layout ``x_q32_ptr`` holds), ``Q [NUM_BLOCKS]``,
    ``F [NUM_BLOCKS // SUPER_GROUP])``. K must hold whole super groups."""
    GROUPS: tl.constexpr = NUM_BLOCKS // SUPER_GROUP
    offs = ((tl.arange(0, GROUPS) * (SUPER_GROUP * BLOCK_K))[:, None, None]
            + (tl.arange(0, SUPER_GROUP) * BLOCK_K)[None, :, None]
            + tl.arange(0, BLOCK_K)[None, None, :])  # [GROUPS, SUPER_GROUP, BLOCK_K]
    values = tl.load(x_ptr + token * stride_xm + offs).to(tl.float32)
    any_nan = tl.max(tl.max((values != values).to(tl.int32), axis=2), axis=1)
    fscale, qscale, scale = _group_scales(
        tl.max(tl.abs(values), axis=2), any_nan,
        tl.full([1, SUPER_GROUP], 1, tl.int1), Q_MAX, ROUNDING)
    x_q = _quantize_exact(values, tl.broadcast_to(scale[:, :, None], values.shape))
    # Little-endian packing: byte i of int32 element j is int8 value 4 j + i.
    x_bytes = tl.reshape(x_q.to(tl.int32) & 0xFF, [NUM_BLOCKS, BLOCK_K // 4, 4])
    x4 = tl.sum(x_bytes << (8 * tl.arange(0, 4))[None, None, :], axis=2)
    return x4, tl.reshape(qscale, [NUM_BLOCKS]), fscale


@triton.jit
def _gate_up_kernel(
        topk_ids_ptr, expert_map_ptr, x_q32_ptr, x_qs_ptr, x_fs_ptr,
        w32_ptr, w_qscale_ptr, w_fscale_ptr, h_ptr, x_ptr,
        num_pairs, num_experts, num_global_experts, inter,
        stride_we, stride_wn, stride_wqe, stride_wqn, stride_wqk,
        stride_wfe, stride_wfn, stride_wfg, stride_hm, stride_xm,
        HAS_EXPERT_MAP: tl.constexpr, TOP_K: tl.constexpr, NUM_BLOCKS: tl.constexpr,
        BLOCK_K: tl.constexpr, SUPER_GROUP: tl.constexpr, SCALE_BLOCK_N: tl.constexpr,
        BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, GEMM_DTYPE: tl.constexpr,
        NUM_STAGES: tl.constexpr, GDC: tl.constexpr, QUANTIZE_X: tl.constexpr,
        Q_MAX: tl.constexpr, ROUNDING: tl.constexpr):
    """h[pair, cols] = silu(gate) * up in fp32 for ``cols`` = BLOCK_N columns of h.

    One loop step per CHUNK K-blocks: the exact int32 dots of the gate and up rows with
    the token's quantized row (``_dot4`` on 4 packed int8 values: the int8 tensors are
    read as int32 through ``x_q32_ptr`` / ``w32_ptr``, strides in int32 units), the
    Q-weighting into the super group's int32 sum, and at each group's last block the fp32
    flush: ``gemm.py``'s steps in its order. ``QUANTIZE_X`` (one step over all of K, whole
    super groups): the token's row is quantized here from ``x_ptr`` (``_quantize_token``)
    after the weight loads are issued, and ``x_q32_ptr`` / ``x_qs_ptr`` / ``x_fs_ptr``
    are not read. A pair with no local expert (dropped by ``expert_map``, or an invalid
    id) gets a zero row: ``_down_kernel`` does not use it, but h is quantized whole, and
    must not be read uninitialized.
    """
    tl.static_assert(
        not QUANTIZE_X or (CHUNK == NUM_BLOCKS and NUM_BLOCKS % SUPER_GROUP == 0),
        "QUANTIZE_X needs one step over all of K in whole super groups")
    pdl_launch_dependents(GDC)
    pair = tl.program_id(0)
    first_col = tl.program_id(1) * BLOCK_N
    cols = first_col + tl.arange(0, BLOCK_N)
    col_mask = cols < inter
    expert = _local_expert_ids(topk_ids_ptr, expert_map_ptr, pair, num_pairs, num_experts,
                               num_global_experts, HAS_EXPERT_MAP)
    if expert < 0:
        pdl_wait(GDC)
        tl.store(h_ptr + pair.to(tl.int64) * stride_hm + cols,
                 tl.zeros([BLOCK_N], tl.float32), mask=col_mask)
        return
    token = (pair // TOP_K).to(tl.int64)
    NUM_GROUPS: tl.constexpr = (NUM_BLOCKS + SUPER_GROUP - 1) // SUPER_GROUP
    K4: tl.constexpr = BLOCK_K // 4
    offs_k4 = tl.arange(0, K4)
    w_expert = w32_ptr + expert.to(tl.int64) * stride_we
    gate_rows = w_expert + cols.to(tl.int64) * stride_wn  # rows 0..N-1 of w13: gate
    up_rows = w_expert + (cols + inter).to(tl.int64) * stride_wn  # rows N..2N-1: up
    gate_q = w_qscale_ptr + expert * stride_wqe + (cols // SCALE_BLOCK_N) * stride_wqn
    up_q = w_qscale_ptr + expert * stride_wqe + ((cols + inter) // SCALE_BLOCK_N) * stride_wqn
    gate_f = w_fscale_ptr + expert * stride_wfe + (cols // SCALE_BLOCK_N) * stride_wfn
    up_f = w_fscale_ptr + expert * stride_wfe + ((cols + inter) // SCALE_BLOCK_N) * stride_wfn
    x_row4 = x_q32_ptr + token * (NUM_BLOCKS * K4)
    # One step (NUM_STAGES == 1): the weights are loaded before the wait for the token,
    # under the previous kernel's tail. Pipelined steps load the token ahead: wait first.
    ONE_STEP: tl.constexpr = NUM_STAGES == 1
    if not ONE_STEP:
        pdl_wait(GDC)  # the quantized token is the previous kernel's output

    acc_gate = tl.zeros([BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_N], tl.float32)
    sum_gate = tl.zeros([BLOCK_N], tl.int32)
    sum_up = tl.zeros([BLOCK_N], tl.int32)
    offs_chunk = tl.arange(0, CHUNK)
    offs_ck4 = (offs_chunk * K4)[:, None] + offs_k4[None, :]  # [CHUNK, K4]: the chunk's K
    NUM_STEPS: tl.constexpr = (NUM_BLOCKS + CHUNK - 1) // CHUNK
    for chunk in tl.range(0, NUM_STEPS, num_stages=NUM_STAGES):
        kb = chunk * CHUNK  # first K-block of the chunk
        blocks = kb + offs_chunk
        in_k = _in_k(blocks, NUM_BLOCKS, CHUNK)
        w_mask = col_mask[:, None, None] & in_k[None, :, None]
        w_gate = tl.load(gate_rows[:, None, None] + kb * K4 + offs_ck4[None, :, :],
                         mask=w_mask, other=0)
        w_up = tl.load(up_rows[:, None, None] + kb * K4 + offs_ck4[None, :, :], mask=w_mask,
                       other=0)
        q_mask = col_mask[:, None] & in_k[None, :]
        q_gate = tl.load(gate_q[:, None] + blocks[None, :] * stride_wqk, mask=q_mask, other=0)
        q_up = tl.load(up_q[:, None] + blocks[None, :] * stride_wqk, mask=q_mask, other=0)
        if ONE_STEP:  # the weights' F too: only the token's rows come after the wait
            f_gate_step = _step_fscales(gate_f, kb, stride_wfg, col_mask, CHUNK, SUPER_GROUP)
            f_up_step = _step_fscales(up_f, kb, stride_wfg, col_mask, CHUNK, SUPER_GROUP)
            pdl_wait(GDC)
        if QUANTIZE_X:  # one step over all of K, whole groups: the row from registers
            x_row, x_qs, x_fs = _quantize_token(x_ptr, token, stride_xm, NUM_BLOCKS, BLOCK_K,
                                                SUPER_GROUP, Q_MAX, ROUNDING)
            x4 = tl.broadcast_to(x_row[None, :, :], [BLOCK_N, CHUNK, K4])
            q_a = x_qs[None, :]
        else:
            x4 = tl.broadcast_to(tl.load(x_row4 + kb * K4 + offs_ck4, mask=in_k[:, None],
                                         other=0)[None, :, :], [BLOCK_N, CHUNK, K4])
            q_a = tl.load(x_qs_ptr + token * NUM_BLOCKS + blocks, mask=in_k, other=0)[None, :]
        weighted_gate = _weighted_products(w_gate, x4, q_a * q_gate)  # [BLOCK_N, CHUNK, K4]
        weighted_up = _weighted_products(w_up, x4, q_a * q_up)
        if CHUNK <= SUPER_GROUP:  # the step lies in one group: flush at its last block
            sum_gate += tl.sum(tl.sum(weighted_gate, axis=1), axis=1)
            sum_up += tl.sum(tl.sum(weighted_up, axis=1), axis=1)
            if ((kb + CHUNK) % SUPER_GROUP == 0) | (kb + CHUNK >= NUM_BLOCKS):
                if QUANTIZE_X:  # CHUNK == NUM_BLOCKS == SUPER_GROUP: one group
                    f_a = tl.sum(x_fs, axis=0)
                else:
                    f_a = tl.load(x_fs_ptr + token * NUM_GROUPS + kb // SUPER_GROUP)
                if ONE_STEP:
                    f_gate, f_up = f_gate_step, f_up_step
                else:
                    f_gate = _step_fscales(gate_f, kb, stride_wfg, col_mask, CHUNK,
                                           SUPER_GROUP)
                    f_up = _step_fscales(up_f, kb, stride_wfg, col_mask, CHUNK, SUPER_GROUP)
                acc_gate = _flush(acc_gate, f_a * f_gate, sum_gate)
                acc_up = _flush(acc_up, f_a * f_up, sum_up)
                sum_gate = tl.zeros_like(sum_gate)
                sum_up = tl.zeros_like(sum_up)
        else:  # the step holds CHUNK // SUPER_GROUP whole groups: flush each, in order
            GROUPS: tl.constexpr = CHUNK // SUPER_GROUP
            groups = kb // SUPER_GROUP + tl.arange(0, GROUPS)
            if QUANTIZE_X:
                f_a = x_fs[None, :]
            else:
                f_a = tl.load(x_fs_ptr + token * NUM_GROUPS + groups)[None, :]
            if ONE_STEP:
                f_gate, f_up = f_gate_step, f_up_step
            else:
                f_gate = _step_fscales(gate_f, kb, stride_wfg, col_mask, CHUNK, SUPER_GROUP)
                f_up = _step_fscales(up_f, kb, stride_wfg, col_mask, CHUNK, SUPER_GROUP)
            sums_gate = tl.sum(tl.sum(tl.reshape(
                weighted_gate, [BLOCK_N, GROUPS, SUPER_GROUP, K4]), axis=2), axis=2)
            sums_up = tl.sum(tl.sum(tl.reshape(
                weighted_up, [BLOCK_N, GROUPS, SUPER_GROUP, K4]), axis=2), axis=2)
            acc_gate = _flush_groups(acc_gate, f_a * f_gate, sums_gate, GROUPS)
            acc_up = _flush_groups(acc_up, f_a * f_up, sums_up, GROUPS)

    # GEMM1's output dtype, then SiLU as the general path computes it.
    gate = to_output_dtype(acc_gate, GEMM_DTYPE).to(tl.float32)
    up = to_output_dtype(acc_up, GEMM_DTYPE).to(tl.float32)
    tl.store(h_ptr + pair.to(tl.int64) * stride_hm + cols, _silu_mul(gate, up), mask=col_mask)


@triton.jit
def _down_kernel(
        topk_ids_ptr, expert_map_ptr, topk_weights_ptr, h_q32_ptr, h_qs_ptr, h_fs_ptr,
        w32_ptr, w_qscale_ptr, w_fscale_ptr, out_ptr,
        num_pairs, num_experts, num_global_experts, hidden,
        stride_twm, stride_twj, stride_we, stride_wn, stride_wqe, stride_wqn,
        stride_wqk, stride_wfe, stride_wfn, stride_wfg, stride_om,
        HAS_EXPERT_MAP: tl.constexpr, TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr,
        NUM_BLOCKS: tl.constexpr, BLOCK_K: tl.constexpr, SUPER_GROUP: tl.constexpr,
        SCALE_BLOCK_N: tl.constexpr, BLOCK_OUT: tl.constexpr, CHUNK: tl.constexpr,
        GEMM_DTYPE: tl.constexpr, NUM_STAGES: tl.constexpr, GDC: tl.constexpr):
    """out[token, cols] = sum_j w_j * mm2_j[cols] for ``cols`` = BLOCK_OUT output columns.

    One loop step per CHUNK K-blocks of h, with the top_k pairs as a batch dimension so
    the weight rows of all of the token's experts stream at once; then ``unpermute``'s
    combine in order of j. A pair without a local expert adds nothing; an invalid id
    makes the token NaN.
    """
    token = tl.program_id(0)
    NUM_GROUPS: tl.constexpr = (NUM_BLOCKS + SUPER_GROUP - 1) // SUPER_GROUP
    slot = tl.arange(0, TOP_K_PAD)
    pairs = (token * TOP_K + slot).to(tl.int64)
    experts = _local_expert_ids(topk_ids_ptr, expert_map_ptr, pairs, num_pairs, num_experts,
                                num_global_experts, HAS_EXPERT_MAP)
    experts = tl.where(slot < TOP_K, experts, -1)
    kept = experts >= 0
    safe_experts = tl.maximum(experts, 0).to(tl.int64)
    K4: tl.constexpr = BLOCK_K // 4
    offs_k4 = tl.arange(0, K4)
    first_col = tl.program_id(1) * BLOCK_OUT
    cols = first_col + tl.arange(0, BLOCK_OUT)
    col_mask = cols < hidden
    w_rows = (w32_ptr + safe_experts[:, None] * stride_we
              + cols.to(tl.int64)[None, :] * stride_wn)  # [TOP_K_PAD, BLOCK_OUT]
    w_mask = (kept[:, None] & col_mask[None, :])
    q_rows = (w_qscale_ptr + safe_experts[:, None] * stride_wqe
              + (cols // SCALE_BLOCK_N)[None, :] * stride_wqn)
    f_rows = (w_fscale_ptr + safe_experts[:, None] * stride_wfe
              + (cols // SCALE_BLOCK_N)[None, :] * stride_wfn)
    h_rows4 = h_q32_ptr + pairs * (NUM_BLOCKS * K4)
    # As in _gate_up_kernel: one step loads the weights before the wait for h.
    ONE_STEP: tl.constexpr = NUM_STAGES == 1
    if not ONE_STEP:
        pdl_wait(GDC)  # the quantized h is the previous kernel's output

    acc = tl.zeros([TOP_K_PAD, BLOCK_OUT], tl.float32)
    group_sum = tl.zeros([TOP_K_PAD, BLOCK_OUT], tl.int32)
    offs_chunk = tl.arange(0, CHUNK)
    offs_ck4 = (offs_chunk * K4)[:, None] + offs_k4[None, :]  # [CHUNK, K4]: the chunk's K
    NUM_STEPS: tl.constexpr = (NUM_BLOCKS + CHUNK - 1) // CHUNK
    for chunk in tl.range(0, NUM_STEPS, num_stages=NUM_STAGES):
        kb = chunk * CHUNK  # first K-block of the chunk
        blocks = kb + offs_chunk
        in_k = _in_k(blocks, NUM_BLOCKS, CHUNK)
        # [TOP_K_PAD, BLOCK_OUT, CHUNK, K4]
        w = tl.load(w_rows[:, :, None, None] + kb * K4 + offs_ck4[None, None, :, :],
                    mask=w_mask[:, :, None, None] & in_k[None, None, :, None], other=0)
        q_w = tl.load(q_rows[:, :, None] + blocks[None, None, :] * stride_wqk,
                      mask=w_mask[:, :, None] & in_k[None, None, :], other=0)
        if ONE_STEP:  # the weights' F too: only h's rows come after the wait
            f_w_step = _step_fscales(f_rows, kb, stride_wfg, w_mask, CHUNK, SUPER_GROUP)
            pdl_wait(GDC)
        h4 = tl.load(h_rows4[:, None, None] + kb * K4 + offs_ck4[None, :, :],
                     mask=kept[:, None, None] & in_k[None, :, None],
                     other=0)  # [TOP_K_PAD, CHUNK, K4]
        q_a = tl.load(h_qs_ptr + pairs[:, None] * NUM_BLOCKS + blocks[None, :],
                      mask=kept[:, None] & in_k[None, :], other=0)  # [TOP_K_PAD, CHUNK]
        # Here the K-blocks of a step lie in one thread and the dots' K across threads:
        # summing each block's dot first (then weighting) compiles to less (SASS counts).
        weighted = tl.sum(_dot4(w, tl.broadcast_to(
            h4[:, None, :, :], [TOP_K_PAD, BLOCK_OUT, CHUNK, K4])), axis=3) * (
                q_a[:, None, :] * q_w)  # [TOP_K_PAD, BLOCK_OUT, CHUNK]
        if CHUNK <= SUPER_GROUP:  # the step lies in one group: flush at its last block
            group_sum += tl.sum(weighted, axis=2)
            if ((kb + CHUNK) % SUPER_GROUP == 0) | (kb + CHUNK >= NUM_BLOCKS):
                f_a = tl.load(h_fs_ptr + pairs * NUM_GROUPS + kb // SUPER_GROUP, mask=kept,
                              other=0.0)
                if ONE_STEP:
                    f_w = f_w_step
                else:
                    f_w = _step_fscales(f_rows, kb, stride_wfg, w_mask, CHUNK, SUPER_GROUP)
                acc = _flush(acc, f_a[:, None] * f_w, group_sum)
                group_sum = tl.zeros_like(group_sum)
        else:  # the step holds CHUNK // SUPER_GROUP whole groups: flush each, in order
            GROUPS: tl.constexpr = CHUNK // SUPER_GROUP
            groups = kb // SUPER_GROUP + tl.arange(0, GROUPS)
            f_a = tl.load(h_fs_ptr + pairs[:, None] * NUM_GROUPS + groups[None, :],
                          mask=kept[:, None], other=0.0)
            if ONE_STEP:
                f_w = f_w_step
            else:
                f_w = _step_fscales(f_rows, kb, stride_wfg, w_mask, CHUNK, SUPER_GROUP)
            acc = _flush_groups(
                acc, f_a[:, None, :] * f_w,
                tl.sum(tl.reshape(weighted, [TOP_K_PAD, BLOCK_OUT, GROUPS, SUPER_GROUP]),
                       axis=3), GROUPS)

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


def chunk_blocks(num_blocks: int, super_group_size: int, max_chunk: int,
                 max_one_step: int = 0) -> int:
    """K-blocks per loop step: the largest power of two <= ``max_chunk`` that divides the
    number of K-blocks and either divides the super group or is a multiple of it, so a
    step never straddles a group (it lies in one, or holds whole ones).

    Before that: all of K in one step padded to a power of two, when that is at most
    ``max(max_chunk, max_one_step)`` blocks and the step lies in one super group or holds
    whole ones with the padding in the last (6 K-blocks with G = 4 -> one step of 8:
    groups of 4 and 2 blocks, 2 masked). One step lets a kernel load its weights before
    it waits for the previous kernel (``_steps``)."""
    padded = triton.next_power_of_2(num_blocks)
    num_groups = -(-num_blocks // super_group_size)
    if padded <= max(max_chunk, max_one_step) and (
            padded <= super_group_size
            or (padded % super_group_size == 0 and padded // super_group_size == num_groups)):
        return padded
    chunk = 1
    while chunk * 2 <= max_chunk and num_blocks % (chunk * 2) == 0 and (
            super_group_size % (chunk * 2) == 0 or (chunk * 2) % super_group_size == 0):
        chunk *= 2
    return chunk


def _steps(num_blocks: int, chunk: int, stages: int) -> dict:
    """The loop's constexprs: one step runs unpipelined (NUM_STAGES 1: the kernel then
    loads its weights before it waits for the previous kernel)."""
    return dict(CHUNK=chunk, NUM_STAGES=1 if chunk >= num_blocks else stages)


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: compiled kernels on sm_90+."""
    return (not INTERPRETED and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _sm_count(device: torch.device) -> int | None:
    """SMs of a CUDA device (a cached property: no sync), None elsewhere."""
    if INTERPRETED or device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _wave_config(conf: dict, gate_up_programs: int, sm_count: int | None, fixed=(), *,
                 num_tokens: int = 0, hidden: int = 0, down_one_step: bool = False) -> dict:
    """``conf`` with the wave rule's entries, when ``conf["wave_rule"]``: ``one_wave``
    when gate/up's grid of ``gate_up_programs`` fits one wave of ``gate_up_resident``
    programs per SM; else ``wide_down`` when down runs one step and its grid at
    ``wide_down``'s BLOCK_OUT (``num_tokens`` x columns of ``hidden``) has at most one
    program per SM. Entries named in ``fixed`` (a caller's overrides) are kept. Compiled
    launches only (``sm_count`` None: unchanged); same results either way."""
    if not conf["wave_rule"] or sm_count is None:
        return conf
    if gate_up_programs <= conf["gate_up_resident"] * sm_count:
        rule = conf["one_wave"]
    elif down_one_step and (
            num_tokens * triton.cdiv(hidden, conf["wide_down"]["BLOCK_OUT"]) <= sm_count):
        rule = conf["wide_down"]
    else:
        return conf
    return dict(conf, **{key: value for key, value in rule.items() if key not in fixed})


def decode_fits(num_pairs: int, num_experts: int, expert_weight_bytes: int) -> bool:
    """Whether this path takes a call of ``num_pairs`` (token, expert) pairs over
    ``num_experts`` experts of ``expert_weight_bytes`` int8 weights each (w13 and w2):
    few pairs, no more pairs than experts, few weight bytes (``DECODE_CONFIG``). Host
    ints only."""
    conf = DECODE_CONFIG
    return (0 < num_pairs <= conf["max_pairs"]
            and num_pairs * conf["experts_per_pair"] <= num_experts
            and num_pairs * expert_weight_bytes <= conf["max_weight_bytes"])


def moe_forward_decode(hidden_states: torch.Tensor, weights, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor, *, expert_map: torch.Tensor | None = None,
                       config: dict | None = None, stage_callback=None) -> torch.Tensor:
    """The forward of ``forward.moe_forward_triton`` at ``act_block_m = 1`` (inputs
    validated by ``triton_moe.api``; ``topk_ids`` int32 [M, top_k]). ``config`` overrides
    ``DECODE_CONFIG`` entries; ``stage_callback("decode_down")`` is called between the
    gate/up half and the down half. No host sync."""
    cfg = weights.config
    conf = dict(DECODE_CONFIG, **(config or {}))
    num_tokens, top_k = topk_ids.shape
    hidden = hidden_states.shape[1]
    inter = weights.intermediate_size
    num_experts = weights.num_experts
    num_pairs = num_tokens * top_k
    gate_up_grid = (num_pairs, triton.cdiv(inter, conf["BLOCK_N"]))
    block_k = cfg.block_k
    # Down's loop steps, once: the wave rule reads them (it changes no step setting).
    down_blocks = inter // block_k
    down_steps = _steps(down_blocks, chunk_blocks(down_blocks, cfg.super_group_size,
                                                  conf["down_chunk"], conf["down_one_step"]),
                        conf["down_stages"])
    conf = _wave_config(conf, gate_up_grid[0] * gate_up_grid[1],
                        _sm_count(hidden_states.device), fixed=set(config or {}),
                        num_tokens=num_tokens, hidden=hidden,
                        down_one_step=down_steps["NUM_STAGES"] == 1)
    out = torch.empty_like(hidden_states)
    if num_tokens == 0:
        return out
    assert hidden % block_k == 0 and inter % block_k == 0 and block_k % 4 == 0
    assert hidden_states.stride(1) == 1, "rows of hidden_states must be contiguous"
    gemm_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
                  torch.float32: tl.float32}[hidden_states.dtype]
    if expert_map is None:
        map_arg, num_global, has_map = topk_ids, num_experts, False  # never read
    else:
        map_arg, num_global, has_map = expert_map, expert_map.numel(), True
    common = dict(HAS_EXPERT_MAP=has_map, TOP_K=top_k, BLOCK_K=block_k,
                  SUPER_GROUP=cfg.super_group_size, SCALE_BLOCK_N=cfg.block_n,
                  GEMM_DTYPE=gemm_dtype)

    w13 = weights.w13_q.view(torch.int32)  # [E, 2N, K // 4]
    w2 = weights.w2_q.view(torch.int32)  # [E, K, N // 4]
    pdl = conf["pdl"] and pdl_supported(hidden_states.device)
    pdl_launch = {"launch_pdl": True} if pdl else {}

    def regs(name):
        """A register cap for one kernel (compiled code only)."""
        cap = conf[name + "_maxnreg"]
        return {} if cap is None or INTERPRETED else {"maxnreg": cap}

    def quantize(rows: torch.Tensor, launch_pdl: bool):
        """Per-token int8 values (as int32, 4 per element), Q and F of every row."""
        values, qscale, fscale = quantize_rows(
            "rows", rows, rows.shape[0], rows.shape[1], None, block_k=block_k,
            q_max=cfg.q_max, super_group_size=cfg.super_group_size,
            scale_rounding=cfg.scale_rounding, gdc=pdl, launch_pdl=launch_pdl)
        return values.view(torch.int32), qscale, fscale

    # Launch order: x quantized (a plain launch; or inside gate/up, which is then the plain
    # launch), then gate/up, h quantized and down, each launched with PDL when ``pdl``: it
    # starts under the tail of the kernel before (which lets it start at once) and waits
    # for that kernel's output before reading it.
    h = torch.empty(num_pairs, inter, dtype=torch.float32, device=hidden_states.device)
    w13_qs, w13_fs = weights.w13_qscale, weights.w13_fscale
    num_blocks = hidden // block_k
    gate_up_steps = _steps(num_blocks, chunk_blocks(num_blocks, cfg.super_group_size,
                                                    conf["gate_up_chunk"],
                                                    conf["gate_up_one_step"]),
                           conf["gate_up_stages"])
    # x quantized by every gate/up program (one step over all of K in whole super groups)
    # or by a launch of its own before gate/up.
    quantize_x = (conf["quantize_x_in_gate_up"] and gate_up_steps["CHUNK"] == num_blocks
                  and num_blocks % cfg.super_group_size == 0)
    if quantize_x:  # gate/up is the first launch; the x_q* arguments are never read
        x_quantized = (hidden_states, hidden_states, hidden_states)
    else:
        x_quantized = quantize(hidden_states, False)
    _gate_up_kernel[gate_up_grid](
        topk_ids, map_arg, *x_quantized, w13, w13_qs, w13_fs, h, hidden_states,
        num_pairs, num_experts, num_global, inter,
        w13.stride(0), w13.stride(1), w13_qs.stride(0), w13_qs.stride(1), w13_qs.stride(2),
        w13_fs.stride(0), w13_fs.stride(1), w13_fs.stride(2), h.stride(0),
        hidden_states.stride(0), NUM_BLOCKS=num_blocks, BLOCK_N=conf["BLOCK_N"],
        **gate_up_steps, QUANTIZE_X=quantize_x, Q_MAX=cfg.q_max,
        ROUNDING=cfg.scale_rounding, num_warps=conf["gate_up_warps"], GDC=pdl, **common,
        **({} if quantize_x else pdl_launch), **regs("gate_up"))

    if stage_callback is not None:
        stage_callback("decode_down")
    w2_qs, w2_fs = weights.w2_qscale, weights.w2_fscale
    h_quantized = quantize(h, pdl)
    grid = (num_tokens, triton.cdiv(hidden, conf["BLOCK_OUT"]))
    _down_kernel[grid](
        topk_ids, map_arg, topk_weights, *h_quantized, w2, w2_qs, w2_fs, out,
        num_pairs, num_experts, num_global, hidden,
        topk_weights.stride(0), topk_weights.stride(1),
        w2.stride(0), w2.stride(1), w2_qs.stride(0), w2_qs.stride(1), w2_qs.stride(2),
        w2_fs.stride(0), w2_fs.stride(1), w2_fs.stride(2), out.stride(0),
        TOP_K_PAD=triton.next_power_of_2(top_k), NUM_BLOCKS=down_blocks,
        BLOCK_OUT=conf["BLOCK_OUT"], **down_steps,
        num_warps=conf["down_warps"], enable_fp_fusion=False, GDC=pdl, **common,
        **pdl_launch, **regs("down"))
    return out
