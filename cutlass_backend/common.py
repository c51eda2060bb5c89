"""What both CuTe DSL kernels (``gemm.py``, SM80; ``gemm_sm90.py``, Hopper) share: the
scale, offset, bias and output tensors over a launch's pointers (docs/design.md layouts),
and how an M tile finds its expert. Imports the CUTLASS Python DSL, like the kernels."""
from __future__ import annotations

import cutlass
from cutlass import cute


def side_tensors(a_qscale, a_fscale, b_qscale, b_fscale, expert_offsets, scale_row_offsets,
                 bias, out, *, num_rows, n_out, k_blocks, num_experts, num_scale_rows,
                 num_super_groups, block_n):
    """(mAQ, mAF, mBQ, mBF, mEO, mSRO, mBias, mOut): Q_A [scale rows, K-blocks], F_A
    [scale rows, super groups], Q_B / F_B [E, Nout / block_n, K-blocks / super groups],
    expert_offsets and scale_row_offsets [E + 1], bias [E, Nout], out [P, Nout] (64-bit
    row stride: P * Nout can exceed 2**31). Host-side (inside a ``cute.jit`` launcher)."""
    n_scale_n = n_out // block_n
    mAQ = cute.make_tensor(
        a_qscale, cute.make_layout((num_scale_rows, k_blocks), stride=(k_blocks, 1)))
    mAF = cute.make_tensor(
        a_fscale,
        cute.make_layout((num_scale_rows, num_super_groups), stride=(num_super_groups, 1)))
    mBQ = cute.make_tensor(
        b_qscale,
        cute.make_layout((num_experts, n_scale_n, k_blocks),
                         stride=(n_scale_n * k_blocks, k_blocks, 1)))
    mBF = cute.make_tensor(
        b_fscale,
        cute.make_layout((num_experts, n_scale_n, num_super_groups),
                         stride=(n_scale_n * num_super_groups, num_super_groups, 1)))
    mEO = cute.make_tensor(expert_offsets, cute.make_layout((num_experts + 1,)))
    mSRO = cute.make_tensor(scale_row_offsets, cute.make_layout((num_experts + 1,)))
    mBias = cute.make_tensor(bias, cute.make_layout((num_experts, n_out), stride=(n_out, 1)))
    mOut = cute.make_tensor(
        out, cute.make_layout((num_rows, n_out), stride=(cutlass.Int64(n_out), 1)))
    return mAQ, mAF, mBQ, mBF, mEO, mSRO, mBias, mOut


# Keys counted in straight-line code (E <= 32 * this): all their loads are in flight at
# once. A loop with a run-time bound keeps the loads of its unrolled iterations behind
# its exit tests, one L2 round trip each (ncu, GEMM2 on an H100: 8 serial round trips,
# a fifth of the kernel's stall samples).
STATIC_KEY_CHUNKS = 8


@cute.jit
def find_expert(mEO: cute.Tensor, num_experts: cutlass.Int32, tile_m: cutlass.Int32,
                block_m: cutlass.Constexpr):
    """(expert, row_begin, row_end, m_start) of M tile slot ``tile_m`` (device side).

    With the strictly increasing keys ``V_e = expert_offsets[e] + e * BLOCK_M``, the slot
    belongs to the expert with ``V_e <= tile_m * BLOCK_M < V_{e+1}``:
    ``e = #{1 <= i < E : V_i <= tile_m * BLOCK_M}``, counted by each warp with coalesced
    loads, a ballot and popc (one L2 round trip for E <= 32 * STATIC_KEY_CHUNKS). The
    tile starts at row ``m_start``; ``m_start >= row_end`` marks a surplus slot (or an
    empty expert's)."""
    lane = cute.arch.lane_idx()
    row_key = tile_m * block_m
    expert = cutlass.Int32(0)
    # keys 1 .. 32 * STATIC_KEY_CHUNKS: every load first (clamped indices: always in
    # bounds, no branch between them), then the compares
    keys = []
    for c in cutlass.range_constexpr(STATIC_KEY_CHUNKS):
        i_c = cutlass.min(1 + c * 32 + lane, num_experts)
        keys.append(mEO[i_c] + i_c * block_m)
    for c in cutlass.range_constexpr(STATIC_KEY_CHUNKS):
        hit = (1 + c * 32 + lane < num_experts) & (keys[c] <= row_key)
        expert = expert + cute.arch.popc(cute.arch.vote_ballot_sync(hit))
    # more experts: the rest in a loop
    for base in cutlass.range(1 + 32 * STATIC_KEY_CHUNKS, num_experts, 32, unroll=1):
        i = base + lane
        i_c = cutlass.min(i, num_experts)
        hit = (i < num_experts) & (mEO[i_c] + i_c * block_m <= row_key)
        expert = expert + cute.arch.popc(cute.arch.vote_ballot_sync(hit))
    row_begin = mEO[expert]
    row_end = mEO[expert + 1]
    m_start = row_begin + (tile_m - expert - (row_begin + block_m - 1) // block_m) * block_m
    return expert, row_begin, row_end, m_start
