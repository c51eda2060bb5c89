"""Hybrid INT8 grouped GEMM for all experts in one launch (SPEC 5, design.md "Hybrid grouped GEMM").

    out[r, n] = sum_g (F_A[ra(r), g] * F_B[e, rb(n), g]) * float32(S_g) (+ bias[e, n])
    S_g       = sum_{b in g} Q_A[ra(r), b] * Q_B[e, rb(n), b] * dot_int8(A[r, b], B[e, n, b])

Oracle: ``reference/gemm.py``. Test: ``tests/test_gemm.py``. Tuning notes and measurements:
``bench/results/gemm_tuning.md``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from triton_moe.jit_utils import to_output_dtype

INF = float("inf")

# Tile variants as data: (max average rows per expert P / E, max K-blocks Kin / block_k,
# config); the first entry with P / E and the K-block count within both bounds is used
# (host ints, so the choice needs no host sync). BLOCK_K is always the quantization block_k,
# so every K step is one Q-weighted K-block. Measured on an H200 (bench/results/gemm_tuning.md):
# - 16 rows, operands swapped (out^T = B A^T): decode-like batches, where a 64-row tile
#   would be mostly padding; a Hopper wgmma needs 64 rows in its M operand, so the weight
#   columns fill it and the token rows become the wgmma N. Bound by streaming the weights.
# - 64 x 128, one warpgroup (m64n128 wgmma), 233 registers: two CTAs per SM, so one CTA's
#   int32 weighting and epilogue overlap the other's wgmma. Beat 128 x 64 (two m64n64
#   instructions per K step), 128 x 128 with two warpgroups (one CTA per SM, warpgroups in
#   lockstep), 256 x 64 and persistent variants at the default workload. 128 columns span
#   two 64-column weight scale blocks, handled without a per-column gather (``_tile_scales``).
# - 3 stages when K is short (GEMM2, Kin 512): 3 x 72 KB of shared memory keeps three
#   CTAs per SM (the kernel then needs ~160 registers); 4 stages (96 KB) would allow two.
#   4 stages helped at 64 rows per expert with Kin 2048.
# - GROUP_M 8: programs walk 8 M-tiles down each N column before the next column, so an
#   expert's weight tile is read from DRAM once for all of its M-tiles even when its
#   weights exceed the L2 (Mixtral: 117 MB per expert): Mixtral GEMM1 at M=1024 966 ->
#   763 us, M=4096 3520 -> 2934 us; neutral (+-1%) where an expert's weights fit the L2
#   (default workload, Qwen3, DeepSeek-V3).
GEMM_CONFIGS = (
    (16, INF, dict(BLOCK_M=16, BLOCK_N=64, GROUP_M=1, SWAP_AB=True, num_warps=4, num_stages=4)),
    (70, 4, dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, SWAP_AB=False, num_warps=4, num_stages=3)),
    (70, INF, dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, SWAP_AB=False, num_warps=4, num_stages=4)),
    (INF, INF, dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, SWAP_AB=False, num_warps=4, num_stages=3)),
)


def select_config(num_rows: int, num_experts: int, num_k_blocks: int) -> dict:
    """Tile config for P = ``num_rows`` permuted rows over ``num_experts`` experts and a
    reduction of ``num_k_blocks`` quantization K-blocks."""
    avg_rows = num_rows / max(num_experts, 1)
    for max_avg_rows, max_k_blocks, config in GEMM_CONFIGS:
        if avg_rows <= max_avg_rows and num_k_blocks <= max_k_blocks:
            return dict(config)
    raise AssertionError("GEMM_CONFIGS must end with an unbounded entry")


def num_m_tiles_bound(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on sum_e ceil(count_e / BLOCK_M) given only P and E (SPEC 4.1)."""
    return triton.cdiv(num_rows, block_m) + num_experts


@triton.jit
def _along_m(values, SWAP_AB: tl.constexpr):
    """Broadcast a per-row vector [BLOCK_M] along the accumulator tile's M axis."""
    if SWAP_AB:
        out = values[None, :]
    else:
        out = values[:, None]
    return out


@triton.jit
def _along_n(values, SWAP_AB: tl.constexpr):
    """Broadcast a per-column vector [BLOCK_N] along the accumulator tile's N axis."""
    if SWAP_AB:
        out = values[:, None]
    else:
        out = values[None, :]
    return out


@triton.jit
def _tile_scales(ptr, stride, first_block, last_block, gather_blocks,
                 LENGTH: tl.constexpr, SCALE_BLOCK: tl.constexpr):
    """The scales (Q or F) of the LENGTH rows (or columns) of one tile, from ``ptr`` (the
    scale column of this K-block or super group), ``stride`` apart per scale block.

    The tile starts at a scale block boundary (``first_block``); ``last_block`` is the last
    scale block the tile may touch. Three cases, chosen at compile time:
    - one scale block covers the tile: a scalar (the cheap case of SPEC 5);
    - the tile spans a few whole blocks: that many scalar loads, spread over a [LENGTH]
      vector with ``where`` on a constant block index. Which block an accumulator register
      belongs to is then known at compile time, so this costs no more than the scalar case
      (a gathered vector costs one load per register);
    - otherwise (e.g. per-token scales): a gather by ``gather_blocks`` [LENGTH].
    """
    if SCALE_BLOCK % LENGTH == 0:
        values = tl.load(ptr + first_block * stride)
    elif (LENGTH % SCALE_BLOCK == 0) and (LENGTH // SCALE_BLOCK <= 4):
        block_of = tl.arange(0, LENGTH) // SCALE_BLOCK
        values = tl.load(ptr + first_block * stride)
        for j in tl.static_range(1, LENGTH // SCALE_BLOCK):
            block_j = tl.minimum(first_block + j, last_block)
            values = tl.where(block_of == j, tl.load(ptr + block_j * stride), values)
    else:
        values = tl.load(ptr + gather_blocks * stride)
    return values


@triton.jit
def _scale_pair(a_ptr, a_stride, a_first_block, a_last_block, a_gather_blocks,
                b_ptr, b_stride, b_first_block, b_last_block, b_gather_blocks,
                BLOCK_M: tl.constexpr, SCALE_BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SCALE_BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr):
    """The activation-side and weight-side scales (Q, or F) of one tile for one K-block (or
    super group), ``a_ptr`` / ``b_ptr`` at that scale column: each a scalar where one scale
    block covers the tile's side, else a vector shaped to broadcast along the accumulator's
    M / N axis (``_tile_scales``)."""
    a = _tile_scales(a_ptr, a_stride, a_first_block, a_last_block, a_gather_blocks,
                     BLOCK_M, SCALE_BLOCK_M)
    b = _tile_scales(b_ptr, b_stride, b_first_block, b_last_block, b_gather_blocks,
                     BLOCK_N, SCALE_BLOCK_N)
    if SCALE_BLOCK_M % BLOCK_M != 0:
        a = _along_m(a, SWAP_AB)
    if SCALE_BLOCK_N % BLOCK_N != 0:
        b = _along_n(b, SWAP_AB)
    return a, b


@triton.jit
def grouped_gemm_kernel(
    a_desc, a_qscale_ptr, a_fscale_ptr,
    b_desc, b_qscale_ptr, b_fscale_ptr,
    expert_offsets_ptr, scale_row_offsets_ptr, bias_ptr, out_ptr,
    num_experts, n_out, num_m_tiles,
    stride_aqm, stride_aqk, stride_afm, stride_afg,
    stride_bqe, stride_bqn, stride_bqk,
    stride_bfe, stride_bfn, stride_bfg,
    stride_biase, stride_biasn, stride_om, stride_on,
    SCALE_BLOCK_M: tl.constexpr, SCALE_BLOCK_N: tl.constexpr, SUPER_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_K_BLOCKS: tl.constexpr, GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr,
    EXPERTS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile of one expert.

    Schedule. The launch has ``num_m_tiles`` = cdiv(P, BLOCK_M) + E M-tile slots (a bound
    known from shapes alone) times cdiv(Nout, BLOCK_N) N-tiles, ordered as in Triton's
    matmul tutorial, in groups of GROUP_M M-tiles: consecutive programs walk GROUP_M
    M-tiles (mostly of one expert) down one N column, so each weight tile comes from DRAM
    once for all of them, also when an expert's weights exceed the L2 (Mixtral), while
    the GROUP_M A tiles stay in L2 across the columns.
    Expert e owns consecutive M-tile slots, tiles counted from its segment start, so a tile
    never straddles two experts and lines up with activation scale blocks (which also
    count from the segment start, SPEC 4.1). Each program finds its expert from an E-wide
    vector of ``expert_offsets`` (see the code); slots past the expert's rows (at most one
    per expert, plus the tail of the bound) return at once.

    Loads. A and B tiles come by TMA (``a_desc`` over A [P, Kin], ``b_desc`` over all experts'
    weights as one [E * Nout, Kin] matrix), software-pipelined NUM_STAGES deep together with
    the per-K-block scale loads. Rows past the expert's segment (or past P, zero-filled by
    TMA) and columns past Nout only feed output elements that the store masks off.

    Main loop: one K step per quantization K-block b (BLOCK_K == block_k; the K-block count
    is a constexpr: K is fixed per layer). The int8 x int8 wgmma gives an exact int32 tile
    (|dot| <= BLOCK_K * 127^2), weighted in int32 by Q_A[ra(r), b] * Q_B[e, rb(n), b] and
    added to the super group's int32 accumulator (one IMAD per element). The weight is one
    scalar when the tile sits inside one scale block, else a per-row / per-column vector
    (``_tile_scales``). At the last K-block of each super group (and of K) the int32 sum is
    flushed once: acc = acc + (F_A * F_B) * float32(S_g), in design.md's order. The K loop
    stays flat (the flush is a branch inside it, its F loads outside it) so the compiler
    can software-pipeline every load. The int32 sum is exact only while
    G * q_max^2 * block_k * 127^2 < 2^31 (SPEC 5); the API enforces that bound unless the
    caller opts out.

    Overlap. The weighting needs the wgmma's result, so a warpgroup waits for its wgmma and
    then weights the tile: within one CTA the tensor cores idle meanwhile. The configs
    therefore keep two or three CTAs per SM (one warpgroup each, <= 233 registers), whose
    wgmma and integer phases interleave. Weighting block b-1 while block b's wgmma runs (in
    source order) did overlap them inside one warpgroup, but needs a fourth accumulator
    (register copies on the integer pipe, fewer CTAs per SM) and measured slower
    (gemm_tuning.md).

    SWAP_AB computes the transposed tile B A^T instead ([BLOCK_N, BLOCK_M] accumulator):
    a Hopper wgmma needs 64 rows in its M operand, so for small BLOCK_M the weight columns
    fill it and the token rows become the wgmma N. The arithmetic is unchanged.

    The store is masked to the expert's rows and to Nout, so rows >= R and other experts'
    rows are never written.
    """
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(n_out, BLOCK_N)
    num_pid_in_group = GROUP_M * num_n_tiles
    group_id = pid // num_pid_in_group
    first_tile_m = group_id * GROUP_M
    group_size_m = min(num_m_tiles - first_tile_m, GROUP_M)
    tile_m = first_tile_m + (pid % num_pid_in_group) % group_size_m
    tile_n = (pid % num_pid_in_group) // group_size_m

    # Which expert owns M-tile slot `tile_m`, without a scan: with the strictly increasing
    # keys V_e = expert_offsets[e] + e * BLOCK_M, it is the last e with V_e <= tile_m *
    # BLOCK_M, and its local tile is tile_m - ceil(V_e / BLOCK_M). Expert e so owns
    # ceil(V_{e+1} / BLOCK_M) - ceil(V_e / BLOCK_M) >= ceil(count_e / BLOCK_M) slots, and
    # the last slot needed is below cdiv(P, BLOCK_M) + E. One compare-and-count over an
    # E-wide vector (one cross-warp reduction) instead of a cumsum and four reductions:
    # this prologue runs once per output tile (GEMM2 at the default workload has 4 K-blocks
    # per tile, so it is a visible share of a tile's time).
    experts = tl.arange(0, EXPERTS_PAD)
    seg_starts = tl.load(expert_offsets_ptr + experts, mask=experts < num_experts,
                         other=2**31 - 1)
    keys = seg_starts.to(tl.int64) + experts.to(tl.int64) * BLOCK_M
    expert = tl.sum((keys <= tile_m.to(tl.int64) * BLOCK_M).to(tl.int32), axis=0) - 1
    row_start = tl.load(expert_offsets_ptr + expert)
    row_end = tl.load(expert_offsets_ptr + expert + 1)
    first_slot = (row_start.to(tl.int64) + expert * BLOCK_M + BLOCK_M - 1) // BLOCK_M
    local_m = ((tile_m - first_slot) * BLOCK_M).to(tl.int32)
    if row_start + local_m >= row_end:
        return  # surplus slot, or an empty expert's slot
    scale_row_start = tl.load(scale_row_offsets_ptr + expert)

    first_row = row_start + local_m
    first_col = tile_n * BLOCK_N
    rows = first_row + tl.arange(0, BLOCK_M)
    cols = first_col + tl.arange(0, BLOCK_N)
    # TMA coordinates are int32 element indices (64-bit addressing is the unit's job).
    b_first_row = expert * n_out + first_col

    # Scale rows: ra(r) = scale_row_offsets[e] + (r - o_e) // act_block_m, rb(n) = n // block_n.
    a_first_block = scale_row_start + local_m // SCALE_BLOCK_M
    a_last_block = scale_row_start + (row_end - 1 - row_start) // SCALE_BLOCK_M
    a_gather_blocks = (scale_row_start
                       + (tl.minimum(rows, row_end - 1) - row_start) // SCALE_BLOCK_M).to(tl.int64)
    b_first_block = first_col // SCALE_BLOCK_N
    b_last_block = (n_out - 1) // SCALE_BLOCK_N
    b_gather_blocks = tl.minimum(cols, n_out - 1) // SCALE_BLOCK_N
    b_qscale_ptr += expert.to(tl.int64) * stride_bqe
    b_fscale_ptr += expert.to(tl.int64) * stride_bfe

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_group = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_group = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kb in tl.range(0, NUM_K_BLOCKS, num_stages=NUM_STAGES):
        a = a_desc.load([first_row, kb * BLOCK_K])
        b = b_desc.load([b_first_row, kb * BLOCK_K])
        if SWAP_AB:
            block_dot = tl.dot(b, a.T, out_dtype=tl.int32)
        else:
            block_dot = tl.dot(a, b.T, out_dtype=tl.int32)
        q_a, q_b = _scale_pair(
            a_qscale_ptr + kb * stride_aqk, stride_aqm, a_first_block, a_last_block,
            a_gather_blocks, b_qscale_ptr + kb * stride_bqk, stride_bqn, b_first_block,
            b_last_block, b_gather_blocks, BLOCK_M, SCALE_BLOCK_M, BLOCK_N, SCALE_BLOCK_N,
            SWAP_AB)
        # int32 weighting: |Q_A Q_B dot| <= q_max^2 * BLOCK_K * 127^2 (SPEC 5).
        acc_group += block_dot * (q_a * q_b)
        # F of this K-block's super group, loaded every step (cache hits) so that the
        # loads are pipelined with the others instead of stalling the flush.
        group = kb // SUPER_GROUP
        f_a, f_b = _scale_pair(
            a_fscale_ptr + group * stride_afg, stride_afm, a_first_block, a_last_block,
            a_gather_blocks, b_fscale_ptr + group * stride_bfg, stride_bfn, b_first_block,
            b_last_block, b_gather_blocks, BLOCK_M, SCALE_BLOCK_M, BLOCK_N, SCALE_BLOCK_N,
            SWAP_AB)
        if ((kb % SUPER_GROUP) == SUPER_GROUP - 1) | (kb == NUM_K_BLOCKS - 1):
            # design.md order: acc + (F_A * F_B) * float32(S_g).
            acc = acc + (f_a * f_b) * acc_group.to(tl.float32)
            acc_group = tl.zeros_like(acc_group)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_biase
                       + tl.minimum(cols, n_out - 1) * stride_biasn)
        acc = acc + _along_n(bias, SWAP_AB)
    # 64-bit row offsets: P * Nout can exceed 2^31.
    out_ptrs = (out_ptr + _along_m(rows.to(tl.int64) * stride_om, SWAP_AB)
                + _along_n(cols * stride_on, SWAP_AB))
    out_mask = _along_m(rows < row_end, SWAP_AB) & _along_n(cols < n_out, SWAP_AB)
    # Round to nearest even in both modes (the interpreter's own bf16 cast truncates).
    tl.store(out_ptrs, to_output_dtype(acc, out_ptr.dtype.element_ty), mask=out_mask)


def grouped_gemm(a_q: torch.Tensor, a_qscale: torch.Tensor, a_fscale: torch.Tensor,
                 b_q: torch.Tensor, b_qscale: torch.Tensor, b_fscale: torch.Tensor,
                 expert_offsets: torch.Tensor, scale_row_offsets: torch.Tensor, *,
                 act_block_m: int, block_n: int, block_k: int, super_group_size: int,
                 out_dtype: torch.dtype, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """Hybrid grouped GEMM of every expert in one launch (SPEC 5); layouts in design.md.

    ``a_q`` int8 [P, Kin]; ``a_qscale`` int32 [S, Kin // block_k]; ``a_fscale`` fp32 [S, SG];
    ``b_q`` int8 [E, Nout, Kin]; ``b_qscale`` int32 [E, Nout // block_n, Kin // block_k];
    ``b_fscale`` fp32 [E, Nout // block_n, SG]; ``expert_offsets`` and ``scale_row_offsets``
    int32 [E + 1]; ``bias`` fp32 [E, Nout] or None. Returns ``out`` [P, Nout] of
    ``out_dtype`` (allocated if None); rows >= expert_offsets[E] are left untouched.
    ``config`` overrides the tile choice (keys of a GEMM_CONFIGS entry); default by P / E
    and Kin / block_k.
    No host sync: the grid depends on P, E and Nout only.
    """
    num_rows, k_in = a_q.shape
    num_experts, n_out, _ = b_q.shape
    assert a_q.dtype == torch.int8 and b_q.dtype == torch.int8
    assert a_qscale.dtype == torch.int32 and b_qscale.dtype == torch.int32
    assert a_fscale.dtype == torch.float32 and b_fscale.dtype == torch.float32
    assert expert_offsets.dtype == torch.int32 and scale_row_offsets.dtype == torch.int32
    assert a_q.is_contiguous() and b_q.is_contiguous(), "K must be contiguous for the int8 MMA"
    assert b_q.shape[2] == k_in and k_in % block_k == 0
    # TMA: 16-byte aligned bases and row pitches.
    assert k_in % 16 == 0 and a_q.data_ptr() % 16 == 0 and b_q.data_ptr() % 16 == 0
    if out is None:
        out = torch.empty(num_rows, n_out, dtype=out_dtype, device=a_q.device)
    assert out.shape == (num_rows, n_out) and out.dtype == out_dtype
    if num_rows == 0 or n_out == 0 or num_experts == 0:
        return out
    if bias is not None:
        assert bias.dtype == torch.float32 and bias.shape == (num_experts, n_out)

    config = dict(config or select_config(num_rows, num_experts, k_in // block_k))
    num_warps = config.pop("num_warps")
    num_stages = config.pop("num_stages")
    block_m, block_n_tile = config["BLOCK_M"], config["BLOCK_N"]
    # Descriptors carry shapes and strides only (host metadata, no sync).
    a_desc = TensorDescriptor(a_q, [num_rows, k_in], [k_in, 1], [block_m, block_k])
    b_desc = TensorDescriptor(b_q, [num_experts * n_out, k_in], [k_in, 1], [block_n_tile, block_k])
    num_m_tiles = num_m_tiles_bound(num_rows, num_experts, block_m)
    grid = (num_m_tiles * triton.cdiv(n_out, block_n_tile),)
    bias_arg = bias if bias is not None else b_fscale  # never read without HAS_BIAS
    bias_strides = bias.stride() if bias is not None else (0, 0)
    grouped_gemm_kernel[grid](
        a_desc, a_qscale, a_fscale, b_desc, b_qscale, b_fscale,
        expert_offsets, scale_row_offsets, bias_arg, out,
        num_experts, n_out, num_m_tiles,
        a_qscale.stride(0), a_qscale.stride(1), a_fscale.stride(0), a_fscale.stride(1),
        b_qscale.stride(0), b_qscale.stride(1), b_qscale.stride(2),
        b_fscale.stride(0), b_fscale.stride(1), b_fscale.stride(2),
        bias_strides[0], bias_strides[1], out.stride(0), out.stride(1),
        SCALE_BLOCK_M=act_block_m, SCALE_BLOCK_N=block_n, SUPER_GROUP=super_group_size,
        BLOCK_K=block_k, NUM_K_BLOCKS=k_in // block_k,
        EXPERTS_PAD=triton.next_power_of_2(num_experts),
        HAS_BIAS=bias is not None, NUM_STAGES=num_stages,
        num_warps=num_warps, num_stages=num_stages, **config,
    )
    return out
