"""Activation quantization to blockwise INT8 with two-level (Q, F) scales (SPEC 4, 6).

One kernel family, three launchers that differ only in where a row's values come from:

* ``permute_quantize``: permuted row ``r`` gathers token row ``sorted_pair_ids[r] //
  top_k`` of ``hidden_states`` (the permutation gather fused into quantization, SPEC 6);
* ``quantize_activations``: rows already in permuted order;
* ``silu_mul_quantize``: ``gate / (1 + exp(-gate)) * up`` of GEMM1's output ``h [P, 2N]``.

The kernel here handles scale blocks of ``act_block_m > 1`` rows of one expert; with
per-token scales (``act_block_m == 1``) the launchers hand over to ``quant_per_token``,
whose rows are independent (same results).

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
# [BLOCK_ROWS, TILE_BLOCKS, BLOCK_K] tile of values at a time (plus the kept tile, see the
# kernel): a whole super group of K-blocks when it fits, then as many rows as fit in
# ``max_tile_values``. ``values_per_thread`` sets the warps (tile / 32 / values per
# thread): the SiLU mode inlines an fp64 exp per value, so it takes fewer per thread.
# Measured on an H200 at the 35B-A3B shape (bench/results/memory_stages_tuning.md):
# gather 4 rows x 512 columns on 4 warps (~54 registers) 230 us, 8 rows on 8 warps
# 235 us, 16 rows on 8 warps 256 us; SiLU 4 rows on 8 warps (64 registers) 217 us,
# 8 rows on 8 warps 228 us, 4 rows on 4 warps 321 us (168 registers, spills). Small
# batches have few rows per scale block: ``BLOCK_ROWS`` then follows the expected rows
# per expert (from P and E, no device value), so programs do not compute on masked rows.
ACT_QUANT_CONFIG = {
    "max_tile_values": {"plain": 2048, "gather": 2048, "silu": 2048},
    "values_per_thread": {"plain": 16, "gather": 16, "silu": 8},
}


# Round half to even for |v| < 2**22 as (v + RINT_MAGIC) - RINT_MAGIC (SPEC 4.3): adding
# 1.5 * 2**23 leaves no fraction bits, so the fp32 add itself rounds; exact in the
# interpreter and compiled (libdevice rint is not available in the interpreter). For
# |v| <= 2**22 the sum's bits are 0x4B400000 + rint(v): the integer without a float -> int
# conversion (a quarter-rate instruction on Hopper).
_RINT_MAGIC = tl.constexpr(12582912.0)  # bits 0x4B400000
# Near-tie margin of the reciprocal quantization, 4u|t| with u = 2**-24 (_quantize_fast).
_TIE_MARGIN = tl.constexpr(2.0**-22)
# Row tiles of a program that the near-tie bitmask tells apart (bit 62 stands for all
# later ones; 62 keeps the int64 mask positive, so it shifts down to 0).
_LAST_TIE_BIT = tl.constexpr(62)


@triton.jit
def _k_tile(tile_start, first_block, group_blocks, offs_t, offs_k, BLOCK_K: tl.constexpr):
    """The K-tile of a super group that starts at its block ``tile_start``: the tile's
    block indices in the group ``[TILE_BLOCKS]``, their columns ``[TILE_BLOCKS, BLOCK_K]``
    and which of them exist (blocks past ``group_blocks`` are padding)."""
    tile_blocks = tile_start + offs_t
    cols = (first_block + tile_blocks)[:, None] * BLOCK_K + offs_k[None, :]
    col_mask = (tile_blocks < group_blocks)[:, None] & (offs_k < BLOCK_K)[None, :]
    return tile_blocks, cols, col_mask


@triton.jit
def _load_rows(src_ptr, sorted_pair_ids_ptr, rows, row_mask, cols, col_mask, stride_src_m,
               num_cols, MODE: tl.constexpr, TOP_K: tl.constexpr, silu_table_ptr=None,
               SILU_TABLE: tl.constexpr = False):
    """Values ``[BLOCK_ROWS, TILE_BLOCKS, BLOCK_K]`` of the matrix being quantized at rows
    ``rows`` (int64; ``row_mask`` says which exist) and output columns ``cols`` (int32
    ``[TILE_BLOCKS, BLOCK_K]``), zero where masked: the source dtype for "plain",
    "gather" and "scatter" (converted where used, so a kept tile costs 16-bit registers),
    fp32 ``silu(gate) * up`` for "silu". In "gather", permuted row r reads token row
    ``sorted_pair_ids[r] // TOP_K``; otherwise row r itself. ``SILU_TABLE``: a 16-bit
    ``src`` whose ``gate / (1 + exp(-gate))`` is read from ``silu_table_ptr`` at the
    gate's bit pattern (``silu_gate_table``) instead of computed. Shared with
    ``quant_per_token``."""
    if MODE == "gather":
        pair = tl.load(sorted_pair_ids_ptr + rows, mask=row_mask, other=0)
        src_rows = pair.to(tl.int64) // TOP_K
    else:
        src_rows = rows
    ptrs = src_ptr + (src_rows * stride_src_m)[:, None, None] + cols[None, :, :]
    mask = row_mask[:, None, None] & col_mask[None, :, :]
    if MODE == "silu" and SILU_TABLE:
        # masked lanes read bits 0: table[0] = silu(0) = 0, as the computed path gives
        gate_bits = tl.load(ptrs, mask=mask, other=0.0).to(tl.int16, bitcast=True)
        silu_gate = tl.load(silu_table_ptr + (gate_bits.to(tl.int32) & 0xFFFF))
        up = tl.load(ptrs + num_cols, mask=mask, other=0.0).to(tl.float32)
        values = silu_gate * up
    elif MODE == "silu":
        gate = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(ptrs + num_cols, mask=mask, other=0.0).to(tl.float32)
        values = _silu_mul(gate, up)
    else:
        values = tl.load(ptrs, mask=mask, other=0.0)
    return values


# gate / (1 + exp(-gate)) of every 16-bit gate value, per (dtype, device): see
# silu_gate_table
_SILU_TABLES: dict = {}


def silu_gate_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """fp32 ``gate / (1 + exp(-gate))`` for each of the 65536 bit patterns of a bf16 / fp16
    gate (index = the bits as uint16), made by the oracle's own ``silu_mul`` (times an
    ``up`` of 1.0, exact), so a lookup returns the oracle's bits by construction. It
    replaces an fp64 exp, an fp32 IEEE division and their conversions per value in the
    SiLU quantization (SPEC 6). None for fp32 gates (too many values), and while a CUDA
    graph is being captured before the table exists (building it would be captured);
    the kernels then compute the same bits. Used by the per-token kernel only: in the
    tile-wise kernel (several passes over each value) the lookups made the SiLU slower
    (H100: 252 vs 215 us, 128-row tiles, default workload)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    key = (dtype, torch.device(device))
    table = _SILU_TABLES.get(key)
    if table is None:
        if key[1].type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        from reference.quant import silu_mul

        bits = torch.arange(65536, dtype=torch.int32, device=device)
        gate = torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16).view(dtype)
        table = silu_mul(torch.stack([gate, torch.ones_like(gate)], dim=1)).reshape(65536)
        table = _SILU_TABLES[key] = table.contiguous()
    return table


@triton.jit
def _silu_mul(gate, up):
    """``gate / (1 + exp(-gate)) * up`` in fp32, the oracle's bits
    (``reference.quant.silu_mul``): exp in fp64 rounded to fp32 (fp32 exp
    implementations differ in the last bit), one IEEE fp32 operation for each other step."""
    exp_neg_gate = tl.exp(-gate.to(tl.float64)).to(tl.float32)
    return tl.math.div_rn(gate, 1.0 + exp_neg_gate) * up


@triton.jit
def _group_scales(block_amax, any_nan, in_group, Q_MAX: tl.constexpr,
                  ROUNDING: tl.constexpr):
    """Scales of ``[R, GROUP_PAD]`` K-blocks, each row one super group (SPEC 4.2):
    ``block_amax`` fp32 absmax per block, ``any_nan`` [R] (non-zero: the row saw a NaN,
    which ``tl.max`` ignores), ``in_group`` which blocks exist (broadcasts to [R,
    GROUP_PAD]). Returns ``(F [R], Q int32 [R, GROUP_PAD], scale [R, GROUP_PAD])``:
    ``s = max(absmax / 127, eps)``, ``F = max s / q_max`` (NaN for a NaN row, as torch's
    ``amax`` gives in the oracle), ``Q`` by the rounding, and the scale the int8 values are
    quantized with (``Q*F``, or ``s`` for "nearest"); 1.0 at missing blocks. Shared by
    both quantization kernels (here: one scale row, R = 1; ``quant_per_token``: a tile of
    token rows)."""
    s = tl.maximum(tl.math.div_rn(block_amax, tl.full(block_amax.shape, 127.0, tl.float32)),
                   _SCALE_EPS)
    s = tl.where(in_group, s, 0.0)  # padding blocks must not raise F
    fscale = tl.math.div_rn(tl.max(s, axis=1), tl.full(any_nan.shape, Q_MAX * 1.0, tl.float32))
    fscale = tl.where(any_nan > 0, float("nan"), fscale)
    ratio = tl.math.div_rn(s, tl.broadcast_to(fscale[:, None], block_amax.shape))
    if ROUNDING == "consistent":
        qscale = tl.minimum(tl.maximum(tl.ceil(ratio), 1.0), Q_MAX)
        scale = qscale * fscale[:, None]  # >= s: nothing clips
    else:
        qscale = tl.minimum(tl.maximum((ratio + _RINT_MAGIC) - _RINT_MAGIC, 0.0), Q_MAX)
        scale = s  # int8 values keep s; the GEMM applies Q*F (reference design)
    scale = tl.where(in_group, scale, 1.0)
    return fscale, qscale.to(tl.int32), scale


@triton.jit
def _quantize_fast(values, inv_scale):
    """``(int8 rint(clamp(t, -128, 127)), tie_score)`` for ``t = RN(values * inv_scale)``,
    ``inv_scale = RN(1 / scale)``: the int8 values of SPEC 4.3 without a division per
    value, and per (tile row, K-block) a score ``>= 1/2`` (or NaN) where they may differ
    from the oracle's ``rint(clamp(RN(values / scale), -128, 127))``.

    ``t`` differs from ``RN(values / scale)`` by at most ``3u|t|(1 + 4u)`` (u = 2**-24:
    the reciprocal, the product and the oracle's quotient each round once), so the two
    round to the same integer unless ``t`` lies within that distance of a half-integer
    (the clamp bounds are integers: no boundary there). The score is the max over the
    block's values of ``|t - rint(t)| + 4u|t|``: the product is exact (a power of two)
    and the add rounds monotonically, so no value within ``4u|t|`` of a half-integer
    scores below 1/2. Random fp32 values (SiLU outputs) score 1/2 about once in 1e5;
    bf16 inputs more often: a value with the mantissa of its block's absmax A, at A / 2,
    lands within ulps of 63.5 wherever the scale is s = RN(A / 127). The integer is the low
    byte of ``t + RINT_MAGIC``'s bits (0x4B400000 ends in a zero byte): no
    float -> int conversion. Interpreter and compiled code agree (the one product that
    meets an add, and so may be fused, is exact).
    """
    t = tl.minimum(tl.maximum(values * inv_scale, -128.0), 127.0)
    biased = t + _RINT_MAGIC
    tie_score = tl.max(tl.abs(t - (biased - _RINT_MAGIC)) + tl.abs(t) * _TIE_MARGIN, axis=2)
    return biased.to(tl.int32, bitcast=True).to(tl.int8), tie_score


@triton.jit
def _quantize_exact(values, scale):
    """The oracle's ``int8(rint(clamp(RN(values / scale), -128, 127)))`` (SPEC 4.3); the
    integer is the low byte of ``scaled + RINT_MAGIC``'s bits (no float -> int conversion,
    an XU-pipe instruction: see ``_quantize_fast``)."""
    scaled = tl.minimum(tl.maximum(tl.math.div_rn(values, scale), -128.0), 127.0)
    return (scaled + _RINT_MAGIC).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _bitwise_or(a, b):
    return a | b


@triton.jit
def _quantize_act_kernel(
        src_ptr, sorted_pair_ids_ptr, expert_offsets_ptr, scale_row_offsets_ptr,
        a_q_ptr, a_qscale_ptr, a_fscale_ptr,
        num_cols, num_blocks, stride_src_m, stride_aqm, stride_qsm, stride_fsm,
        MODE: tl.constexpr, TOP_K: tl.constexpr, NUM_EXPERTS: tl.constexpr,
        E_PAD: tl.constexpr, ACT_BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        SUPER_GROUP: tl.constexpr, Q_MAX: tl.constexpr, ROUNDING: tl.constexpr,
        GROUP_PAD: tl.constexpr, TILE_BLOCKS: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Quantize one (scale row, super group) of permuted activations, ``ACT_BLOCK_M > 1``
    (per-token scales go to ``quant_per_token``, whose rows are independent).

    Program ``(srow, group)`` owns the rows of scale block ``srow`` (up to
    ``ACT_BLOCK_M`` rows of one expert, counted from the expert's segment start, SPEC 4.1)
    and the K-blocks ``[group * SUPER_GROUP, (group + 1) * SUPER_GROUP)``:

    1. Its expert is the number of experts whose scale rows end at or before ``srow``: a
       vector compare over ``scale_row_offsets``, no host sync. Programs past ``scale_row_offsets[E]`` (the grid is
       sized for the worst case) get no rows and store nothing.
    2. Pass 1 reads the super group in tiles of ``BLOCK_ROWS x TILE_BLOCKS x BLOCK_K``
       values and keeps a running absmax per (tile row, K-block); the rows are reduced
       once after the loop; then ``s``, ``F`` and ``Q`` follow (SPEC 4.2).
    3. Pass 2 writes the int8 values, with scale ``s`` ("nearest") or ``float32(Q) * F``
       ("consistent"), as a multiply by the block's reciprocal (``_quantize_fast``), and
       records in a bitmask the row tiles where that may differ from the IEEE quotient.
    4. Those tiles are read again and rewritten with the IEEE division
       (``_quantize_exact``): the oracle's bits in every case. Rare for SiLU values;
       frequent for bf16 inputs (see ``_quantize_fast``). The gather mode gained
       nothing from 3-4 at the 35B-A3B shape (it is not bound by arithmetic: the old
       kernel, with twice the instructions, ran as fast); the SiLU mode, bound by
       arithmetic, did.

    Inside the loops every reduction is over a tile's K axis, which Triton lays within a
    warp (16 values a thread, 8 threads a block row): shuffles, no barrier, so warps run
    independently and one warp's loads overlap another's arithmetic; the cross-warp
    reductions (over rows, and the near-tie bitmask) happen once per pass. (A first
    version reduced each pass-2 tile across warps: 6 barriers a tile, gather 50% slower.)

    When a tile spans the whole super group (the usual case), the last row tile of pass 1
    stays in registers and pass 2 starts with it: a scale block of one row tile (small
    batches) is read once, and that tile's SiLU is evaluated once; the
    other tiles are read again (from L2 mostly: the program just read them). A super
    group wider than ``TILE_BLOCKS`` (e.g. Mixtral's N = 14336 with G = 256) is walked
    in K-tiles, and per-block values move between a K-tile and the group vector through
    a one-hot compare.

    Every division is IEEE (``div_rn``; its operands must have equal shapes) and rounding
    is half to even, so the result is the oracle's bit for bit. Row offsets are int64
    (row * stride can pass 2**31); columns are int32. Interpreter cost explains
    ``tl.full`` over ``tl.zeros`` (a nested @jit call, slow there).
    """
    srow = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)

    # (1) Which expert, which rows.
    offs_e = tl.arange(0, E_PAD)
    srow_ends = tl.load(scale_row_offsets_ptr + 1 + offs_e, mask=offs_e < NUM_EXPERTS,
                        other=_INT32_MAX)
    expert = tl.minimum(tl.sum((srow_ends <= srow).to(tl.int32), axis=0), NUM_EXPERTS - 1)
    used = srow < tl.load(scale_row_offsets_ptr + NUM_EXPERTS)
    expert_srow = tl.load(scale_row_offsets_ptr + expert).to(tl.int64)
    row_start = tl.load(expert_offsets_ptr + expert).to(tl.int64) \
        + (srow - expert_srow) * ACT_BLOCK_M
    seg_end = tl.load(expert_offsets_ptr + expert + 1).to(tl.int64)
    row_end = tl.where(used, tl.minimum(row_start + ACT_BLOCK_M, seg_end), row_start)

    first_block = group * SUPER_GROUP
    group_blocks = tl.minimum(num_blocks - first_block, SUPER_GROUP)
    offs_r = tl.arange(0, BLOCK_ROWS).to(tl.int64)
    offs_t = tl.arange(0, TILE_BLOCKS)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, GROUP_PAD)
    in_group = offs_g < group_blocks
    ONE_TILE: tl.constexpr = TILE_BLOCKS == GROUP_PAD  # the whole super group in one tile
    if MODE == "silu":
        VALUE_DTYPE: tl.constexpr = tl.float32
    else:
        VALUE_DTYPE: tl.constexpr = src_ptr.dtype.element_ty

    # (2) Pass 1: absmax per K-block of the super group.
    block_amax = tl.full([GROUP_PAD], 0.0, tl.float32)
    kept = tl.full([BLOCK_ROWS, TILE_BLOCKS, BLOCK_K], 0.0, VALUE_DTYPE)
    kept_row = row_end  # first row of the kept tile; row_end: none (nothing to store)
    # tl.max ignores NaN, so NaN is tracked apart: it must poison the block's F (below),
    # never be quantized as a finite value (README: non-finite values).
    any_nan = 0
    tile_start = 0
    while tile_start < group_blocks:
        tile_blocks, cols, col_mask = _k_tile(tile_start, first_block, group_blocks,
                                              offs_t, offs_k, BLOCK_K)
        row_amax = tl.full([BLOCK_ROWS, TILE_BLOCKS], 0.0, tl.float32)
        row = row_start
        while row < row_end:
            rows = row + offs_r
            values = _load_rows(src_ptr, sorted_pair_ids_ptr, rows, rows < row_end, cols,
                                col_mask, stride_src_m, num_cols, MODE, TOP_K)
            values_f32 = values.to(tl.float32)
            row_amax = tl.maximum(row_amax, tl.max(tl.abs(values_f32), axis=2))
            any_nan = tl.maximum(any_nan, tl.max((values_f32 != values_f32).to(tl.int32)))
            if ONE_TILE:
                kept = values
                kept_row = row
            row += BLOCK_ROWS
        tile_amax = tl.max(row_amax, axis=0)
        if ONE_TILE:  # this loop ran once
            block_amax = tile_amax
        else:
            hit = offs_g[:, None] == tile_blocks[None, :]
            block_amax = tl.maximum(
                block_amax, tl.max(tl.where(hit, tile_amax[None, :], 0.0), axis=1))
        tile_start += TILE_BLOCKS

    # s, F, Q of this scale row's super group (SPEC 4.2), as a one-row [1, GROUP_PAD] tile.
    fscale, qscale, scale = _group_scales(block_amax[None, :],
                                          tl.full([1], any_nan, tl.int32), in_group[None, :],
                                          Q_MAX, ROUNDING)
    fscale = tl.max(fscale, axis=0)  # the one row's F (NaN kept: tl.max of one element)
    qscale = tl.reshape(qscale, [GROUP_PAD])
    scale = tl.reshape(scale, [GROUP_PAD])
    inv_scale = tl.math.div_rn(tl.full([GROUP_PAD], 1.0, tl.float32), scale)
    tl.store(a_qscale_ptr + srow * stride_qsm + first_block + offs_g, qscale,
             mask=in_group & used)
    tl.store(a_fscale_ptr + srow * stride_fsm + group, fscale, mask=used)

    # (3) Pass 2: int8 values by the reciprocal; tie_bits[r, b] bit i: row r of row tile
    # i (of the scale block) has a near tie in K-block b of the tile.
    tie_bits = tl.full([BLOCK_ROWS, TILE_BLOCKS], 0, tl.int64)
    tile_start = 0
    while tile_start < group_blocks:
        tile_blocks, cols, col_mask = _k_tile(tile_start, first_block, group_blocks,
                                              offs_t, offs_k, BLOCK_K)
        if ONE_TILE:
            tile_inv = inv_scale
        else:
            hit = offs_g[:, None] == tile_blocks[None, :]
            tile_inv = tl.max(tl.where(hit, inv_scale[:, None], 0.0), axis=0)
        tile_inv = tl.broadcast_to(tile_inv[None, :, None], [BLOCK_ROWS, TILE_BLOCKS, BLOCK_K])
        if ONE_TILE:  # the kept tile first (no load), then the tiles before it
            rows = kept_row + offs_r
            a_q, tie_score = _quantize_fast(kept.to(tl.float32), tile_inv)
            tl.store(a_q_ptr + (rows * stride_aqm)[:, None, None] + cols[None, :, :], a_q,
                     mask=(rows < row_end)[:, None, None] & col_mask[None, :, :])
            bit = tl.minimum((kept_row - row_start) // BLOCK_ROWS, _LAST_TIE_BIT)
            tie_bits |= (~(tie_score < 0.5)).to(tl.int64) << bit
            last_row = kept_row
        else:
            last_row = row_end
        row = row_start
        while row < last_row:
            rows = row + offs_r
            values = _load_rows(src_ptr, sorted_pair_ids_ptr, rows, rows < row_end, cols,
                                col_mask, stride_src_m, num_cols, MODE, TOP_K)
            a_q, tie_score = _quantize_fast(values.to(tl.float32), tile_inv)
            tl.store(a_q_ptr + (rows * stride_aqm)[:, None, None] + cols[None, :, :], a_q,
                     mask=(rows < row_end)[:, None, None] & col_mask[None, :, :])
            bit = tl.minimum((row - row_start) // BLOCK_ROWS, _LAST_TIE_BIT)
            tie_bits |= (~(tie_score < 0.5)).to(tl.int64) << bit
            row += BLOCK_ROWS
        tile_start += TILE_BLOCKS

    # (4) Rewrite the row tiles with a near tie through the IEEE division.
    ties = tl.reduce(tl.reduce(tie_bits, 1, _bitwise_or), 0, _bitwise_or)
    first = row_start
    while ties != 0:
        if (ties & 1) != 0:
            last = tl.where(ties == 1, row_end, tl.minimum(first + BLOCK_ROWS, row_end))
            tile_start = 0
            while tile_start < group_blocks:
                tile_blocks, cols, col_mask = _k_tile(tile_start, first_block, group_blocks,
                                                      offs_t, offs_k, BLOCK_K)
                hit = offs_g[:, None] == tile_blocks[None, :]
                tile_scale = tl.max(tl.where(hit, scale[:, None], 0.0), axis=0)
                tile_scale = tl.where(tile_blocks < group_blocks, tile_scale, 1.0)
                tile_scale = tl.broadcast_to(tile_scale[None, :, None],
                                             [BLOCK_ROWS, TILE_BLOCKS, BLOCK_K])
                row = first
                while row < last:
                    rows = row + offs_r
                    values = _load_rows(src_ptr, sorted_pair_ids_ptr, rows, rows < last, cols,
                                        col_mask, stride_src_m, num_cols, MODE, TOP_K)
                    tl.store(a_q_ptr + (rows * stride_aqm)[:, None, None] + cols[None, :, :],
                             _quantize_exact(values.to(tl.float32), tile_scale),
                             mask=(rows < last)[:, None, None] & col_mask[None, :, :])
                    row += BLOCK_ROWS
                tile_start += TILE_BLOCKS
        ties = ties >> 1
        first += BLOCK_ROWS


def act_quant_config(mode: str, act_block_m: int, num_blocks: int, super_group_size: int,
                     block_k: int, expected_rows: int | None = None) -> dict:
    """Tile shape and warps for one launch, from shapes only (no device values).

    ``expected_rows``: rows a scale block is expected to hold (the launchers pass twice
    the mean rows per expert, ``2 * ceil(P / E)``); ``None`` plans for ``act_block_m``.
    """
    rows = act_block_m if expected_rows is None else max(1, min(act_block_m, expected_rows))
    return tile_config(ACT_QUANT_CONFIG["max_tile_values"][mode],
                       ACT_QUANT_CONFIG["values_per_thread"][mode], num_blocks,
                       super_group_size, block_k, rows)


def tile_config(max_values: int, values_per_thread: int, num_blocks: int,
                super_group_size: int, block_k: int, rows: int) -> dict:
    """A [BLOCK_ROWS, TILE_BLOCKS, BLOCK_K] tile of at most ``max_values`` values: a whole
    super group when it fits, then as many rows as fit, no more than ``rows``; warps from
    ``values_per_thread``. Shared with ``quant_per_token``."""
    group_pad = triton.next_power_of_2(min(super_group_size, num_blocks))
    tile_blocks = min(group_pad, max(1, max_values // block_k))
    block_rows = min(triton.next_power_of_2(max(rows, 1)),
                     max(1, max_values // (tile_blocks * block_k)))
    threads = block_rows * tile_blocks * block_k // values_per_thread
    num_warps = min(16, max(1, triton.next_power_of_2(threads) // 32))
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
    if act_block_m == 1:
        # Per-token scales: rows are independent; quant_per_token tiles them (same bits).
        from triton_moe.quant_per_token import quantize_rows
        return quantize_rows(mode, src, num_pairs, num_cols, expert_offsets, top_k=top_k,
                             block_k=block_k, q_max=q_max, super_group_size=super_group_size,
                             scale_rounding=scale_rounding, sorted_pair_ids=sorted_pair_ids)
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
    config = act_quant_config(mode, act_block_m, num_blocks, super_group_size, block_k,
                              expected_rows=2 * -(-num_pairs // num_experts))
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
