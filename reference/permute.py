"""Permutation of (token, expert) pairs into expert-contiguous rows (SPEC 3).

Pair ``p = t * top_k + j`` is routed to expert ``topk_ids[t, j]``. The pairs are sorted by
local expert, stably (ascending ``p`` inside an expert), so every expert owns one
contiguous segment ``[expert_offsets[e], expert_offsets[e + 1])`` of permuted rows.
Pairs whose expert is not on this device (``expert_map == -1``) get no row.

Everything is sized from ``M``, ``top_k`` and ``E`` and nothing is read back to the host,
so this oracle also runs inside a CUDA graph (the Triton kernels in
``triton_moe/permute.py`` must reproduce its bits).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Permutation(NamedTuple):
    """Outputs of ``permute``; all int32, meanings in docs/design.md ("Permutation")."""

    expert_counts: torch.Tensor      # [E]     pairs routed to each local expert
    expert_offsets: torch.Tensor     # [E + 1] exclusive prefix sum of expert_counts
    sorted_pair_ids: torch.Tensor    # [P]     permuted row -> pair; -1 for rows >= R
    pair_to_row: torch.Tensor        # [P]     pair -> permuted row; -1 dropped, -2 invalid id
    scale_row_offsets: torch.Tensor  # [E + 1] exclusive prefix sum of ceil(count / act_block_m)


# pair_to_row value of a pair whose expert id is out of range (neither a local expert nor
# dropped by expert_map): un-permute makes its token's output NaN, so a bad id is never
# silently ignored on the device, where raising would need a host sync.
INVALID_PAIR = -2


def local_expert_ids(topk_ids: torch.Tensor, num_experts: int,
                     expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """Local expert of every pair as int64 ``[P]``: ``-1`` where ``expert_map`` drops the
    pair, ``INVALID_PAIR`` where the id is out of range (a global id outside
    ``[0, E_global)``, or a mapped/local id outside ``[0, E)`` other than -1).
    """
    ids = topk_ids.reshape(-1).long()
    num_global = num_experts if expert_map is None else expert_map.numel()
    bad = (ids < 0) | (ids >= num_global)
    if expert_map is not None:
        ids = expert_map.long()[ids.clamp(0, max(num_global - 1, 0))]
        bad = bad | (ids < -1) | (ids >= num_experts)
    invalid = torch.full_like(ids, INVALID_PAIR)
    return torch.where(bad, invalid, torch.where(ids >= 0, ids, torch.full_like(ids, -1)))


def permute(topk_ids: torch.Tensor, num_experts: int, *,
            expert_map: torch.Tensor | None = None, act_block_m: int = 128) -> Permutation:
    """Sort the pairs of ``topk_ids [M, top_k]`` by local expert, stably (SPEC 3).

    ``expert_map`` (int32 ``[E_global]``, global id -> local id or -1) makes ``topk_ids``
    global ids. ``act_block_m`` (>= 1) is the activation scale block height: an expert
    with ``c`` rows owns ``ceil(c / act_block_m)`` scale rows (SPEC 4.1).
    """
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    local = local_expert_ids(topk_ids, num_experts, expert_map)
    dropped = local < 0

    # Counts by scatter-add into E + 1 bins (the last bin collects the dropped pairs):
    # unlike bincount, the output size does not depend on the data.
    sort_key = torch.where(dropped, torch.full_like(local, num_experts), local)
    bins = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    bins.scatter_add_(0, sort_key, torch.ones_like(sort_key))
    expert_counts = bins[:num_experts]

    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    expert_offsets[1:] = torch.cumsum(expert_counts, 0)
    num_rows = expert_offsets[num_experts]

    scale_blocks = (expert_counts + act_block_m - 1) // act_block_m
    scale_row_offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    scale_row_offsets[1:] = torch.cumsum(scale_blocks, 0)

    # A stable sort on the expert (dropped pairs last) is the permutation itself.
    order = torch.sort(sort_key, stable=True).indices
    rows = torch.arange(num_pairs, dtype=torch.int64, device=device)
    row_is_valid = rows < num_rows
    sorted_pair_ids = torch.where(row_is_valid, order, torch.full_like(order, -1))
    # Inverse permutation: pair order[r] sits in row r; dropped pairs get their marker
    # (-1, or INVALID_PAIR for an out-of-range id).
    pair_to_row = torch.empty_like(order)
    pair_to_row.scatter_(0, order, torch.where(row_is_valid, rows, local[order]))

    return Permutation(
        expert_counts=expert_counts.int(),
        expert_offsets=expert_offsets.int(),
        sorted_pair_ids=sorted_pair_ids.int(),
        pair_to_row=pair_to_row.int(),
        scale_row_offsets=scale_row_offsets.int(),
    )
