"""Hybrid grouped INT8 GEMM (SPEC 5) as a CuTe DSL kernel for SM80+ tensor cores.

This module imports the CUTLASS Python DSL at the top; ``cutlass_backend/__init__.py``
imports it lazily so that the package itself never needs the DSL.

Algorithm (one CTA = one BLOCK_M x BLOCK_N output tile of one expert)
--------------------------------------------------------------------
* Tiles of all experts share one 1-D grid of ``(cdiv(P, BLOCK_M) + E) * cdiv(Nout, BLOCK_N)``
  CTAs; consecutive CTAs walk the N tiles of one M tile (the A tile and the expert's
  weights stay in L2). An M tile finds its expert on the device, without a host sync:
  with ``V_e = expert_offsets[e] + e * BLOCK_M`` (strictly increasing), M tile ``t``
  belongs to the expert ``e`` with ``V_e <= t * BLOCK_M < V_{e+1}`` and is that expert's
  local tile ``t - ceil(V_e / BLOCK_M)``. Each expert gets at least ``ceil(count_e /
  BLOCK_M)`` tiles this way and the grid bound is ``cdiv(P, BLOCK_M) + E``; surplus tiles
  (and tiles of empty experts) exit at once. Every warp counts ``#{e >= 1 : V_e <= t *
  BLOCK_M}`` with coalesced loads, a ballot and popc: one L2 round trip for E <= 256.
* Main loop over K-blocks (CTA tile K = ``block_k``, 128 by default, so one K tile is one
  quant block): 3-stage cp.async pipeline global -> shared (16-byte copies into a
  Swizzle<3,4,3> K-major layout: atoms of 8 rows x 128 bytes, so the 8 rows one ldmatrix
  reads fall in 8 different bank groups), ldmatrix shared -> registers,
  ``mma.sync.m16n8k32.s32.s8.s8.s32`` (signed: the SM80 atom is built with signed i8
  element types, see ``MmaS8Op``).
* SPEC 5 weighting: the K-block product ``D_b`` (int32, exact) is folded into the super
  group sum ``S_g += Q_A[ra(m), b] * Q_B[rb(n), b] * D_b`` (int32); at the end of a super
  group ``acc += (F_A * F_B) * float(S_g)`` in fp32, any number of super groups; epilogue
  ``out = out_dtype(acc + bias)``, predicated on the expert's last row and on Nout (rows
  past ``expert_offsets[E]`` are never written). Per-row / per-column (Q, F) entries of
  the current K-block are staged in shared memory (a ring of 3, loaded two K-blocks ahead),
  so any ``act_block_m`` (1 = per-token scales) and ``block_n`` work. When the tile lies
  inside one scale block each way (the default: act_block_m 128 / 64 = BLOCK_M, block_n 64
  = BLOCK_N) a separate compiled variant uses one scalar weight per K-block: one IMAD per
  accumulator element, SPEC 5's cheap case.
* Warps (default tiles): 4 (64x64 tile) or 8 (128x64 tile), each owning a 32x32
  sub-tile: a thread keeps 32 int32 products and 32 int32 group sums in registers; the
  fp32 accumulators live in shared memory, thread-private and bank-conflict free,
  touched once per super group. That holds the 128x64 kernel to 128 registers (2 CTAs
  per SM) and the 64x64 one to 168 (3 CTAs per SM), which hides the per-tile latency
  (expert search, pipeline fill).

Tile variants (``TILE_CONFIGS``, the ``tile=`` argument; default ``DEFAULT_TILE`` =
"small_racc" at every batch size, see ``select_tile``). Per CTA on sm_90 (ptxas 13.0, bf16,
scale mode tile / rows; spills in bytes), shared memory at block_k 128:

    name                  CTA      warps x tile  st acc   regs      smem    CTAs/SM
    large                 128x64   8 x 32x32     3  smem  126/128*  111 KB  2
    small                 64x64    4 x 32x32     3  smem  144/148    69 KB  3
    small_racc            64x64    4 x 32x32     3  regs  168/168    52 KB  3
    small_racc_s4         64x64    4 x 32x32     4  regs  168/168    69 KB  3
    large_w64x32          128x64   4 x 64x32     3  smem  254/254   111 KB  2
    large_w64x32_racc     128x64   4 x 64x32     3  regs  255+~120   78 KB  2
    large_w64x32_racc_s4  128x64   4 x 64x32     4  regs  255+~120  103 KB  2
    n128_w32x64           64x128   4 x 32x64     3  smem  254/254   111 KB  2
    n128_w32x64_racc      64x128   4 x 32x64     3  regs  255+~120   78 KB  2
    n128_w32x64_racc_s4   64x128   4 x 32x64     4  regs  255+~120  103 KB  2
    wide_w64x32           128x128  8 x 64x32     3  smem  244/246   170 KB  1 (> A100's 163)
    wide_w64x32_racc_s4   128x128  8 x 64x32     4  regs  255+~100  137 KB  1

(* 8 bytes of spill in the rows mode.) The per-row ("rows") weighting costs one IMUL per
accumulator row and one IMAD per element, like the scalar one, instead of the general
path's IMUL + IMAD per element and 3x the shared-memory scale reads.

Requirements (asserted by the launcher): ``block_k`` in (64, 128, 256) and ``Kin %
block_k == 0``, int8 operands 16-byte aligned, all tensors contiguous. 64-bit strides for
the operands, so ``E * Nout * Kin`` may exceed 2**31. Compiled once per (tile, block_k,
out dtype, bias, scale mode).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import cuda.bindings.driver as cuda
import cutlass
import cutlass._mlir.dialects.cute_nvgpu as _cute_nvgpu_ir
import cutlass.memory
import torch
from cutlass import cute
from cutlass._mlir import ir
from cutlass.cute.atom import Trait, make_atom
from cutlass.cute.core import _pack_shape
from cutlass.cute.nvgpu.warp.mma import WarpMmaOp
from cutlass.cute.runtime import make_ptr
from cutlass.cute.typing import AddressSpace

from cutlass_backend import gemm_sm90
from cutlass_backend.common import find_expert, side_tensors

MMA_SHAPE_MNK = (16, 8, 32)
NUM_STAGES = 3

@dataclass(frozen=True)
class TileConfig:
    """One compiled tile variant. CTA tile ``block_m x block_n`` (BLOCK_K is always the
    quantization block_k: one K tile = one Q-weighted K-block), split over warps of
    ``warp_m x warp_n`` each; ``stages`` cp.async stages; ``acc_in_regs``: the fp32
    super-group sums live in registers instead of thread-private shared memory;
    ``min_blocks_per_sm``: the register budget the compiler is held to (65536 /
    (threads * this), rounded down to a multiple of 8, at most 255)."""

    block_m: int
    block_n: int
    warp_m: int = 32
    warp_n: int = 32
    stages: int = NUM_STAGES
    acc_in_regs: bool = False
    min_blocks_per_sm: int = 2

    @property
    def num_warps(self) -> int:
        return (self.block_m // self.warp_m) * (self.block_n // self.warp_n)

    def describe(self) -> str:
        return (f"{self.block_m}x{self.block_n} w{self.num_warps} ({self.warp_m}x{self.warp_n}"
                f"/warp) s{self.stages} acc:{'regs' if self.acc_in_regs else 'smem'} "
                f">={self.min_blocks_per_sm} CTA/SM")


# Tile variants by name (the ``tile=`` argument). "large" / "small" are the reference
# design's tiles (SPEC 8: 128x64, and 64x64 when the average expert gets <= 70 rows) and
# the default choice (from P and E only, no host sync). The others trade occupancy for
# more MMAs per ldmatrix (a 64x32 / 32x64 warp tile issues 16 MMAs per 6 ldmatrix.x4 per
# k-step, a 32x32 one 8 per 4) and, with ``acc_in_regs``, drop the shared-memory round
# trip of the fp32 sums (8 bytes per element per super group). Registers and smem per
# CTA of each (sm_90, ptxas 13.0) are listed in the module docstring.
TILE_CONFIGS = {
    "large": TileConfig(128, 64, min_blocks_per_sm=2),
    "small": TileConfig(64, 64, min_blocks_per_sm=3),
    "small_racc": TileConfig(64, 64, acc_in_regs=True, min_blocks_per_sm=3),
    "small_racc_s4": TileConfig(64, 64, stages=4, acc_in_regs=True, min_blocks_per_sm=3),
    "large_w64x32": TileConfig(128, 64, 64, 32),
    "large_w64x32_racc": TileConfig(128, 64, 64, 32, acc_in_regs=True),
    "large_w64x32_racc_s4": TileConfig(128, 64, 64, 32, stages=4, acc_in_regs=True),
    "n128_w32x64": TileConfig(64, 128, 32, 64),
    "n128_w32x64_racc": TileConfig(64, 128, 32, 64, acc_in_regs=True),
    "n128_w32x64_racc_s4": TileConfig(64, 128, 32, 64, stages=4, acc_in_regs=True),
    "wide_w64x32": TileConfig(128, 128, 64, 32, min_blocks_per_sm=1),
    "wide_w64x32_racc_s4": TileConfig(128, 128, 64, 32, stages=4, acc_in_regs=True,
                                      min_blocks_per_sm=1),
}
# How the (Q, F) weights vary over one CTA tile (chosen per launch from act_block_m,
# block_n and the tile): "tile" = one scalar each way (act_block_m % BLOCK_M == 0 and
# block_n % BLOCK_N == 0, the reference default); "rows" = per row of A, one scalar for
# B (block_n % BLOCK_N == 0: per-token activation scales, act_block_m = 1); "general" =
# per row and per column.
SCALE_MODES = ("tile", "rows", "general")
SMALL_TILE_MAX_ROWS_PER_EXPERT = 70
# 64x64, 4 warps of 32x32, fp32 sums in registers, 3 CTAs per SM. H200, default workload,
# CUDA graph (ms): GEMM1 0.789 (large 1.082, small 0.963), GEMM2 0.579 (large 0.763),
# per-token GEMM1 0.839 (large 1.168), GEMM2 0.598 (0.813).
DEFAULT_TILE = "small_racc"
# Environment override of the tile choice (``select_tile``): a name of ``tile_names()``.
TILE_ENV_VAR = "TRITON_MOE_CUTLASS_TILE"


class _MmaS8Trait(Trait):
    pass


@dataclass(frozen=True)
class MmaS8Op(WarpMmaOp):
    """SM80 warp MMA ``m16n8k32`` with SIGNED int8 operands and int32 accumulators.

    The DSL has no public INT8 warp MMA; the SM80 atom takes integer types, and the
    element types pick the PTX: signed i8 -> ``.s32.s8.s8.s32``; the signless
    ``cutlass.Int8.mlir_type`` would give ``.u8.u8`` (wrong for negative values).
    """

    descriptive_name = "warp-level signed INT8 MMA"

    def _make_trait(self, *, loc=None, ip=None, **kwargs: Any) -> _MmaS8Trait:
        shape_mnk = _pack_shape(MMA_SHAPE_MNK, loc=loc, ip=ip)
        s8 = ir.IntegerType.get_signed(8)
        ty = _cute_nvgpu_ir.MmaAtomSM80Type.get(
            shape_mnk.type.attribute, s8, s8, cutlass.Int32.mlir_type
        )
        return _MmaS8Trait(make_atom(ty, loc=loc, ip=ip))

    def _verify_fragment_A(self, input, *, loc=None, ip=None) -> bool:
        return True

    def _verify_fragment_B(self, input, *, loc=None, ip=None) -> bool:
        return True


class HybridGroupedGemm:
    """Grouped hybrid INT8 GEMM kernel (SPEC 5). The constructor fixes what changes the
    code: CTA tile (BLOCK_M, BLOCK_N, BLOCK_K = block_k), output dtype, bias on/off, and
    whether the scales are uniform over a tile; ``__call__`` builds layouts, copy atoms and
    the tiled MMA and launches ``kernel``."""

    def __init__(self, tile_mnk, out_dtype, has_bias: bool, scale_mode,
                 num_stages: int = NUM_STAGES, *, warp_mn=(32, 32), acc_in_regs: bool = False,
                 min_blocks_per_sm: int | None = None):
        self.tile_m, self.tile_n, self.tile_k = tile_mnk
        # one K tile = one quant block (SPEC 5); >= 2 MMA k-steps for the register
        # pipeline, 16-byte copies, 128-byte swizzle atoms
        assert self.tile_k in (64, 128, 256)
        self.warp_m, self.warp_n = warp_mn
        assert self.warp_m % 16 == 0 and self.warp_n % 16 == 0
        assert self.tile_m % self.warp_m == 0 and self.tile_n % self.warp_n == 0
        self.out_dtype = out_dtype
        self.has_bias = has_bias
        # scale_mode (SCALE_MODES; True / False = "tile" / "general"): how Q and F vary
        # over the tile. "tile": Q_A * Q_B and F_A * F_B are one scalar per tile and
        # K-block; "rows": one per row; "general": one per element. Separate variants: the
        # per-row/column path costs ~40-60 more registers, which would cost the cheap
        # path its occupancy.
        if scale_mode is True or scale_mode is False:
            scale_mode = "tile" if scale_mode else "general"
        assert scale_mode in SCALE_MODES, scale_mode
        self.scale_mode = scale_mode
        self.uniform_scales = scale_mode == "tile"
        self.acc_in_regs = acc_in_regs
        # CTAs per SM the register budget is held to
        if min_blocks_per_sm is None:
            min_blocks_per_sm = 2 if self.tile_m == 128 else 3
        self.min_blocks_per_sm = min_blocks_per_sm
        self.num_stages = num_stages
        # warps tile the CTA; each keeps warp_m x warp_n / 32 int32 products and as many
        # int32 group sums (and, with acc_in_regs, fp32 sums) per thread in registers
        self.warp_layout_mnk = (self.tile_m // self.warp_m, self.tile_n // self.warp_n, 1)
        self.num_threads = 32 * self.warp_layout_mnk[0] * self.warp_layout_mnk[1]
        # the 16-byte copy pattern (BK / 16 threads per row) must tile both operands
        rows_per_copy = self.num_threads // (self.tile_k // 16)
        assert rows_per_copy > 0
        assert self.tile_m % rows_per_copy == 0 and self.tile_n % rows_per_copy == 0
        # scale entries staged per K-block (row entries 0..BM-1, column entries BM..):
        # "tile" reads entries 0 and BM, "rows" 0..BM, "general" all BM + BN; a thread
        # stages entries tidx + s * threads for s < scale_slots
        self.num_scale_entries = {"tile": self.tile_m + 1, "rows": self.tile_m + 1,
                                  "general": self.tile_m + self.tile_n}[scale_mode]
        self.scale_slots = -(-self.num_scale_entries // self.num_threads)

    @staticmethod
    def from_config(cfg: TileConfig, block_k: int, out_dtype, has_bias: bool, scale_mode):
        return HybridGroupedGemm((cfg.block_m, cfg.block_n, block_k), out_dtype, has_bias,
                                 scale_mode, cfg.stages, warp_mn=(cfg.warp_m, cfg.warp_n),
                                 acc_in_regs=cfg.acc_in_regs,
                                 min_blocks_per_sm=cfg.min_blocks_per_sm)

    # ------------------------------------------------------------------ host side (jit)
    @cute.jit
    def __call__(
        self,
        a_q: cute.Pointer,
        a_qscale: cute.Pointer,
        a_fscale: cute.Pointer,
        b_q: cute.Pointer,
        b_qscale: cute.Pointer,
        b_fscale: cute.Pointer,
        expert_offsets: cute.Pointer,
        scale_row_offsets: cute.Pointer,
        bias: cute.Pointer,
        out: cute.Pointer,
        num_rows: cutlass.Int32,
        n_out: cutlass.Int32,
        k_blocks: cutlass.Int32,
        num_experts: cutlass.Int32,
        num_scale_rows: cutlass.Int32,
        num_super_groups: cutlass.Int32,
        act_block_m: cutlass.Int32,
        block_n: cutlass.Int32,
        super_group_size: cutlass.Int32,
        stream: cuda.CUstream,
    ):
        BM, BN, BK = self.tile_m, self.tile_n, self.tile_k
        k_in = cute.assume(k_blocks * BK, divby=BK)
        # strides in 64 bits, with their divisibility kept for 16-byte copies
        k_in64 = cute.assume(cutlass.Int64(k_in), divby=BK)
        # Operands: 64-bit strides (E * Nout * Kin can exceed 2**31).
        mA = cute.make_tensor(a_q, cute.make_layout((num_rows, k_in), stride=(k_in64, 1)))
        mB = cute.make_tensor(
            b_q,
            cute.make_layout(
                (num_experts, n_out, k_in),
                stride=(cute.assume(cutlass.Int64(n_out) * k_in64, divby=BK), k_in64, 1),
            ),
        )
        mAQ, mAF, mBQ, mBF, mEO, mSRO, mBias, mOut = side_tensors(
            a_qscale, a_fscale, b_qscale, b_fscale, expert_offsets, scale_row_offsets, bias,
            out, num_rows=num_rows, n_out=n_out, k_blocks=k_blocks, num_experts=num_experts,
            num_scale_rows=num_scale_rows, num_super_groups=num_super_groups,
            block_n=block_n)

        # Shared memory: K-major int8, atoms of 8 rows x 128 bytes (BK = 128), with
        # Swizzle<3,4,3> XORing the 16-byte chunk index with the row, so the 8 rows one
        # ldmatrix reads (same chunk) fall in 8 different bank groups.
        atom_k = min(BK, 128)
        swizzle_bits = int(math.log2(atom_k // 16))
        smem_atom = cute.make_composed_layout(
            cute.make_swizzle(swizzle_bits, 4, 3),
            0,
            cute.make_layout((8, atom_k), stride=(atom_k, 1)),
        )
        sA_layout = cute.tile_to_shape(smem_atom, (BM, BK, self.num_stages), (0, 1, 2))
        sB_layout = cute.tile_to_shape(smem_atom, (BN, BK, self.num_stages), (0, 1, 2))
        # per-row / per-column scale entries, ring of 3 K-blocks (see the kernel)
        sScale_layout = cute.make_layout((BM + BN, 3), stride=(1, BM + BN))
        # thread-private fp32 accumulators: element e of thread t at [e, t]
        acc_per_thread = BM * BN // self.num_threads
        sAcc_layout = cute.make_layout(
            (acc_per_thread, self.num_threads), stride=(self.num_threads, 1)
        )
        smem_size = (
            cute.size_in_bytes(cutlass.Int8, sA_layout)
            + cute.size_in_bytes(cutlass.Int8, sB_layout)
            + 2 * cute.size_in_bytes(cutlass.Int32, sScale_layout)
        )
        if cutlass.const_expr(not self.acc_in_regs):
            smem_size += cute.size_in_bytes(cutlass.Float32, sAcc_layout)

        # Global -> shared: 16-byte cp.async, BK / 16 threads per K-major row.
        copy_bits = 128
        copy_elems = copy_bits // 8
        atom_async_copy = cute.make_copy_atom(
            cute.nvgpu.cpasync.CopyG2SOp(cache_mode=cute.nvgpu.cpasync.LoadCacheMode.GLOBAL),
            cutlass.Int8,
            num_bits_per_copy=copy_bits,
        )
        threads_per_row = BK // copy_elems
        thread_layout = cute.make_layout(
            (self.num_threads // threads_per_row, threads_per_row), stride=(threads_per_row, 1)
        )
        value_layout = cute.make_layout((1, copy_elems))
        tiled_copy_A = cute.make_tiled_copy_tv(atom_async_copy, thread_layout, value_layout)
        tiled_copy_B = cute.make_tiled_copy_tv(atom_async_copy, thread_layout, value_layout)

        # Tiled MMA: warps tile the CTA; N permuted x2 so one ldmatrix.x4 feeds two MMAs.
        wm, wn, _wk = self.warp_layout_mnk
        tiled_mma = cute.make_tiled_mma(
            MmaS8Op(),
            cute.make_layout(self.warp_layout_mnk),
            permutation_mnk=(wm * MMA_SHAPE_MNK[0], wn * MMA_SHAPE_MNK[1] * 2, MMA_SHAPE_MNK[2]),
        )

        num_m_tiles = (num_rows + BM - 1) // BM + num_experts
        num_n_tiles = (n_out + BN - 1) // BN
        self.kernel(
            mA, mB, mAQ, mAF, mBQ, mBF, mEO, mSRO, mBias, mOut,
            num_experts, act_block_m, block_n, super_group_size,
            sA_layout, sB_layout, sScale_layout, sAcc_layout,
            tiled_copy_A, tiled_copy_B, tiled_mma,
        ).launch(
            grid=[num_m_tiles * num_n_tiles, 1, 1],
            block=[self.num_threads, 1, 1],
            smem=smem_size,
            stream=stream,
            min_blocks_per_mp=self.min_blocks_per_sm,
            preferred_smem_carveout=100,   # percent: all of L1/shared as shared memory
        )

    def _owns_scale(self, idx):
        """Whether scale entry ``idx`` (row idx < BM, column idx - BM) is staged: only
        the entries the scale mode reads."""
        if self.scale_mode == "tile":
            return (idx == 0) | (idx == self.tile_m)
        if self.scale_mode == "rows":
            return idx <= self.tile_m
        return idx < self.tile_m + self.tile_n

    # ------------------------------------------------------------------ device code
    @cute.kernel
    def kernel(
        self,
        mA: cute.Tensor,
        mB: cute.Tensor,
        mAQ: cute.Tensor,
        mAF: cute.Tensor,
        mBQ: cute.Tensor,
        mBF: cute.Tensor,
        mEO: cute.Tensor,
        mSRO: cute.Tensor,
        mBias: cute.Tensor,
        mOut: cute.Tensor,
        num_experts: cutlass.Int32,
        act_block_m: cutlass.Int32,
        block_n: cutlass.Int32,
        super_group_size: cutlass.Int32,
        sA_layout: cute.ComposedLayout,
        sB_layout: cute.ComposedLayout,
        sScale_layout: cute.Layout,
        sAcc_layout: cute.Layout,
        tiled_copy_A: cute.TiledCopy,
        tiled_copy_B: cute.TiledCopy,
        tiled_mma: cute.TiledMma,
    ):
        BM, BN, BK = self.tile_m, self.tile_n, self.tile_k
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        n_out = mOut.shape[1]
        num_n_tiles = (n_out + BN - 1) // BN
        tile_n = bidx % num_n_tiles
        tile_m = bidx // num_n_tiles

        # ---- this M tile's expert and first row (common.find_expert)
        expert, row_begin, row_end, m_start = find_expert(mEO, num_experts, tile_m, BM)

        if m_start < row_end:
            k_tile_count = cute.size(mA, mode=[1]) // BK

            # ---- global tiles: gA (BM, BK, k), gB (BN, BK, k), and coordinate twins
            mA_e = cute.domain_offset((m_start, 0), mA)
            gA = cute.local_tile(mA_e, (BM, BK), (0, None))
            gA = cute.make_tensor(gA.iterator.align(16), gA.layout)
            mB_e = mB[expert, None, None]
            gB = cute.local_tile(mB_e, (BN, BK), (tile_n, None))
            gB = cute.make_tensor(gB.iterator.align(16), gB.layout)
            cA = cute.local_tile(
                cute.domain_offset((m_start, 0), cute.make_identity_tensor(mA.shape)),
                (BM, BK),
                (0, None),
            )
            cB = cute.local_tile(
                cute.make_identity_tensor(mB_e.shape), (BN, BK), (tile_n, None)
            )

            smem = cutlass.memory.SmemAllocator()
            sA = smem.allocate_tensor(cutlass.Int8, sA_layout, 16)
            sB = smem.allocate_tensor(cutlass.Int8, sB_layout, 16)
            sQ = smem.allocate_tensor(cutlass.Int32, sScale_layout, 16)
            sF = smem.allocate_tensor(cutlass.Float32, sScale_layout, 16)

            thr_copy_A = tiled_copy_A.get_slice(tidx)
            thr_copy_B = tiled_copy_B.get_slice(tidx)
            tAgA = thr_copy_A.partition_S(gA)
            tAsA = thr_copy_A.partition_D(sA)
            tBgB = thr_copy_B.partition_S(gB)
            tBsB = thr_copy_B.partition_D(sB)
            tAcA = thr_copy_A.partition_S(cA)
            tBcB = thr_copy_B.partition_S(cB)

            # Row predicates (ragged M: the expert's last row; ragged N: Nout); K is
            # always whole (Kin % BK == 0), so predicates are constant along K. Rows
            # predicated off keep stale shared memory: they only feed accumulator rows /
            # columns that are never stored (an int8 MMA cannot trap), so no zero fill.
            tApA = cute.make_rmem_tensor(
                cute.make_layout(
                    (tAgA.shape[0][1], cute.size(tAgA, mode=[1]), cute.size(tAgA, mode=[2])),
                    stride=(cute.size(tAgA, mode=[1]), 1, 0),
                ),
                cutlass.Boolean,
            )
            tBpB = cute.make_rmem_tensor(
                cute.make_layout(
                    (tBgB.shape[0][1], cute.size(tBgB, mode=[1]), cute.size(tBgB, mode=[2])),
                    stride=(cute.size(tBgB, mode=[1]), 1, 0),
                ),
                cutlass.Boolean,
            )
            for rest_v in cutlass.range_constexpr(tApA.shape[0]):
                for m in cutlass.range_constexpr(tApA.shape[1]):
                    tApA[rest_v, m, 0] = tAcA[(0, rest_v), m, 0, 0][0] < row_end
            for rest_v in cutlass.range_constexpr(tBpB.shape[0]):
                for n in cutlass.range_constexpr(tBpB.shape[1]):
                    tBpB[rest_v, n, 0] = tBcB[(0, rest_v), n, 0, 0][0] < n_out

            # ---- prologue: fill NUM_STAGES - 1 stages
            num_smem_stages = cute.size(tAsA, mode=[3])
            k_tile_index = cutlass.Int32(0)
            for k_tile in cutlass.range_constexpr(num_smem_stages - 1):
                if k_tile_index < k_tile_count:
                    cute.copy(
                        tiled_copy_A,
                        tAgA[None, None, None, k_tile_index],
                        tAsA[None, None, None, k_tile],
                        pred=tApA,
                    )
                    cute.copy(
                        tiled_copy_B,
                        tBgB[None, None, None, k_tile_index],
                        tBsB[None, None, None, k_tile],
                        pred=tBpB,
                    )
                k_tile_index = k_tile_index + 1
                cute.arch.cp_async_commit_group()

            # ---- MMA partitions; int32 accumulators in registers: the K-block product
            # D_b and the super-group sum S_g. The fp32 sum over super groups lives in
            # shared memory, thread-private (element e of thread t at [e, t]: no bank
            # conflicts), touched once per super group: 32 fewer registers per thread
            # buys a second resident CTA per SM.
            thr_mma = tiled_mma.get_slice(tidx)
            tCsA = thr_mma.partition_A(sA)
            tCsB = thr_mma.partition_B(sB)
            tCrA = tiled_mma.make_fragment_A(tCsA[None, None, None, 0])
            tCrB = tiled_mma.make_fragment_B(tCsB[None, None, None, 0])
            gOut = cute.local_tile(
                cute.domain_offset((m_start, 0), mOut), (BM, BN), (0, tile_n)
            )
            tCgOut = thr_mma.partition_C(gOut)
            tCcC = thr_mma.partition_C(cute.make_identity_tensor((BM, BN)))
            acc_block = tiled_mma.make_fragment_C(tCgOut)
            acc_group = cute.make_rmem_tensor(acc_block.layout, cutlass.Int32)
            acc_block.fill(0)
            acc_group.fill(0)
            # A thread's accumulator element ((v0, v1), i, j) sits on row (v1, i) and
            # column (v0, j) of the SM80 C layout (checked: partition_C of an identity
            # tensor); its register index (crd2idx in the fragment's compact layout) is
            # its slot in the shared fp32 accumulator.
            rows_v = cute.size(tCcC.shape[0][1])
            cols_v = cute.size(tCcC.shape[0][0])
            mma_m = cute.size(tCcC, mode=[1])
            mma_n = cute.size(tCcC, mode=[2])

            # fp32 super-group sums: element e of this thread at acc_f[e], in registers or
            # in this thread's column of the shared accumulator
            if cutlass.const_expr(self.acc_in_regs):
                acc_f = cute.make_rmem_tensor(cute.make_layout(cute.size(acc_block)),
                                              cutlass.Float32)
            else:
                sAcc = smem.allocate_tensor(cutlass.Float32, sAcc_layout, 16)
                acc_f = sAcc[None, tidx]
            for e in cutlass.range_constexpr(cute.size(acc_block)):
                acc_f[e] = cutlass.Float32(0.0)

            # ---- scales through shared memory. Entry t < BM holds row t's (Q_A, F_A),
            # entry BM + c column c's (Q_B, F_B) for one K-block, in a ring of 3 K-blocks.
            # The entry for K-block k is loaded from global two iterations ahead (k - 2),
            # stored before the barrier of iteration k - 1 and read after the barrier of
            # iteration k; the slot it overwrites was last read before barrier k - 2.
            # A thread stages entries idx = tidx + sl * threads (sl < scale_slots; one
            # slot unless BM + BN > threads), only those the scale mode reads.
            NT = self.num_threads
            SL = self.scale_slots
            scale_rows = cute.make_rmem_tensor(cute.make_layout(SL), cutlass.Int32)
            q_pend = cute.make_rmem_tensor(cute.make_layout(SL), cutlass.Int32)
            f_pend = cute.make_rmem_tensor(cute.make_layout(SL), cutlass.Float32)
            q_new = cute.make_rmem_tensor(cute.make_layout(SL), cutlass.Int32)
            f_new = cute.make_rmem_tensor(cute.make_layout(SL), cutlass.Float32)
            for sl in cutlass.range_constexpr(SL):
                idx = tidx + sl * NT
                if idx < BM:
                    # rows past the expert's end read its last scale row (never stored)
                    row = cutlass.min(m_start + idx, row_end - 1)
                    scale_rows[sl] = mSRO[expert] + (row - row_begin) // act_block_m
                else:
                    col = cutlass.min(tile_n * BN + idx - BM, n_out - 1)
                    scale_rows[sl] = col // block_n
                q_pend[sl] = cutlass.Int32(0)
                f_pend[sl] = cutlass.Float32(0.0)
                if self._owns_scale(idx):
                    if idx < BM:
                        sQ[idx, 0] = mAQ[scale_rows[sl], 0]
                        sF[idx, 0] = mAF[scale_rows[sl], 0]
                    else:
                        sQ[idx, 0] = mBQ[expert, scale_rows[sl], 0]
                        sF[idx, 0] = mBF[expert, scale_rows[sl], 0]
                if self._owns_scale(idx) & (1 < k_tile_count):
                    if idx < BM:
                        q_pend[sl] = mAQ[scale_rows[sl], 1]
                        f_pend[sl] = mAF[scale_rows[sl], 1 // super_group_size]
                    else:
                        q_pend[sl] = mBQ[expert, scale_rows[sl], 1]
                        f_pend[sl] = mBF[expert, scale_rows[sl], 1 // super_group_size]
            q_a = cute.make_rmem_tensor(cute.make_layout((rows_v, mma_m)), cutlass.Int32)
            q_b = cute.make_rmem_tensor(cute.make_layout((cols_v, mma_n)), cutlass.Int32)

            # ---- shared -> register copies (ldmatrix.x4, non-transposed: K-major)
            atom_s2r = cute.make_copy_atom(
                cute.nvgpu.warp.LdMatrix8x8x16bOp(False, 4), cutlass.Int8
            )
            tiled_s2r_A = cute.make_tiled_copy_A(atom_s2r, tiled_mma)
            tiled_s2r_B = cute.make_tiled_copy_B(atom_s2r, tiled_mma)
            thr_s2r_A = tiled_s2r_A.get_slice(tidx)
            thr_s2r_B = tiled_s2r_B.get_slice(tidx)
            tCsA_view = thr_s2r_A.partition_S(sA)
            tCrA_view = thr_s2r_A.retile(tCrA)
            tCsB_view = thr_s2r_B.partition_S(sB)
            tCrB_view = thr_s2r_B.retile(tCrB)

            smem_pipe_read = 0
            smem_pipe_write = num_smem_stages - 1
            tCsA_p = tCsA_view[None, None, None, smem_pipe_read]
            tCsB_p = tCsB_view[None, None, None, smem_pipe_read]
            num_k_block = cute.size(tCrA, mode=[2])
            cute.arch.cp_async_wait_group(num_smem_stages - 2)
            cute.arch.sync_threads()
            cute.copy(tiled_s2r_A, tCsA_p[None, None, 0], tCrA_view[None, None, 0])
            cute.copy(tiled_s2r_B, tCsB_p[None, None, 0], tCrB_view[None, None, 0])

            # ---- main loop: one iteration = one K-block = one quant block
            for k_tile in range(k_tile_count):
                k_ahead = k_tile + 2
                for sl in cutlass.range_constexpr(SL):
                    idx = tidx + sl * NT
                    q_new[sl] = q_pend[sl]
                    f_new[sl] = f_pend[sl]
                    if self._owns_scale(idx) & (k_ahead < k_tile_count):
                        if idx < BM:
                            q_new[sl] = mAQ[scale_rows[sl], k_ahead]
                            f_new[sl] = mAF[scale_rows[sl], k_ahead // super_group_size]
                        else:
                            q_new[sl] = mBQ[expert, scale_rows[sl], k_ahead]
                            f_new[sl] = mBF[expert, scale_rows[sl], k_ahead // super_group_size]

                for k_block in cutlass.range(num_k_block, unroll_full=True):
                    if k_block == num_k_block - 1:
                        for sl in cutlass.range_constexpr(SL):
                            idx = tidx + sl * NT
                            if self._owns_scale(idx) & (k_tile + 1 < k_tile_count):
                                sQ[idx, (k_tile + 1) % 3] = q_pend[sl]
                                sF[idx, (k_tile + 1) % 3] = f_pend[sl]
                        tCsA_p = tCsA_view[None, None, None, smem_pipe_read]
                        tCsB_p = tCsB_view[None, None, None, smem_pipe_read]
                        cute.arch.cp_async_wait_group(num_smem_stages - 2)
                        cute.arch.sync_threads()
                    k_block_next = (k_block + 1) % num_k_block
                    cute.copy(
                        tiled_s2r_A,
                        tCsA_p[None, None, k_block_next],
                        tCrA_view[None, None, k_block_next],
                    )
                    cute.copy(
                        tiled_s2r_B,
                        tCsB_p[None, None, k_block_next],
                        tCrB_view[None, None, k_block_next],
                    )
                    if k_block == 0:  # noqa: SIM102 -- DSL: compile-time test, then a run-time one
                        if k_tile + num_smem_stages - 1 < k_tile_count:
                            cute.copy(
                                tiled_copy_A,
                                tAgA[None, None, None, k_tile_index],
                                tAsA[None, None, None, smem_pipe_write],
                                pred=tApA,
                            )
                    cute.gemm(
                        tiled_mma,
                        acc_block,
                        tCrA[None, None, k_block],
                        tCrB[None, None, k_block],
                        acc_block,
                    )
                    if k_block == 0:
                        if k_tile + num_smem_stages - 1 < k_tile_count:
                            cute.copy(
                                tiled_copy_B,
                                tBgB[None, None, None, k_tile_index],
                                tBsB[None, None, None, smem_pipe_write],
                                pred=tBpB,
                            )
                        k_tile_index = k_tile_index + 1
                        cute.arch.cp_async_commit_group()
                        smem_pipe_write = smem_pipe_read
                        smem_pipe_read = smem_pipe_read + 1
                        if smem_pipe_read == num_smem_stages:
                            smem_pipe_read = 0
                for sl in cutlass.range_constexpr(SL):
                    q_pend[sl] = q_new[sl]
                    f_pend[sl] = f_new[sl]

                # S_g += Q_A * Q_B * D_b (int32, exact under the SPEC 5 bound). When the
                # tile sits inside one activation and one weight scale block (the
                # default: act_block_m = 128 = BLOCK_M, block_n = 64 = BLOCK_N) the
                # weight is one scalar, SPEC 5's cheap case: one IMAD per element.
                scale_buf = k_tile % 3
                if cutlass.const_expr(self.uniform_scales):
                    weight = sQ[0, scale_buf] * sQ[BM, scale_buf]
                    for e in cutlass.range_constexpr(cute.size(acc_block)):
                        acc_group[e] = acc_group[e] + weight * acc_block[e]
                elif cutlass.const_expr(self.scale_mode == "rows"):
                    # one weight per row: Q_A[row] * Q_B (the tile's one column block)
                    q_b_tile = sQ[BM, scale_buf]
                    for v1 in cutlass.range_constexpr(rows_v):
                        for i in cutlass.range_constexpr(mma_m):
                            w_row = sQ[tCcC[(0, v1), i, 0][0], scale_buf] * q_b_tile
                            for v0 in cutlass.range_constexpr(cols_v):
                                for j in cutlass.range_constexpr(mma_n):
                                    acc_group[(v0, v1), i, j] = (
                                        acc_group[(v0, v1), i, j]
                                        + w_row * acc_block[(v0, v1), i, j]
                                    )
                else:
                    for v in cutlass.range_constexpr(rows_v):
                        for i in cutlass.range_constexpr(mma_m):
                            q_a[v, i] = sQ[tCcC[(0, v), i, 0][0], scale_buf]
                    for v in cutlass.range_constexpr(cols_v):
                        for j in cutlass.range_constexpr(mma_n):
                            q_b[v, j] = sQ[BM + tCcC[(v, 0), 0, j][1], scale_buf]
                    for v1 in cutlass.range_constexpr(rows_v):
                        for i in cutlass.range_constexpr(mma_m):
                            for v0 in cutlass.range_constexpr(cols_v):
                                for j in cutlass.range_constexpr(mma_n):
                                    acc_group[(v0, v1), i, j] = (
                                        acc_group[(v0, v1), i, j]
                                        + (q_a[v1, i] * q_b[v0, j]) * acc_block[(v0, v1), i, j]
                                    )
                acc_block.fill(0)

                # end of a super group: acc += (F_A * F_B) * float(S_g), design.md order
                if (k_tile + 1) % super_group_size == 0 or k_tile + 1 == k_tile_count:
                    if cutlass.const_expr(self.uniform_scales):
                        f_ab = sF[0, scale_buf] * sF[BM, scale_buf]
                        for v1 in cutlass.range_constexpr(rows_v):
                            for i in cutlass.range_constexpr(mma_m):
                                for v0 in cutlass.range_constexpr(cols_v):
                                    for j in cutlass.range_constexpr(mma_n):
                                        e = cute.crd2idx(((v0, v1), i, j), acc_block.layout)
                                        acc_f[e] = acc_f[e] + f_ab * (
                                            cutlass.Float32(acc_group[(v0, v1), i, j])
                                        )
                    elif cutlass.const_expr(self.scale_mode == "rows"):
                        f_b_tile = sF[BM, scale_buf]
                        for v1 in cutlass.range_constexpr(rows_v):
                            for i in cutlass.range_constexpr(mma_m):
                                f_ab = sF[tCcC[(0, v1), i, 0][0], scale_buf] * f_b_tile
                                for v0 in cutlass.range_constexpr(cols_v):
                                    for j in cutlass.range_constexpr(mma_n):
                                        e = cute.crd2idx(((v0, v1), i, j), acc_block.layout)
                                        acc_f[e] = acc_f[e] + f_ab * (
                                            cutlass.Float32(acc_group[(v0, v1), i, j])
                                        )
                    else:
                        for v1 in cutlass.range_constexpr(rows_v):
                            for i in cutlass.range_constexpr(mma_m):
                                f_a = sF[tCcC[(0, v1), i, 0][0], scale_buf]
                                for v0 in cutlass.range_constexpr(cols_v):
                                    for j in cutlass.range_constexpr(mma_n):
                                        f_b = sF[BM + tCcC[(v0, 0), 0, j][1], scale_buf]
                                        e = cute.crd2idx(((v0, v1), i, j), acc_block.layout)
                                        acc_f[e] = acc_f[e] + (f_a * f_b) * (
                                            cutlass.Float32(acc_group[(v0, v1), i, j])
                                        )
                    acc_group.fill(0)

            cute.arch.cp_async_wait_group(0)

            # ---- epilogue: out = out_dtype(acc + bias), predicated on rows and columns.
            # A thread's two adjacent columns (v0 = 0, 1; the first one even) go out as one
            # 4-byte (8-byte for fp32) store: the launcher asserts Nout is even and `out`
            # is aligned to two elements, so a pair never straddles Nout or a row.
            out_pair = cute.make_rmem_tensor(cute.make_layout(cols_v), self.out_dtype)
            pair_bytes = cols_v * self.out_dtype.width // 8
            for v1 in cutlass.range_constexpr(rows_v):
                for i in cutlass.range_constexpr(mma_m):
                    row_ok = m_start + tCcC[(0, v1), i, 0][0] < row_end
                    for j in cutlass.range_constexpr(mma_n):
                        col = tile_n * BN + tCcC[(0, 0), 0, j][1]
                        if row_ok & (col < n_out):
                            for v0 in cutlass.range_constexpr(cols_v):
                                e = cute.crd2idx(((v0, v1), i, j), acc_block.layout)
                                value = acc_f[e]
                                if cutlass.const_expr(self.has_bias):
                                    value = value + mBias[expert, col + v0]
                                out_pair[v0] = value.to(self.out_dtype)
                            dst = tCgOut[(None, v1), i, j]
                            dst = cute.make_tensor(dst.iterator.align(pair_bytes), dst.layout)
                            cute.autovec_copy(out_pair, dst)


# ---------------------------------------------------------------------------- launcher
_OUT_DTYPES = {
    torch.bfloat16: cutlass.BFloat16,
    torch.float16: cutlass.Float16,
    torch.float32: cutlass.Float32,
}
_compiled_cache: dict = {}


def select_tile(num_rows: int, num_experts: int, block_n: int = 64,
                capability: tuple[int, int] | None = None) -> str:
    """Tile variant for P = ``num_rows`` rows over ``num_experts`` experts (host ints) on a
    GPU of compute ``capability`` (default: the current CUDA device's).

    ``$TRITON_MOE_CUTLASS_TILE`` (any name of ``tile_names()``) overrides the choice.
    Otherwise: on Hopper (sm_90), ``gemm_sm90.DEFAULT_SM90_TILE`` (TMA + int8 wgmma) when
    ``block_n`` lines up with its columns; elsewhere, or for other ``block_n``, the SM80
    ``mma.sync`` kernel's ``DEFAULT_TILE``, which on an H200 beat every other SM80 variant
    on both GEMMs (bench/results/2026-11-27_H200_cutlass_tiles.log). The reference
    design's switch between "large" and "small" (``reference_tile``) stays reachable by
    name. P and E do not change the choice (kept: the launcher's hook)."""
    del num_rows, num_experts
    override = os.environ.get(TILE_ENV_VAR)
    if override:
        if override not in tile_names():
            raise ValueError(f"${TILE_ENV_VAR}={override!r} is not a tile; one of "
                             f"{tile_names()}")
        return override
    if capability is None:
        capability = (torch.cuda.get_device_capability() if torch.cuda.is_available()
                      else (0, 0))
    if capability[0] == 9 and gemm_sm90.block_n_supported(gemm_sm90.DEFAULT_SM90_TILE,
                                                          block_n):
        return gemm_sm90.DEFAULT_SM90_TILE
    return DEFAULT_TILE


def tile_names() -> list[str]:
    """Every tile name ``grouped_gemm`` takes: the SM80 variants, then the Hopper ones."""
    return sorted(TILE_CONFIGS) + sorted(gemm_sm90.SM90_TILE_CONFIGS)


def reference_tile(num_rows: int, num_experts: int) -> str:
    """The reference design's tile (SPEC 8): 128x64, or 64x64 at <= 70 rows per expert."""
    avg_rows = num_rows / max(num_experts, 1)
    return "small" if avg_rows <= SMALL_TILE_MAX_ROWS_PER_EXPERT else "large"


def _pointer(dtype, address: int, align: int | None = None):
    return make_ptr(dtype, address, AddressSpace.gmem, assumed_align=align)


def _pointer_signature(out_dtype):
    """(cutlass dtype, assumed alignment) of the 10 pointer arguments, in order."""
    return (
        (cutlass.Int8, 16), (cutlass.Int32, 4), (cutlass.Float32, 4),   # a_q, a_qscale, a_fscale
        (cutlass.Int8, 16), (cutlass.Int32, 4), (cutlass.Float32, 4),   # b_q, b_qscale, b_fscale
        (cutlass.Int32, 4), (cutlass.Int32, 4),                         # offsets
        (cutlass.Float32, 4), (out_dtype, out_dtype.width // 4),        # bias, out (pairs)
    )


def scale_mode_for(tile: str, act_block_m: int, block_n: int) -> str:
    """SCALE_MODES entry for a launch: how (Q, F) vary over one tile of ``tile``."""
    cfg = TILE_CONFIGS[tile]
    if block_n % cfg.block_n == 0:
        return "tile" if act_block_m % cfg.block_m == 0 else "rows"
    return "general"


def compile_variant(tile: str, block_k: int, out_dtype, has_bias: bool,
                    variant, *, options: str | None = None):
    """Compile one kernel variant on placeholder pointers (no GPU needed with an explicit
    ``--gpu-arch`` in ``options``: sm_80 for the SM80 tiles, sm_90a for the Hopper ones).
    ``out_dtype`` is a torch dtype; ``variant`` is, for an SM80 tile, its scale mode (one of
    SCALE_MODES; True / False = "tile" / "general"), for a Hopper tile ``(block_n,
    super_group_size, one_group_k_blocks, staged_store)``: the weight scale block, G, the
    K-block count when all of K is one super group (else 0), and whether the output rows
    allow 16-byte stores (all compiled in)."""
    c_dtype = _OUT_DTYPES[out_dtype]
    if tile in gemm_sm90.SM90_TILE_CONFIGS:
        kernel = gemm_sm90.HybridGroupedGemmSm90(gemm_sm90.SM90_TILE_CONFIGS[tile], block_k,
                                                 c_dtype, has_bias, *variant)
    else:
        kernel = HybridGroupedGemm.from_config(TILE_CONFIGS[tile], block_k, c_dtype, has_bias,
                                               variant)
    pointers = [_pointer(dt, 256, al) for dt, al in _pointer_signature(c_dtype)]
    scalars = [1] * 9
    stream = cute.runtime.make_fake_stream()
    kwargs = {} if options is None else {"options": options}
    return cute.compile(kernel, *pointers, *scalars, stream, **kwargs)


def grouped_gemm(a_q: torch.Tensor, a_qscale: torch.Tensor, a_fscale: torch.Tensor,
                 b_q: torch.Tensor, b_qscale: torch.Tensor, b_fscale: torch.Tensor,
                 expert_offsets: torch.Tensor, scale_row_offsets: torch.Tensor, *,
                 act_block_m: int, block_n: int, block_k: int, super_group_size: int,
                 out_dtype: torch.dtype, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, tile: str | None = None) -> torch.Tensor:
    """Hybrid grouped GEMM (SPEC 5) of every expert in one launch; same contract as
    ``triton_moe.gemm.grouped_gemm`` (layouts in docs/design.md). ``tile`` ("large" /
    "small") overrides the choice by P / E. Rows >= expert_offsets[E] are left untouched.
    No host sync: the grid depends on P, E and Nout only (CUDA-graph capturable)."""
    num_rows, k_in = a_q.shape
    num_experts, n_out, _ = b_q.shape
    assert a_q.dtype == torch.int8 and b_q.dtype == torch.int8
    assert a_qscale.dtype == torch.int32 and b_qscale.dtype == torch.int32
    assert a_fscale.dtype == torch.float32 and b_fscale.dtype == torch.float32
    assert expert_offsets.dtype == torch.int32 and scale_row_offsets.dtype == torch.int32
    assert b_q.shape[2] == k_in and k_in % block_k == 0 and block_k in (64, 128, 256)
    assert out_dtype in _OUT_DTYPES, f"out_dtype {out_dtype} not supported"
    tensors = [a_q, a_qscale, a_fscale, b_q, b_qscale, b_fscale, expert_offsets,
               scale_row_offsets]
    if bias is not None:
        assert bias.dtype == torch.float32 and bias.shape == (num_experts, n_out)
        tensors.append(bias)
    assert all(t.is_contiguous() for t in tensors), "all inputs must be contiguous"
    # the kernel's 16-byte cp.async copies assume this (as from_dlpack(assumed_align=16))
    assert a_q.data_ptr() % 16 == 0 and b_q.data_ptr() % 16 == 0
    if out is None:
        out = torch.empty(num_rows, n_out, dtype=out_dtype, device=a_q.device)
    assert out.shape == (num_rows, n_out) and out.dtype == out_dtype and out.is_contiguous()
    # the epilogue stores column pairs (see the kernel)
    assert n_out % 2 == 0 and out.data_ptr() % (2 * out.element_size()) == 0
    if num_rows == 0 or n_out == 0 or num_experts == 0:
        return out

    num_k_blocks = k_in // block_k
    capability = torch.cuda.get_device_capability(a_q.device)
    tile = tile or select_tile(num_rows, num_experts, block_n, capability)
    c_dtype = _OUT_DTYPES[out_dtype]
    if tile in gemm_sm90.SM90_TILE_CONFIGS:
        major, minor = capability
        if major != 9:
            raise ValueError(f"tile {tile!r} is a Hopper (sm_90a wgmma) kernel; this GPU is "
                             f"sm_{major}{minor}: use one of {sorted(TILE_CONFIGS)}")
        if not gemm_sm90.block_n_supported(tile, block_n):
            raise ValueError(f"tile {tile!r} needs block_n a multiple of 8 that divides "
                             f"or is a multiple of {gemm_sm90.SM90_TILE_CONFIGS[tile].block_n}"
                             f"; got block_n={block_n}")
        # 16-byte epilogue stores need 16-byte aligned output rows (Nout a multiple of
        # 8 bf16 / 4 fp32); Nout is then also a multiple of the piece, so pieces never
        # straddle it
        staged_store = (n_out * out.element_size()) % 16 == 0 and out.data_ptr() % 16 == 0
        # all of K in one super group: its K-block count is compiled in (K is fixed per
        # layer), the K loop unrolls
        one_group_k_blocks = num_k_blocks if num_k_blocks <= super_group_size else 0
        variant = (block_n, super_group_size, one_group_k_blocks, staged_store)
    elif tile in TILE_CONFIGS:
        variant = scale_mode_for(tile, act_block_m, block_n)
    else:
        raise ValueError(f"unknown tile {tile!r}; one of {tile_names()}")
    key = (tile, block_k, out_dtype, bias is not None, variant)
    compiled = _compiled_cache.get(key)
    if compiled is None:
        compiled = compile_variant(tile, block_k, out_dtype, bias is not None, variant)
        _compiled_cache[key] = compiled

    addresses = (a_q, a_qscale, a_fscale, b_q, b_qscale, b_fscale, expert_offsets,
                 scale_row_offsets, a_fscale if bias is None else bias, out)  # unread if None
    pointers = [_pointer(dt, t.data_ptr(), al)
                for (dt, al), t in zip(_pointer_signature(c_dtype), addresses)]
    num_super_groups = a_fscale.shape[1]
    stream = cuda.CUstream(torch.cuda.current_stream(a_q.device).cuda_stream)
    compiled(*pointers, num_rows, n_out, num_k_blocks, num_experts, a_qscale.shape[0],
             num_super_groups, act_block_m, block_n, super_group_size, stream)
    return out
