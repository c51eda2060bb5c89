"""Activation quantization with per-token scales (``act_block_m = 1``, SPEC 4.1): a row is
its own scale block, so rows are independent and a program quantizes a tile of rows.

Same arithmetic as ``triton_moe.quant`` (oracle ``reference/quant.py``, bit for bit): per
row and K-block ``s = max(absmax / 127, eps)``, per row and super group ``F = max s /
q_max``, ``Q`` by the chosen rounding, int8 values by one IEEE division each. What a
per-token scale allows that a 128-row block does not:

* **Quantize each token once** (``quantize_scatter``, GEMM1's input): a token's int8 row
  and its scales do not depend on which expert the row goes to, so the kernel quantizes
  the ``M`` token rows and stores each result at the token's ``top_k`` permuted rows
  (``pair_to_row``). The blockwise path gathers and quantizes ``M * top_k`` rows, each
  read twice (``quant.py``); this reads every token once and does 1/top_k of the
  arithmetic.
* **One pass**: when a super group fits one tile (the default: 4 K-blocks of 128), the
  values stay in registers between the absmax and the quantization, so every value is
  loaded once (and the SiLU evaluated once). Wider super groups are walked in
  K-tiles, twice.

Modes: ``"scatter"`` (token rows -> ``pair_to_row``), ``"gather"`` (permuted row r reads
token ``sorted_pair_ids[r] // top_k``), ``"plain"`` (row r -> row r), ``"silu"``
(``silu(gate) * up`` of GEMM1's output ``h [P, 2N]``), ``"rows"`` (every row r of src ->
row r, no expert segments: ``triton_moe.decode``). ``triton_moe.quant``'s launchers send
``act_block_m == 1`` here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from reference.quant import SCALE_ROUNDINGS
from triton_moe.jit_utils import pdl_launch_dependents, pdl_wait
from triton_moe.quant import (_group_scales, _k_tile, _load_rows, _quantize_exact,
                               silu_gate_table, tile_config)

MODES = ("scatter", "gather", "plain", "silu", "rows")

# Configs as data: values a program holds per tile ([BLOCK_ROWS, TILE_BLOCKS, BLOCK_K])
# and values per thread (sets the warps). SiLU: "silu" looks its gate up in
# quant.silu_gate_table (16-bit h, the usual case); "silu_computed" (fp32 h, or a
# capture before the table exists) inlines an fp64 exp per value, so it takes fewer
# values per thread (as in triton_moe.quant). Measured on an H200 at the 35B-A3B shape
# (CUDA graph, us; tile values / values per thread): scatter 2048/16 60.8, 4096/16 61.1,
# 1024/16 59.6, 2048/8 62.5; computed SiLU 1024/8 113.4, 2048/8 117.7, 4096/8 129.0,
# 2048/4 148.2, 4096/16 132.2. Table SiLU, H100, session 8: 1024/16 71.7, 2048/16 73.2,
# 4096/16 77.1, 2048/8 84.6, 1024/8 86.8, 512/4 111.3, 1024/4 118.7; a later call 512/16
# 67.0, 1024/16 71.9, 512/8 82.4 (8192 rows: 11.2, 12.0, 12.2). "rows" (the decode path, a few rows, on its
# critical path): more programs and threads for the same values, H100, session 6, us of
# the whole decode forward: 512/4 against 2048/16, 35B-A3B 2 tokens 29.9 vs 31.3, 8
# tokens 73.0 vs 74.7; Qwen3-30B-A3B 2 tokens 39.4 vs 42.4 (decode_tuning.md).
PER_TOKEN_CONFIG = {
    "max_tile_values": {"scatter": 2048, "gather": 2048, "plain": 2048, "silu": 512,
                        "silu_computed": 1024, "rows": 512},
    "values_per_thread": {"scatter": 16, "gather": 16, "plain": 16, "silu": 16,
                          "silu_computed": 8, "rows": 4},
}


@triton.jit
def _tile_of_group(group_values, offs_g, tile_blocks):
    """``[BLOCK_ROWS, GROUP_PAD]`` per-block values -> the ``[BLOCK_ROWS, TILE_BLOCKS]``
    of the K-tile's blocks ``tile_blocks`` (a one-hot select: no gather)."""
    hit = offs_g[:, None] == tile_blocks[None, :]
    return tl.sum(tl.where(hit[None, :, :], group_values[:, :, None], 0.0), axis=1)


@triton.jit
def _quantize_rows_kernel(
        src_ptr, sorted_pair_ids_ptr, pair_to_row_ptr, expert_offsets_ptr,
        a_q_ptr, a_qscale_ptr, a_fscale_ptr, silu_table_ptr,
        num_src_rows, num_cols, num_blocks, stride_src_m, stride_aqm, stride_qsm,
        stride_fsm,
        MODE: tl.constexpr, TOP_K: tl.constexpr, NUM_EXPERTS: tl.constexpr,
        BLOCK_K: tl.constexpr, SUPER_GROUP: tl.constexpr, Q_MAX: tl.constexpr,
        ROUNDING: tl.constexpr, GROUP_PAD: tl.constexpr, TILE_BLOCKS: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, GDC: tl.constexpr, SILU_TABLE: tl.constexpr):
    """Quantize rows ``[pid0 * BLOCK_ROWS, +BLOCK_ROWS)`` over super group ``pid1``.

    Source rows are tokens ("scatter", ``num_src_rows`` = M), any ``num_src_rows`` rows
    ("rows") or permuted rows (the other modes: rows ``>= expert_offsets[E]`` are unused
    and skipped). Destinations: row r
    itself, or in "scatter" the ``top_k`` rows ``pair_to_row[r * top_k + j]`` that are
    ``>= 0`` (dropped pairs are not written).

    The K-tile loops are ``while`` loops: the Triton 3.6 interpreter fails on ``range``
    with a runtime bound under numpy >= 2.4 (pinned below, but GPU images ship newer).

    Pass 1 takes per (row, K-block) the absmax over each K-tile (reductions over the K
    axis, which Triton lays within a warp: no barrier), then ``s``, ``F`` and ``Q`` per row
    (SPEC 4.2). NaN is tracked apart (``tl.max`` ignores it) and makes the row's ``F``
    NaN, as torch's ``amax`` does in the oracle. Pass 2 divides by the block's scale
    (IEEE ``div_rn``) and rounds half to even: the oracle's bits. A super group that fits
    one K-tile (``ONE_TILE``) is loaded once and kept in registers between the passes.

    ``GDC``: let the next kernel start now, and wait for the previous one before reading
    (programmatic dependent launch, ``jit_utils``; the decode path).
    """
    pdl_launch_dependents(GDC)
    pdl_wait(GDC)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    group = tl.program_id(1)
    if MODE == "scatter" or MODE == "rows":
        row_mask = rows < num_src_rows
    else:
        row_mask = rows < tl.load(expert_offsets_ptr + NUM_EXPERTS)
    first_block = group * SUPER_GROUP
    group_blocks = tl.minimum(num_blocks - first_block, SUPER_GROUP)
    offs_t = tl.arange(0, TILE_BLOCKS)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, GROUP_PAD)
    in_group = offs_g < group_blocks
    ONE_TILE: tl.constexpr = TILE_BLOCKS == GROUP_PAD
    if MODE == "silu":
        VALUE_DTYPE: tl.constexpr = tl.float32
    else:
        VALUE_DTYPE: tl.constexpr = src_ptr.dtype.element_ty

    # Pass 1: absmax per (row, K-block of the group).
    block_amax = tl.full([BLOCK_ROWS, GROUP_PAD], 0.0, tl.float32)
    any_nan = tl.full([BLOCK_ROWS], 0, tl.int32)
    kept = tl.full([BLOCK_ROWS, TILE_BLOCKS, BLOCK_K], 0.0, VALUE_DTYPE)
    tile_start = 0
    while tile_start < group_blocks:
        tile_blocks, cols, col_mask = _k_tile(tile_start, first_block, group_blocks,
                                              offs_t, offs_k, BLOCK_K)
        values = _load_rows(src_ptr, sorted_pair_ids_ptr, rows, row_mask, cols, col_mask,
                            stride_src_m, num_cols, MODE, TOP_K, silu_table_ptr, SILU_TABLE)
        values_f32 = values.to(tl.float32)
        tile_amax = tl.max(tl.abs(values_f32), axis=2)
        any_nan = tl.maximum(any_nan, tl.max(tl.max((values_f32 != values_f32).to(tl.int32),
                                                    axis=2), axis=1))
        if ONE_TILE:  # this loop runs once
            block_amax = tile_amax
            kept = values
        else:
            hit = offs_g[:, None] == tile_blocks[None, :]
            block_amax = tl.maximum(block_amax, tl.max(
                tl.where(hit[None, :, :], tile_amax[:, None, :], 0.0), axis=2))
        tile_start += TILE_BLOCKS

    fscale, qscale, scale = _group_scales(block_amax, any_nan, in_group[None, :], Q_MAX,
                                          ROUNDING)

    # Pass 2: int8 values; stored (with Q and F) at every destination row.
    tile_start = 0
    while tile_start < group_blocks:
        tile_blocks, cols, col_mask = _k_tile(tile_start, first_block, group_blocks,
                                              offs_t, offs_k, BLOCK_K)
        if ONE_TILE:
            values = kept
            tile_scale = scale
        else:
            values = _load_rows(src_ptr, sorted_pair_ids_ptr, rows, row_mask, cols,
                                col_mask, stride_src_m, num_cols, MODE, TOP_K, silu_table_ptr,
                                SILU_TABLE)
            tile_scale = _tile_of_group(scale, offs_g, tile_blocks)
        tile_scale = tl.broadcast_to(tile_scale[:, :, None], [BLOCK_ROWS, TILE_BLOCKS, BLOCK_K])
        a_q = _quantize_exact(values.to(tl.float32), tile_scale)
        mask = col_mask[None, :, :]
        if MODE == "scatter":
            for j in tl.static_range(TOP_K):
                dest = tl.load(pair_to_row_ptr + rows * TOP_K + j, mask=row_mask, other=-1)
                tl.store(a_q_ptr + (dest.to(tl.int64) * stride_aqm)[:, None, None]
                         + cols[None, :, :], a_q, mask=(dest >= 0)[:, None, None] & mask)
        else:
            tl.store(a_q_ptr + (rows * stride_aqm)[:, None, None] + cols[None, :, :], a_q,
                     mask=row_mask[:, None, None] & mask)
        tile_start += TILE_BLOCKS

    scale_mask = in_group[None, :]
    if MODE == "scatter":
        for j in tl.static_range(TOP_K):
            dest = tl.load(pair_to_row_ptr + rows * TOP_K + j, mask=row_mask, other=-1)
            dest = dest.to(tl.int64)
            tl.store(a_qscale_ptr + (dest * stride_qsm)[:, None] + first_block + offs_g[None, :],
                     qscale, mask=(dest >= 0)[:, None] & scale_mask)
            tl.store(a_fscale_ptr + dest * stride_fsm + group, fscale, mask=dest >= 0)
    else:
        tl.store(a_qscale_ptr + (rows * stride_qsm)[:, None] + first_block + offs_g[None, :],
                 qscale, mask=row_mask[:, None] & scale_mask)
        tl.store(a_fscale_ptr + rows * stride_fsm + group, fscale, mask=row_mask)


def per_token_config(mode: str, num_blocks: int, super_group_size: int, block_k: int,
                     num_rows: int) -> dict:
    """Tile shape and warps from shapes only (``quant.tile_config``), no more rows than
    there are."""
    return tile_config(PER_TOKEN_CONFIG["max_tile_values"][mode],
                       PER_TOKEN_CONFIG["values_per_thread"][mode], num_blocks,
                       super_group_size, block_k, num_rows)


def quantize_rows(mode: str, src: torch.Tensor, num_pairs: int, num_cols: int,
                  expert_offsets: torch.Tensor | None, *, block_k: int, q_max: int,
                  super_group_size: int, scale_rounding: str, top_k: int = 1,
                  sorted_pair_ids: torch.Tensor | None = None,
                  pair_to_row: torch.Tensor | None = None, gdc: bool = False,
                  launch_pdl: bool = False,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token quantization into ``(a_q int8 [P, C], a_qscale int32 [P, C // block_k],
    a_fscale fp32 [P, SG])``: the outputs of ``triton_moe.quant``'s launchers at
    ``act_block_m = 1`` (scale row r = permuted row r), same bits.

    ``src``: token rows ``[M, C]`` ("scatter", with ``pair_to_row [M * top_k]``; also
    "gather", with ``sorted_pair_ids [P]``), permuted rows ``[P, C]`` ("plain"), or
    ``h [P, 2C]`` ("silu"), any rows ``[P, C]`` ("rows", ``expert_offsets`` None). Rows
    past ``expert_offsets[E]`` and rows no pair maps to are left unwritten. No host sync:
    the grid depends on shapes only. ``gdc`` / ``launch_pdl``: programmatic dependent
    launch (sm_90+, compiled only; ``triton_moe.decode``): the kernel lets the next one
    start early / is itself launched so.
    """
    assert mode in MODES, mode
    assert src.dtype in (torch.float32, torch.bfloat16, torch.float16), src.dtype
    assert src.stride(-1) == 1, "rows must be contiguous"
    assert scale_rounding in SCALE_ROUNDINGS, scale_rounding
    assert num_cols % block_k == 0 and block_k == triton.next_power_of_2(block_k), block_k
    if mode == "rows":  # every row of src, no expert segments
        assert expert_offsets is None and num_pairs == src.shape[0]
        expert_offsets, num_experts = src, 0  # never read
    else:
        assert expert_offsets.is_contiguous() and expert_offsets.numel() >= 2
        num_experts = expert_offsets.numel() - 1
    num_blocks = num_cols // block_k
    num_groups = -(-num_blocks // super_group_size)
    device = src.device
    a_q = torch.empty(num_pairs, num_cols, dtype=torch.int8, device=device)
    a_qscale = torch.empty(num_pairs, num_blocks, dtype=torch.int32, device=device)
    a_fscale = torch.empty(num_pairs, num_groups, dtype=torch.float32, device=device)
    num_src_rows = src.shape[0] if mode in ("scatter", "rows") else num_pairs
    if num_pairs == 0 or num_src_rows == 0 or num_groups == 0:
        return a_q, a_qscale, a_fscale
    if mode == "scatter":
        assert pair_to_row is not None and pair_to_row.dtype == torch.int32
        assert pair_to_row.is_contiguous() and pair_to_row.numel() == num_src_rows * top_k
    if mode == "gather":
        assert sorted_pair_ids is not None and sorted_pair_ids.is_contiguous()
    silu_table = silu_gate_table(src.dtype, device) if mode == "silu" else None
    config_mode = "silu_computed" if mode == "silu" and silu_table is None else mode
    config = per_token_config(config_mode, num_blocks, super_group_size, block_k,
                              num_src_rows)
    grid = (triton.cdiv(num_src_rows, config["BLOCK_ROWS"]), num_groups)
    _quantize_rows_kernel[grid](
        src, sorted_pair_ids if sorted_pair_ids is not None else expert_offsets,
        pair_to_row if pair_to_row is not None else expert_offsets, expert_offsets,
        a_q, a_qscale, a_fscale, silu_table if silu_table is not None else a_fscale,
        num_src_rows, num_cols, num_blocks, src.stride(0), a_q.stride(0),
        a_qscale.stride(0), a_fscale.stride(0),
        MODE=mode, TOP_K=top_k, NUM_EXPERTS=num_experts, BLOCK_K=block_k,
        SUPER_GROUP=super_group_size, Q_MAX=q_max, ROUNDING=scale_rounding, GDC=gdc,
        SILU_TABLE=silu_table is not None,
        **config, **({"launch_pdl": True} if launch_pdl else {}))
    return a_q, a_qscale, a_fscale


def quantize_scatter(hidden_states: torch.Tensor, pair_to_row: torch.Tensor,
                     expert_offsets: torch.Tensor, *, top_k: int, block_k: int, q_max: int,
                     super_group_size: int, scale_rounding: str,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GEMM1's input with per-token scales: quantize each token row of ``hidden_states
    [M, K]`` once and store it at its permuted rows ``pair_to_row[t * top_k + j]``
    (``triton_moe.permute``). Same result as ``quant.permute_quantize(...,
    act_block_m=1)``, with 1/top_k of the reads and the arithmetic."""
    return quantize_rows("scatter", hidden_states, pair_to_row.numel(), hidden_states.shape[1],
                         expert_offsets, top_k=top_k, block_k=block_k, q_max=q_max,
                         super_group_size=super_group_size, scale_rounding=scale_rounding,
                         pair_to_row=pair_to_row)
