"""Activation quantization to blockwise INT8 with two-level (Q, F) scales (SPEC 4, 6).

One kernel family, three launchers that differ only in where a row's values come from:

* ``permute_quantize``: permuted row ``r`` gathers token row ``sorted_pair_ids[r] //
  top_k`` of ``hidden_states`` (the permutation gather fused into quantization, SPEC 6);
* ``quantize_activations``: rows already in permuted order;
* ``silu_mul_quantize``: ``gate / (1 + exp(-gate)) * up`` of GEMM1's output ``h [P, 2N]``.

The arithmetic is docs/design.md, "Block scales and the (Q, F) factorization", bit for
bit: ``reference/quant.py`` is the oracle and the tests compare int8 values, Q and F
exactly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from reference.quant import SCALE_EPS, SCALE_ROUNDINGS, num_scale_rows

_SCALE_EPS = tl.constexpr(SCALE_EPS)
_INT32_MAX = tl.constexpr(2**31 - 1)

MODES = ("plain", "gather", "silu")

# Configs as data, chosen from shapes by ``act_quant_config``. A program holds one
# [BLOCK_ROWS, TILE_BLOCKS, BLOCK_K] tile of fp32 values at a time: a whole super group
# of K-blocks when it fits, then as many rows as fit. ``max_tile_values`` caps the tile
# (16K values = 64 registers a thread at 8 warps); the SiLU mode loads gate and up and
# inlines an fp64 exp per value, so its cap is a quarter (register pressure, code size).
# ``num_warps`` grows with the tile: (largest tile, warps), first match wins.
ACT_QUANT_CONFIG = {
    "max_tile_values": {"plain": 16384, "gather": 16384, "silu": 4096},
    "num_warps": ((2048, 2), (8192, 4), (1 << 62, 8)),
}


# Round half to even for |v| < 2**22 as (v + RINT_MAGIC) - RINT_MAGIC (SPEC 4.3): adding
# 1.5 * 2**23 leaves no fraction bits, so the fp32 add itself rounds; exact in the
# interpreter and compiled (libdevice rint is not available in the interpreter).
_RINT_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _load_values(src_ptr, sorted_pair_ids_ptr, rows, row_mask, cols, col_mask,
                 stride_src_m, num_cols, MODE: tl.constexpr, TOP_K: tl.constexpr):
    """fp32 values ``[BLOCK_ROWS, TILE_BLOCKS, BLOCK_K]`` of the matrix being quantized,
    zero where masked. ``rows`` (int64) are permuted rows, ``cols`` (int64,
    ``[TILE_BLOCKS, BLOCK_K]``) output columns."""
    if MODE == "gather":
        pair = tl.load(sorted_pair_ids_ptr + rows, mask=row_mask, other=0)
        src_rows = pair.to(tl.int64) // TOP_K
    else:
        src_rows = rows
    ptrs = src_ptr + src_rows[:, None, None] * stride_src_m + cols[None, :, :]
    mask = row_mask[:, None, None] & col_mask[None, :, :]
    if MODE == "silu":
        gate = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(ptrs + num_cols, mask=mask, other=0.0).to(tl.float32)
        # exp in fp64, rounded to fp32: the oracle's definition (reference.quant.silu_mul),
        # the same bits on every backend; fp32 exp implementations differ in the last bit.
        exp_neg_gate = tl.exp(-gate.to(tl.float64)).to(tl.float32)
        values = tl.math.div_rn(gate, 1.0 + exp_neg_gate) * up
    else:
        values = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return values


@triton.jit
def _quantize_act_kernel(
        src_ptr, sorted_pair_ids_ptr, expert_offsets_ptr, scale_row_offsets_ptr,
        a_q_ptr, a_qscale_ptr, a_fscale_ptr,
        num_cols, num_blocks, stride_src_m, stride_aqm, stride_qsm, stride_fsm,
        MODE: tl.constexpr, TOP_K: tl.constexpr, NUM_EXPERTS: tl.constexpr,
        E_PAD: tl.constexpr, ACT_BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        SUPER_GROUP: tl.constexpr, Q_MAX: tl.constexpr, ROUNDING: tl.constexpr,
        GROUP_PAD: tl.constexpr, TILE_BLOCKS: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Quantize one (scale row, super group) of permuted activations.

    Program ``(srow, group)`` owns the rows of scale block ``srow`` (up to
    ``ACT_BLOCK_M`` rows of one expert, counted from the expert's segment start, SPEC 4.1)
    and the K-blocks ``[group * SUPER_GROUP, (group + 1) * SUPER_GROUP)``:

    1. Its expert is the number of experts whose scale rows end at or before ``srow``: a
       vector compare over ``scale_row_offsets``, no host sync (per-token scales need
       none: scale row r is row r). Programs past ``scale_row_offsets[E]`` (the grid is
       sized for the worst case) get no rows and store nothing.
    2. Pass 1 reads the super group in tiles of ``BLOCK_ROWS x TILE_BLOCKS x BLOCK_K``
       values and keeps each K-block's absmax; then ``s``, ``F`` and ``Q`` follow
       (SPEC 4.2, "nearest" or "consistent").
    3. Pass 2 reads the same values again (from L2) and writes the int8 values, with
       scale ``s`` ("nearest") or ``float32(Q) * F`` ("consistent").

    Every division is IEEE (``div_rn``; its operands must have equal shapes) and rounding
    is half to even, so the result is the oracle's bit for bit. A super group wider than
    one tile (``TILE_BLOCKS < GROUP_PAD``) moves per-block values between the tile and
    the group vector through a one-hot compare. Index math is int64: no row * stride
    product can wrap, and the interpreter skips its int32 overflow checks. Interpreter
    cost also explains ``tl.full`` over ``tl.zeros`` (a nested @jit call, slow there);
    loops are ``while`` loops because the Triton 3.6 interpreter cannot take a runtime
    ``range`` bound under numpy >= 2.4.
    """
    srow = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)

    # (1) Which expert, which rows.
    if ACT_BLOCK_M == 1:
        # Per-token scales: scale row r is permuted row r, whatever its expert.
        used = srow < tl.load(expert_offsets_ptr + NUM_EXPERTS)
        row_start = srow
        row_end = tl.where(used, srow + 1, srow)
    else:
        offs_e = tl.arange(0, E_PAD)
        srow_ends = tl.load(scale_row_offsets_ptr + 1 + offs_e, mask=offs_e < NUM_EXPERTS,
                            other=_INT32_MAX)
        expert = tl.minimum(tl.sum((srow_ends <= srow).to(tl.int32), axis=0),
                            NUM_EXPERTS - 1)
        used = srow < tl.load(scale_row_offsets_ptr + NUM_EXPERTS)
        expert_srow = tl.load(scale_row_offsets_ptr + expert).to(tl.int64)
        row_start = tl.load(expert_offsets_ptr + expert).to(tl.int64) \
            + (srow - expert_srow) * ACT_BLOCK_M
        seg_end = tl.load(expert_offsets_ptr + expert + 1).to(tl.int64)
        row_end = tl.where(used, tl.minimum(row_start + ACT_BLOCK_M, seg_end), row_start)

    first_block = group * SUPER_GROUP
    group_blocks = tl.minimum(num_blocks - first_block, SUPER_GROUP)
    offs_r = tl.arange(0, BLOCK_ROWS).to(tl.int64)
    offs_t = tl.arange(0, TILE_BLOCKS).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    offs_g = tl.arange(0, GROUP_PAD).to(tl.int64)
    in_group = offs_g < group_blocks

    # (2) Pass 1: absmax per K-block of the super group.
    block_amax = tl.full([GROUP_PAD], 0.0, tl.float32)
    tile_start = 0
    while tile_start < group_blocks:
        tile_blocks = tile_start + offs_t
        cols = (first_block + tile_blocks)[:, None] * BLOCK_K + offs_k[None, :]
        col_mask = (tile_blocks < group_blocks)[:, None] & (offs_k < BLOCK_K)[None, :]
        tile_amax = tl.full([TILE_BLOCKS], 0.0, tl.float32)
        row = row_start
        while row < row_end:
            rows = row + offs_r
            values = _load_values(src_ptr, sorted_pair_ids_ptr, rows, rows < row_end, cols,
                                  col_mask, stride_src_m, num_cols, MODE, TOP_K)
            tile_amax = tl.maximum(tile_amax, tl.max(tl.max(tl.abs(values), axis=2), axis=0))
            row += BLOCK_ROWS
        if TILE_BLOCKS == GROUP_PAD:  # the whole group in one tile: this loop ran once
            block_amax = tile_amax
        else:
            hit = offs_g[:, None] == tile_blocks[None, :]
            block_amax = tl.maximum(
                block_amax, tl.max(tl.where(hit, tile_amax[None, :], 0.0), axis=1))
        tile_start += TILE_BLOCKS

    # s = max(absmax / 127, eps); F = max_g s / q_max; Q by the chosen rounding (SPEC 4.2).
    s = tl.maximum(tl.math.div_rn(block_amax, tl.full([GROUP_PAD], 127.0, tl.float32)),
                   _SCALE_EPS)
    s = tl.where(in_group, s, 0.0)  # padding blocks must not raise F
    fscale = tl.math.div_rn(tl.max(s, axis=0), Q_MAX * 1.0)
    ratio = tl.math.div_rn(s, tl.full([GROUP_PAD], fscale, tl.float32))
    if ROUNDING == "consistent":
        qscale = tl.minimum(tl.maximum(tl.ceil(ratio), 1.0), Q_MAX)
        scale = qscale * fscale  # >= s: nothing clips
    else:
        qscale = tl.minimum(tl.maximum((ratio + _RINT_MAGIC) - _RINT_MAGIC, 0.0), Q_MAX)
        scale = s  # int8 values keep s; the GEMM applies Q*F (reference design)
    scale = tl.where(in_group, scale, 1.0)
    tl.store(a_qscale_ptr + srow * stride_qsm + first_block + offs_g, qscale.to(tl.int32),
             mask=in_group & used)
    tl.store(a_fscale_ptr + srow * stride_fsm + group, fscale, mask=used)

    # (3) Pass 2: int8 values, q = rint(clamp(x / scale, -128, 127)) (SPEC 4.3).
    tile_start = 0
    while tile_start < group_blocks:
        tile_blocks = tile_start + offs_t
        cols = (first_block + tile_blocks)[:, None] * BLOCK_K + offs_k[None, :]
        col_mask = (tile_blocks < group_blocks)[:, None] & (offs_k < BLOCK_K)[None, :]
        if TILE_BLOCKS == GROUP_PAD:
            tile_scale = scale
        else:
            hit = offs_g[:, None] == tile_blocks[None, :]
            tile_scale = tl.max(tl.where(hit, scale[:, None], 0.0), axis=0)
            tile_scale = tl.where(tile_blocks < group_blocks, tile_scale, 1.0)
        tile_scale = tl.broadcast_to(tile_scale[None, :, None],
                                     [BLOCK_ROWS, TILE_BLOCKS, BLOCK_K])
        row = row_start
        while row < row_end:
            rows = row + offs_r
            row_mask = rows < row_end
            values = _load_values(src_ptr, sorted_pair_ids_ptr, rows, row_mask, cols,
                                  col_mask, stride_src_m, num_cols, MODE, TOP_K)
            scaled = tl.minimum(tl.maximum(tl.math.div_rn(values, tile_scale), -128.0), 127.0)
            a_q = ((scaled + _RINT_MAGIC) - _RINT_MAGIC).to(tl.int8)
            a_q_ptrs = a_q_ptr + rows[:, None, None] * stride_aqm + cols[None, :, :]
            tl.store(a_q_ptrs, a_q, mask=row_mask[:, None, None] & col_mask[None, :, :])
            row += BLOCK_ROWS
        tile_start += TILE_BLOCKS


def act_quant_config(mode: str, act_block_m: int, num_blocks: int, super_group_size: int,
                     block_k: int) -> dict:
    """Tile shape and warps for one launch, from shapes only (no device values)."""
    max_values = ACT_QUANT_CONFIG["max_tile_values"][mode]
    group_pad = triton.next_power_of_2(min(super_group_size, num_blocks))
    tile_blocks = min(group_pad, max(1, max_values // block_k))
    block_rows = min(triton.next_power_of_2(act_block_m),
                     max(1, max_values // (tile_blocks * block_k)))
    tile_values = block_rows * tile_blocks * block_k
    num_warps = next(w for limit, w in ACT_QUANT_CONFIG["num_warps"] if tile_values <= limit)
    return dict(GROUP_PAD=group_pad, TILE_BLOCKS=tile_blocks, BLOCK_ROWS=block_rows,
                num_warps=num_warps)


def _launch(mode: str, src: torch.Tensor, num_pairs: int, num_cols: int,
            sorted_pair_ids: torch.Tensor | None, expert_offsets: torch.Tensor,
            scale_row_offsets: torch.Tensor, *, top_k: int, act_block_m: int, block_k: int,
            q_max: int, super_group_size: int, scale_rounding: str,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Allocate the outputs (sized from P, E, C only) and launch one program per
    (scale row, super group)."""
    assert src.dtype in (torch.float32, torch.bfloat16, torch.float16), src.dtype
    assert src.stride(-1) == 1, "rows must be contiguous"
    assert scale_rounding in SCALE_ROUNDINGS, scale_rounding
    assert num_cols % block_k == 0 and block_k == triton.next_power_of_2(block_k), block_k
    assert expert_offsets.is_contiguous() and scale_row_offsets.is_contiguous()
    assert expert_offsets.numel() == scale_row_offsets.numel() >= 2
    num_experts = expert_offsets.numel() - 1
    num_blocks = num_cols // block_k
    num_groups = -(-num_blocks // super_group_size)
    num_srows = num_scale_rows(num_pairs, num_experts, act_block_m)
    device = src.device
    a_q = torch.empty(num_pairs, num_cols, dtype=torch.int8, device=device)
    a_qscale = torch.empty(num_srows, num_blocks, dtype=torch.int32, device=device)
    a_fscale = torch.empty(num_srows, num_groups, dtype=torch.float32, device=device)
    if num_srows == 0 or num_groups == 0:
        return a_q, a_qscale, a_fscale
    if sorted_pair_ids is None:
        sorted_pair_ids = expert_offsets  # never read outside the gather mode
    config = act_quant_config(mode, act_block_m, num_blocks, super_group_size, block_k)
    _quantize_act_kernel[(num_srows, num_groups)](
        src, sorted_pair_ids, expert_offsets, scale_row_offsets,
        a_q, a_qscale, a_fscale,
        num_cols, num_blocks, src.stride(0), a_q.stride(0), a_qscale.stride(0),
        a_fscale.stride(0),
        MODE=mode, TOP_K=top_k, NUM_EXPERTS=num_experts,
        E_PAD=triton.next_power_of_2(num_experts), ACT_BLOCK_M=act_block_m,
        BLOCK_K=block_k, SUPER_GROUP=super_group_size, Q_MAX=q_max,
        ROUNDING=scale_rounding, **config)
    return a_q, a_qscale, a_fscale


def permute_quantize(hidden_states: torch.Tensor, sorted_pair_ids: torch.Tensor,
                     expert_offsets: torch.Tensor, scale_row_offsets: torch.Tensor, *,
                     top_k: int, act_block_m: int, block_k: int, q_max: int,
                     super_group_size: int, scale_rounding: str,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather token rows into expert order and quantize them, in one pass (SPEC 3, 4).

    ``hidden_states [M, K]`` fp32/bf16/fp16; permuted row ``r < expert_offsets[E]``
    reads token ``sorted_pair_ids[r] // top_k``. Returns ``(a_q int8 [P, K],
    a_qscale int32 [S, K // block_k], a_fscale fp32 [S, SG])`` with ``P =
    sorted_pair_ids.numel()`` and ``S = num_scale_rows(P, E, act_block_m)``; rows past
    ``expert_offsets[E]`` and unused scale rows are left unwritten. No permuted copy of
    the activations is made: a token's row is read from HBM once per pair routed to it
    (its second pass comes from L2), never written back in high precision.
    """
    assert sorted_pair_ids.is_contiguous()
    return _launch("gather", hidden_states, sorted_pair_ids.numel(), hidden_states.shape[1],
                   sorted_pair_ids, expert_offsets, scale_row_offsets, top_k=top_k,
                   act_block_m=act_block_m, block_k=block_k, q_max=q_max,
                   super_group_size=super_group_size, scale_rounding=scale_rounding)


def quantize_activations(x: torch.Tensor, expert_offsets: torch.Tensor,
                         scale_row_offsets: torch.Tensor, *, act_block_m: int, block_k: int,
                         q_max: int, super_group_size: int, scale_rounding: str,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize permuted rows ``x [P, C]`` per expert segment (SPEC 4.1); outputs as
    ``permute_quantize`` with ``C`` columns."""
    return _launch("plain", x, x.shape[0], x.shape[1], None, expert_offsets,
                   scale_row_offsets, top_k=1, act_block_m=act_block_m, block_k=block_k,
                   q_max=q_max, super_group_size=super_group_size,
                   scale_rounding=scale_rounding)


def silu_mul_quantize(h: torch.Tensor, expert_offsets: torch.Tensor,
                      scale_row_offsets: torch.Tensor, *, act_block_m: int, block_k: int,
                      q_max: int, super_group_size: int, scale_rounding: str,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``a = silu(h[:, :N]) * h[:, N:]`` of GEMM1's output ``h [P, 2N]`` in one
    pass (SPEC 6; formula of ``reference.quant.silu_mul``); outputs as ``permute_quantize``
    with ``N`` columns."""
    assert h.shape[1] % 2 == 0, h.shape
    return _launch("silu", h, h.shape[0], h.shape[1] // 2, None, expert_offsets,
                   scale_row_offsets, top_k=1, act_block_m=act_block_m, block_k=block_k,
                   q_max=q_max, super_group_size=super_group_size,
                   scale_rounding=scale_rounding)
