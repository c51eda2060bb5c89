"""Permutation of (token, expert) pairs into expert-contiguous rows, on the device (SPEC 3).

A stable counting sort in three launches, none of which reads anything back to the host:

1. ``_block_histogram_kernel`` (one program per block of ``BLOCK_P`` pairs): how many
   pairs of the block go to each expert. Blocks are independent, so this is the parallel
   part of the count.
2. ``_expert_scan_kernel`` (one program per few experts): scans each expert's per-block
   counts in block order, turning them into the expert-relative row where each block's
   pairs start, and totals ``expert_counts``. Splitting the scan by expert keeps many
   programs busy instead of one program walking the whole ``E x blocks`` table.
3. ``_scatter_kernel`` (one program per block again): every program prefix-sums the
   ``E`` counts (cheap, ``E <= 512``) to get the expert start rows; program 0 also writes
   ``expert_offsets`` and ``scale_row_offsets``. Each pair's row is
   ``expert start + block start within the expert + rank within the block``, where the
   rank counts the earlier pairs of the block with the same expert; the kernel writes
   ``pair_to_row``, ``sorted_pair_ids`` and the ``-1`` tail of ``sorted_pair_ids``.

Small batches (at most ``SINGLE_BLOCK_CONFIG["MAX_PAIRS"]`` pairs) take one launch: a
single program of kernel 3 counts its pairs itself (``SINGLE_BLOCK``).

Blocks are taken in order and ranks ascend with the pair index, so the order inside an
expert is ascending pair index: the result is bit-identical to the stable sort of
``reference.permute``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from reference.permute import INVALID_PAIR as _INVALID_PAIR
from reference.permute import Permutation

INVALID_PAIR = tl.constexpr(_INVALID_PAIR)

# Configs as data. BLOCK_P: pairs per program of kernels 1 and 3; the in-block rank is a
# BLOCK_P x BLOCK_P comparison, so BLOCK_P stays small. 64 pairs on 2 warps measured
# best (H200, P = 65536, E = 256, CUDA graph: 13.1 us for the three kernels against
# 15.4 us at 128 pairs / 4 warps, 17.3 us at 256 / 4; bench/results/
# memory_stages_tuning.md): the scatter's rank matrix shrinks 4x, and twice the programs
# keep more SMs busy. The scan (kernel 2) holds a tile of SCAN_TILE counts, experts x
# blocks: up to MAX_SCAN_BLOCK blocks per step (P = 8192 * 8 pairs is 1024 blocks: one
# step) and as many experts as fill the rest of the tile.
PERMUTE_CONFIG = {"BLOCK_P": 64, "num_warps": 2}
# Up to this many pairs (M <= 32 tokens at top-8), one program of the scatter kernel does
# everything (SINGLE_BLOCK): one launch instead of three on the decode path. Its rank
# matrix is P x P, so the bound stays small.
SINGLE_BLOCK_CONFIG = {"MAX_PAIRS": 256, "num_warps": 8}
SCAN_CONFIG = {"SCAN_TILE": 4096, "MAX_SCAN_BLOCK": 1024, "num_warps": 4}


def _scan_shape(num_experts: int, num_blocks: int) -> tuple[int, int]:
    """(EXPERTS_PER_PROGRAM, SCAN_BLOCK) for the scan, from the shape alone."""
    scan_block = min(triton.next_power_of_2(num_blocks), SCAN_CONFIG["MAX_SCAN_BLOCK"])
    experts = min(triton.next_power_of_2(num_experts),
                  max(1, SCAN_CONFIG["SCAN_TILE"] // scan_block))
    return experts, scan_block


@triton.jit
def _local_expert_ids(topk_ids_ptr, expert_map_ptr, offs_p, num_pairs, num_experts,
                      num_global_experts, HAS_EXPERT_MAP: tl.constexpr):
    """Local expert (int32) of the pairs ``offs_p``: -1 where ``expert_map`` drops the
    pair (or past the end), INVALID_PAIR (-2) where the id is out of range.

    A bad id must neither index out of bounds nor vanish silently: it is routed nowhere
    and marked, and un-permute turns the marked token's output into NaN. (Rejecting it
    with an exception would need a host sync; the API does that on CPU or when asked.)
    """
    in_range = offs_p < num_pairs
    ids = tl.load(topk_ids_ptr + offs_p, mask=in_range, other=-1)  # int32 or int64
    bad = in_range & ((ids < 0) | (ids >= num_global_experts))
    if HAS_EXPERT_MAP:
        ids = tl.load(expert_map_ptr + ids, mask=in_range & ~bad, other=-1)
        bad = bad | (in_range & ((ids < -1) | (ids >= num_experts)))
    local = tl.where((ids >= 0) & (ids < num_experts), ids, -1)
    return tl.where(bad, INVALID_PAIR, local).to(tl.int32)


@triton.jit
def _block_histogram_kernel(topk_ids_ptr, expert_map_ptr, block_counts_ptr,
                            num_pairs, num_experts, num_global_experts, num_blocks,
                            HAS_EXPERT_MAP: tl.constexpr, BLOCK_P: tl.constexpr,
                            E_PAD: tl.constexpr):
    """block_counts[e, b] = number of pairs of block b routed to local expert e.

    The table is expert-major ([E, num_blocks]) so that the per-expert scan of kernel 2
    reads one contiguous row. Every entry is written here (zeros included), so the
    buffer needs no initialization.
    """
    block = tl.program_id(0)
    offs_p = block * BLOCK_P + tl.arange(0, BLOCK_P)
    local = _local_expert_ids(topk_ids_ptr, expert_map_ptr, offs_p, num_pairs, num_experts,
                              num_global_experts, HAS_EXPERT_MAP)
    valid = local >= 0
    counts = tl.histogram(tl.where(valid, local, 0), E_PAD, mask=valid)
    offs_e = tl.arange(0, E_PAD)
    tl.store(block_counts_ptr + offs_e.to(tl.int64) * num_blocks + block, counts,
             mask=offs_e < num_experts)


@triton.jit
def _expert_scan_kernel(block_counts_ptr, expert_counts_ptr, num_experts, num_blocks,
                        EXPERTS_PER_PROGRAM: tl.constexpr, SCAN_BLOCK: tl.constexpr):
    """For each expert e of this program:
    block_counts[e, b] <- sum_{b' < b} block_counts[e, b'] (in place), and
    expert_counts[e] <- the sum over all blocks.

    The exclusive prefix runs over blocks in block order: this is what keeps the sort
    stable across blocks. A program scans EXPERTS_PER_PROGRAM rows at once, SCAN_BLOCK
    blocks per step (a [EXPERTS_PER_PROGRAM, SCAN_BLOCK] tile of counts).
    """
    offs_e = tl.program_id(0) * EXPERTS_PER_PROGRAM + tl.arange(0, EXPERTS_PER_PROGRAM)
    mask_e = offs_e < num_experts
    rows_ptr = block_counts_ptr + offs_e[:, None].to(tl.int64) * num_blocks
    running = tl.zeros([EXPERTS_PER_PROGRAM], dtype=tl.int32)
    # A while loop, not range(): the Triton 3.6 interpreter cannot take a runtime loop
    # bound under numpy >= 2.4 (it calls int() on a 1-element array).
    start = 0
    while start < num_blocks:
        offs_b = start + tl.arange(0, SCAN_BLOCK)
        mask = mask_e[:, None] & (offs_b[None, :] < num_blocks)
        counts = tl.load(rows_ptr + offs_b[None, :], mask=mask, other=0)
        inclusive = tl.cumsum(counts, axis=1)
        tl.store(rows_ptr + offs_b[None, :], running[:, None] + inclusive - counts, mask=mask)
        running += tl.sum(counts, axis=1)
        start += SCAN_BLOCK
    tl.store(expert_counts_ptr + offs_e, running, mask=mask_e)


@triton.jit
def _scatter_kernel(topk_ids_ptr, expert_map_ptr, block_starts_ptr, expert_counts_ptr,
                    expert_offsets_ptr, scale_row_offsets_ptr, sorted_pair_ids_ptr,
                    pair_to_row_ptr, num_pairs, num_experts, num_global_experts, num_blocks,
                    act_block_m, HAS_EXPERT_MAP: tl.constexpr, BLOCK_P: tl.constexpr,
                    E_PAD: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    """Row of every pair: expert start + block start within the expert + in-block rank.

    ``SINGLE_BLOCK``: all pairs fit this one program (small batches), which then counts
    them itself (kernels 1 and 2 are not launched: two launch latencies saved on the
    decode path); every block start is 0.

    The expert starts are an exclusive prefix sum of the E counts; every program computes
    it (E_PAD values, cheaper than another launch) and takes its pairs' entries with
    tl.gather; program 0 stores expert_offsets and scale_row_offsets (SPEC 4.1: expert e
    owns ceil(count_e / act_block_m) scale rows). The in-block rank counts the earlier
    pairs of the block with the same expert (a BLOCK_P x BLOCK_P comparison).
    Rows >= R = expert_offsets[E] of sorted_pair_ids are set to -1 here, each program
    covering the rows numbered like its pairs, so the buffer needs no initialization.
    """
    block = tl.program_id(0)
    offs_p = block * BLOCK_P + tl.arange(0, BLOCK_P)
    in_range = offs_p < num_pairs
    local = _local_expert_ids(topk_ids_ptr, expert_map_ptr, offs_p, num_pairs, num_experts,
                              num_global_experts, HAS_EXPERT_MAP)
    valid = local >= 0
    safe_local = tl.where(valid, local, 0)

    offs_e = tl.arange(0, E_PAD)
    mask_e = offs_e < num_experts
    if SINGLE_BLOCK:
        counts = tl.histogram(safe_local, E_PAD, mask=valid)
        tl.store(expert_counts_ptr + offs_e, counts, mask=mask_e)
    else:
        counts = tl.load(expert_counts_ptr + offs_e, mask=mask_e, other=0)
    expert_ends = tl.cumsum(counts, axis=0)
    expert_starts = expert_ends - counts
    num_rows = tl.sum(counts, axis=0)
    if block == 0:
        tl.store(expert_offsets_ptr, 0)
        tl.store(expert_offsets_ptr + 1 + offs_e, expert_ends, mask=mask_e)
        scale_blocks = (counts + act_block_m - 1) // act_block_m
        tl.store(scale_row_offsets_ptr, 0)
        tl.store(scale_row_offsets_ptr + 1 + offs_e, tl.cumsum(scale_blocks, axis=0),
                 mask=mask_e)

    # Rank among the earlier pairs of this block that go to the same expert.
    idx = tl.arange(0, BLOCK_P)
    same_earlier = (local[:, None] == local[None, :]) & (idx[None, :] < idx[:, None])
    rank = tl.sum(same_earlier.to(tl.int32), axis=1)

    if SINGLE_BLOCK:
        block_start = 0
    else:
        block_start = tl.load(block_starts_ptr + safe_local.to(tl.int64) * num_blocks + block,
                              mask=valid, other=0)
    row = tl.gather(expert_starts, safe_local, axis=0) + block_start + rank
    tl.store(pair_to_row_ptr + offs_p, tl.where(valid, row, local), mask=in_range)
    tl.store(sorted_pair_ids_ptr + row, offs_p, mask=valid)
    tl.store(sorted_pair_ids_ptr + offs_p, -1, mask=in_range & (offs_p >= num_rows))


def permute(topk_ids: torch.Tensor, num_experts: int, *,
            expert_map: torch.Tensor | None = None, act_block_m: int = 128) -> Permutation:
    """Device version of ``reference.permute.permute``: same arguments, same bits.

    ``topk_ids`` int32 (or int64) ``[M, top_k]``; ``expert_map`` int32 ``[E_global]``
    (global id -> local id or -1). No host sync: every buffer is sized from M, top_k, E.
    """
    assert topk_ids.dtype in (torch.int32, torch.int64), topk_ids.dtype
    assert num_experts >= 1 and act_block_m >= 1
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    pair_ids = topk_ids.reshape(-1)  # copies only if topk_ids is not contiguous

    expert_counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    expert_offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    scale_row_offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    sorted_pair_ids = torch.empty(num_pairs, dtype=torch.int32, device=device)
    pair_to_row = torch.empty(num_pairs, dtype=torch.int32, device=device)
    if num_pairs == 0:
        for buf in (expert_counts, expert_offsets, scale_row_offsets):
            buf.zero_()
        return Permutation(expert_counts, expert_offsets, sorted_pair_ids, pair_to_row,
                           scale_row_offsets)

    if expert_map is None:
        expert_map_arg, num_global, has_map = pair_ids, num_experts, False  # map never read
    else:
        assert expert_map.dtype == torch.int32 and expert_map.is_contiguous()
        expert_map_arg, num_global, has_map = expert_map, expert_map.numel(), True

    e_pad = triton.next_power_of_2(num_experts)
    if num_pairs <= SINGLE_BLOCK_CONFIG["MAX_PAIRS"]:
        _scatter_kernel[(1,)](
            pair_ids, expert_map_arg, expert_counts, expert_counts, expert_offsets,
            scale_row_offsets, sorted_pair_ids, pair_to_row, num_pairs, num_experts,
            num_global, 1, act_block_m, HAS_EXPERT_MAP=has_map,
            BLOCK_P=max(16, triton.next_power_of_2(num_pairs)), E_PAD=e_pad, SINGLE_BLOCK=True,
            num_warps=SINGLE_BLOCK_CONFIG["num_warps"])
        return Permutation(expert_counts, expert_offsets, sorted_pair_ids, pair_to_row,
                           scale_row_offsets)

    cfg = PERMUTE_CONFIG
    block_p = cfg["BLOCK_P"]
    num_blocks = triton.cdiv(num_pairs, block_p)
    # Per-block counts, then (in place) the per-block start rows within each expert.
    block_counts = torch.empty(num_experts, num_blocks, dtype=torch.int32, device=device)

    _block_histogram_kernel[(num_blocks,)](
        pair_ids, expert_map_arg, block_counts, num_pairs, num_experts, num_global,
        num_blocks, HAS_EXPERT_MAP=has_map, BLOCK_P=block_p, E_PAD=e_pad,
        num_warps=cfg["num_warps"])
    experts_per_program, scan_block = _scan_shape(num_experts, num_blocks)
    _expert_scan_kernel[(triton.cdiv(num_experts, experts_per_program),)](
        block_counts, expert_counts, num_experts, num_blocks,
        EXPERTS_PER_PROGRAM=experts_per_program, SCAN_BLOCK=scan_block,
        num_warps=SCAN_CONFIG["num_warps"])
    _scatter_kernel[(num_blocks,)](
        pair_ids, expert_map_arg, block_counts, expert_counts, expert_offsets,
        scale_row_offsets, sorted_pair_ids, pair_to_row, num_pairs, num_experts,
        num_global, num_blocks, act_block_m, HAS_EXPERT_MAP=has_map, BLOCK_P=block_p,
        E_PAD=e_pad, SINGLE_BLOCK=False, num_warps=cfg["num_warps"])
    return Permutation(expert_counts, expert_offsets, sorted_pair_ids, pair_to_row,
                       scale_row_offsets)
