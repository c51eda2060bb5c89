"""Hybrid grouped INT8 GEMM (SPEC 5) as a CuTe DSL kernel for Hopper (sm_90a): TMA loads
and int8 ``wgmma``. Same contract as ``cutlass_backend.gemm`` (the SM80 ``mma.sync``
kernel); ``cutlass_backend.gemm.grouped_gemm`` sends a launch here when its tile is one of
``SM90_TILE_CONFIGS``. Imports the CUTLASS Python DSL at the top, like ``gemm.py``.

Algorithm (one CTA = one BLOCK_M x BLOCK_N output tile of one expert)
--------------------------------------------------------------------
* Grid and expert search as in ``gemm.py``: ``(cdiv(P, BLOCK_M) + E) * cdiv(Nout, BLOCK_N)``
  CTAs; for experts of over 8 MB of weights, groups of GROUP_M M tiles walk down each N
  column together (the Triton kernel's order), else one M tile walks all N tiles; an M
  tile finds its expert with one ballot/popc count over
  ``expert_offsets[e] + e * BLOCK_M``; surplus tiles exit.
* Loads: one TMA copy per operand and K-block into a ``STAGES``-deep ring of 128-byte
  swizzled K-major tiles, guarded by a full/empty mbarrier pair per stage
  (``PipelineTmaAsync``). Warp 0 issues the copies; every warp releases a stage once its
  wgmma has read it. A tile starts at the expert's segment row, not at a multiple of
  BLOCK_M, so A is tiled from an offset view; rows past P come back zero-filled from the
  TMA unit, rows of the next expert are loaded but never stored.
* One warpgroup per 64 rows. Per K-block (BLOCK_K = block_k): ``BLOCK_K / 32`` int8
  ``wgmma.m64nBLOCK_Nk32`` into an int32 tile ``D_b`` (zeroed by the first one), wait,
  then ``S_g += (Q_A[row] * Q_B[col block]) * D_b`` in int32 and, at the end of a super
  group, ``acc += (F_A * F_B) * float(S_g)`` in fp32 (design.md's order). A thread's
  accumulator elements lie on 2 rows, so the activation weights are 2 scalars per thread
  for any ``act_block_m`` (per-token included); the weight column block of each element
  is known at compile time (``block_n`` and G are compile-time parameters). The Q of
  K-block k are loaded two blocks ahead (an L2 round trip outlasts one block's wgmma and
  weighting), the F of a super group one group ahead; when all of K is one super group
  its K-block count is compiled in, the loop unrolls and every Q is loaded up front.
  Warp 0 issues the first TMA copies before the scale loads and set-up.
* The wgmma result is needed before the weighting, so one warpgroup idles its tensor
  cores while it weights; two CTAs per SM (<= 255 registers) interleave their wgmma and
  integer phases, as the Triton kernel does. When all of K is one super group (GEMM2 of
  the default workload) no fp32 accumulator is carried: 168 registers, three CTAs per SM.
  Issuing block k + 1's wgmma before weighting block k (two product tiles) was tried and
  dropped: the compiler copied the in-flight product tile at the loop entry and then
  serialized every wgmma (ptxas C7514), see bench/results/cutlass_sm90.md.
* Epilogue: ``out = out_dtype(acc + bias)``, predicated on the expert's last row and on
  Nout: staged through shared memory (B's stages, free by then) and stored in 16-byte
  pieces when the output rows are 16-byte aligned, else two adjacent columns per store
  from registers.

Requirements (the launcher in ``gemm.py`` checks them): ``block_k`` in (64, 128, 256),
``Kin % block_k == 0``, ``block_n`` a multiple of 8 that divides BLOCK_N or is a multiple of
it, int8 operands 16-byte aligned (TMA), contiguous tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import cuda.bindings.driver as cuda
import cutlass
import cutlass.memory
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import cute, pipeline
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warpgroup
from cutlass.tensor_utils import LayoutEnum

from cutlass_backend.common import find_expert, side_tensors

WGMMA_M = 64          # rows of one warpgroup MMA
GROUP_M = 8           # M tiles per column walk (tile order, see the kernel) ...
GROUP_M_MIN_BYTES = 8 << 20   # ... for experts with more int8 weight bytes than this
SMEM_ALIGN = 1024     # 128-byte swizzle atoms repeat every 8 rows x 128 bytes


@dataclass(frozen=True)
class Sm90TileConfig:
    """One compiled Hopper tile: CTA tile ``block_m x block_n`` (BLOCK_K = the
    quantization block_k), one warpgroup per 64 rows, ``stages`` TMA stages."""

    block_m: int
    block_n: int
    stages: int = 4

    @property
    def num_warpgroups(self) -> int:
        return self.block_m // WGMMA_M

    def describe(self) -> str:
        return (f"{self.block_m}x{self.block_n} wgmma, {self.num_warpgroups} warpgroup(s), "
                f"s{self.stages} TMA")


# Tile variants by name (the ``tile=`` argument of cutlass_backend.grouped_gemm).
SM90_TILE_CONFIGS = {
    "sm90_64x128": Sm90TileConfig(64, 128, stages=3),
    "sm90_64x128_s4": Sm90TileConfig(64, 128, stages=4),
    "sm90_128x128": Sm90TileConfig(128, 128, stages=3),
    "sm90_64x64": Sm90TileConfig(64, 64, stages=4),
}
# Shared memory one CTA may use for its stages (of the 227 KB an H100/H200 CTA may get):
# fewer stages than configured when block_k is large (block_k 256 at 128x128: 3 of 64 KB).
SMEM_STAGES_BUDGET = 200 * 1024
DEFAULT_SM90_TILE = "sm90_64x128"


def block_n_supported(tile: str, block_n: int) -> bool:
    """Whether the weight scale block ``block_n`` lines up with the tile's columns (each
    8-column slice of a wgmma accumulator must lie inside one scale block)."""
    tile_n = SM90_TILE_CONFIGS[tile].block_n
    return block_n % 8 == 0 and (tile_n % block_n == 0 or block_n % tile_n == 0)


class HybridGroupedGemmSm90:
    """Grouped hybrid INT8 GEMM kernel (SPEC 5) on Hopper. The constructor fixes what
    changes the code: CTA tile, block_k, stages, output dtype, bias, and the weight scale
    block ``block_n``; ``__call__`` takes the same arguments as ``gemm.HybridGroupedGemm``."""

    def __init__(self, cfg: Sm90TileConfig, block_k: int, out_dtype, has_bias: bool,
                 block_n: int, super_group_size: int, one_group_k_blocks: int = 0,
                 staged_store: bool = False):
        assert block_k in (64, 128, 256)
        assert cfg.block_m % WGMMA_M == 0 and cfg.block_n % 16 == 0
        self.tile_m, self.tile_n, self.tile_k = cfg.block_m, cfg.block_n, block_k
        stage_bytes = (cfg.block_m + cfg.block_n) * block_k
        self.num_stages = max(2, min(cfg.stages, SMEM_STAGES_BUDGET // stage_bytes))
        # one_group_k_blocks > 0: all of K is one super group of that many K-blocks
        # (GEMM2 at the default workload: 4 K-blocks, G = 4). The fp32 sum is formed once
        # at the end, so no fp32 accumulator is carried (64 fewer registers let three
        # one-warpgroup CTAs share an SM), and the K loop is unrolled.
        assert 0 <= one_group_k_blocks <= super_group_size
        self.one_group_k_blocks = one_group_k_blocks
        self.one_super_group = one_group_k_blocks > 0
        # G is compiled in: the flush test and the super group of a K-block are then a
        # mask or a multiply, not a run-time integer division per K-block
        self.super_group_size = super_group_size
        self.num_warpgroups = cfg.num_warpgroups
        self.num_threads = 128 * self.num_warpgroups
        # staged_store (the launcher sets it when Nout rows and `out` are 16-byte aligned):
        # the epilogue writes the tile to shared memory (B's stages, free by then; rows
        # padded by 16 bytes: conflict-free) and stores it in 16-byte pieces, whole
        # 32-byte sectors per warp, instead of the fragment's 4-byte pairs
        out_bytes = 4 if out_dtype is None else out_dtype.width // 8
        self.epi_pitch = cfg.block_n + 16 // out_bytes
        self.staged_store = staged_store and (
            cfg.block_m * self.epi_pitch * out_bytes <= self.num_stages * cfg.block_n * block_k)
        self.out_dtype = out_dtype
        self.has_bias = has_bias
        assert block_n % 8 == 0 and (self.tile_n % block_n == 0 or block_n % self.tile_n == 0)
        self.scale_block_n = block_n
        # weight column blocks inside one tile (1 when a block covers the tile)
        self.col_blocks = max(1, self.tile_n // block_n)
        # CTAs per SM the register budget is held to: three one-warpgroup CTAs (<= 168
        # registers) when the int32 / fp32 tiles a thread keeps leave ~40 registers for the
        # rest and three CTAs' stages fit in shared memory, else two (one with two
        # warpgroups)
        per_thread = cfg.block_m * cfg.block_n // (128 * self.num_warpgroups)
        acc_registers = per_thread * (2 if self.one_super_group else 3)
        smem_per_cta = self.num_stages * stage_bytes + 2048
        if self.num_warpgroups > 1:
            self.min_blocks_per_sm = 1
        elif acc_registers + 40 <= 168 and 3 * smem_per_cta <= 228 * 1024:
            self.min_blocks_per_sm = 3
        else:
            self.min_blocks_per_sm = 2

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
        k_in64 = cute.assume(cutlass.Int64(k_in), divby=BK)
        # A [P, Kin]; B as (Nout, Kin, E): the expert is the batch mode of its TMA tensor
        mA = cute.make_tensor(a_q, cute.make_layout((num_rows, k_in), stride=(k_in64, 1)))
        mB = cute.make_tensor(
            b_q,
            cute.make_layout(
                (n_out, k_in, num_experts),
                stride=(k_in64, 1, cute.assume(cutlass.Int64(n_out) * k_in64, divby=BK)),
            ),
        )
        mAQ, mAF, mBQ, mBF, mEO, mSRO, mBias, mOut = side_tensors(
            a_qscale, a_fscale, b_qscale, b_fscale, expert_offsets, scale_row_offsets, bias,
            out, num_rows=num_rows, n_out=n_out, k_blocks=k_blocks, num_experts=num_experts,
            num_scale_rows=num_scale_rows, num_super_groups=num_super_groups,
            block_n=block_n)

        # int8 wgmma, both operands K-major from shared memory; one warpgroup per 64 rows
        tiled_mma = sm90_utils.make_trivial_tiled_mma(
            cutlass.Int8, cutlass.Int8, OperandMajorMode.K, OperandMajorMode.K,
            cutlass.Int32, (self.num_warpgroups, 1, 1), (WGMMA_M, BN))
        tile_mnk = (BM, BN, BK)
        sA_layout = sm90_utils.make_smem_layout_a(
            LayoutEnum.ROW_MAJOR, tile_mnk, cutlass.Int8, self.num_stages)
        sB_layout = sm90_utils.make_smem_layout_b(
            LayoutEnum.ROW_MAJOR, tile_mnk, cutlass.Int8, self.num_stages)
        tma_atom_a, tma_a = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mA, cute.slice_(sA_layout, (None, None, 0)),
            (BM, BK))
        tma_atom_b, tma_b = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mB, cute.slice_(sB_layout, (None, None, 0)),
            (BN, BK))

        @cute.struct
        class SharedStorage:
            stage_barriers: cute.struct.MemRange[cutlass.Int64, self.num_stages * 2]
            sA: cute.struct.Align[
                cute.struct.MemRange[cutlass.Int8, cute.cosize(sA_layout)], SMEM_ALIGN]
            sB: cute.struct.Align[
                cute.struct.MemRange[cutlass.Int8, cute.cosize(sB_layout)], SMEM_ALIGN]

        self.shared_storage = SharedStorage

        num_m_tiles = (num_rows + BM - 1) // BM + num_experts
        num_n_tiles = (n_out + BN - 1) // BN
        self.kernel(
            tma_atom_a, tma_a, tma_atom_b, tma_b,
            mAQ, mAF, mBQ, mBF, mEO, mSRO, mBias, mOut,
            num_experts, act_block_m, super_group_size,
            sA_layout, sB_layout, tiled_mma,
        ).launch(
            grid=[num_m_tiles * num_n_tiles, 1, 1],
            block=[self.num_threads, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
            min_blocks_per_mp=self.min_blocks_per_sm,
            preferred_smem_carveout=100,   # percent: all of L1/shared as shared memory
        )

    # ------------------------------------------------------------------ device code
    @cute.kernel
    def kernel(
        self,
        tma_atom_a: cute.CopyAtom,
        mA: cute.Tensor,
        tma_atom_b: cute.CopyAtom,
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
        super_group_size: cutlass.Int32,
        sA_layout: cute.ComposedLayout,
        sB_layout: cute.ComposedLayout,
        tiled_mma: cute.TiledMma,
    ):
        BM, BN, BK = self.tile_m, self.tile_n, self.tile_k
        del super_group_size   # the launch argument; G is compiled in
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        n_out = mOut.shape[1]
        num_n_tiles = (n_out + BN - 1) // BN
        # Tile order. Experts whose weights exceed GROUP_M_MIN_BYTES (Mixtral: 117 MB of
        # w13 each): GROUP_M M tiles walk one N column together (the Triton kernel's
        # order), so each weight tile comes from DRAM once per group. Smaller experts
        # (the default workload: 1-2 MB): one M tile walks all N tiles, its A tile hot in
        # L2 (H100, GEMM2: 1.09x Triton against 1.12x with GROUP_M 8).
        group_m = GROUP_M if cutlass.Int64(n_out) * mA.shape[1] > GROUP_M_MIN_BYTES else 1
        num_m_tiles = (mOut.shape[0] + BM - 1) // BM + num_experts
        tiles_per_group = group_m * num_n_tiles
        first_tile_m = (bidx // tiles_per_group) * group_m
        group_size_m = cutlass.min(num_m_tiles - first_tile_m, group_m)
        tile_m = first_tile_m + (bidx % tiles_per_group) % group_size_m
        tile_n = (bidx % tiles_per_group) // group_size_m

        if warp_idx == 0:
            cpasync.prefetch_descriptor(tma_atom_a)
            cpasync.prefetch_descriptor(tma_atom_b)

        # ---- this M tile's expert and first row (common.find_expert)
        expert, row_begin, row_end, m_start = find_expert(mEO, num_experts, tile_m, BM)

        if m_start < row_end:   # uniform over the CTA
            k_tile_count = mAQ.shape[1]
            # issued now, beside the expert's offsets: the scale loads depend on it
            expert_scale_row = mSRO[expert]

            smem = cutlass.memory.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            sA = storage.sA.get_tensor(sA_layout.outer, swizzle=sA_layout.inner)
            sB = storage.sB.get_tensor(sB_layout.outer, swizzle=sB_layout.inner)

            # full barrier: the TMA transaction bytes of one stage; empty barrier: one
            # arrival per warp once its wgmma has read the stage
            stage_bytes = (cute.size_in_bytes(cutlass.Int8, cute.slice_(sA_layout, (None, None, 0)))
                           + cute.size_in_bytes(cutlass.Int8,
                                                cute.slice_(sB_layout, (None, None, 0))))
            stages = pipeline.PipelineTmaAsync.create(
                barrier_storage=storage.stage_barriers.data_ptr(),
                num_stages=self.num_stages,
                producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
                consumer_group=pipeline.CooperativeGroup(
                    pipeline.Agent.Thread, self.num_threads // 32),
                tx_count=stage_bytes,
                cta_layout_vmnk=cute.make_layout((1, 1, 1, 1)),
            )

            # ---- global tiles (TMA coordinates): A from the segment row, B of the expert
            gA = cute.local_tile(cute.domain_offset((m_start, 0), mA), (BM, BK), (0, None))
            gB = cute.local_tile(mB[None, None, expert], (BN, BK), (tile_n, None))
            tAsA, tAgA = cpasync.tma_partition(
                tma_atom_a, 0, cute.make_layout(1),
                cute.group_modes(sA, 0, 2), cute.group_modes(gA, 0, 2))
            tBsB, tBgB = cpasync.tma_partition(
                tma_atom_b, 0, cute.make_layout(1),
                cute.group_modes(sB, 0, 2), cute.group_modes(gB, 0, 2))

            # ---- prologue: warp 0 fills the ring first, so that the copies are in flight
            # during the set-up and scale loads below
            producer = pipeline.make_pipeline_state(
                pipeline.PipelineUserType.Producer, self.num_stages)
            consumer = pipeline.make_pipeline_state(
                pipeline.PipelineUserType.Consumer, self.num_stages)
            if warp_idx == 0:
                for _ in cutlass.range(cutlass.min(self.num_stages, k_tile_count), unroll=1):
                    self._load_stage(stages, producer, tma_atom_a, tAgA, tAsA, tma_atom_b,
                                     tBgB, tBsB)
                    producer.advance()

            # ---- MMA operands (per warpgroup) and this thread's accumulator coordinates
            warpgroup_idx = cute.arch.make_warp_uniform(tidx // 128)
            thr_mma_wg = tiled_mma.get_slice(warpgroup_idx * 128)
            tCrA = tiled_mma.make_fragment_A(thr_mma_wg.partition_A(sA))
            tCrB = tiled_mma.make_fragment_B(thr_mma_wg.partition_B(sB))
            thr_mma = tiled_mma.get_slice(tidx)
            tCcC = thr_mma.partition_C(cute.make_identity_tensor((BM, BN)))
            gOut = cute.local_tile(cute.domain_offset((m_start, 0), mOut), (BM, BN), (0, tile_n))
            tCgOut = thr_mma.partition_C(gOut)
            acc_block = cute.make_rmem_tensor(tCcC.shape, cutlass.Int32)
            acc_group = cute.make_rmem_tensor(tCcC.shape, cutlass.Int32)
            acc_group.fill(0)
            num_acc = cute.size(acc_block)
            acc_f = None
            if cutlass.const_expr(not self.one_super_group):
                acc_f = cute.make_rmem_tensor(cute.make_layout(num_acc), cutlass.Float32)
                acc_f.fill(0.0)

            # wgmma C fragment: mode 0 = (2 adjacent columns, 2 rows 8 apart, BN / 8
            # column slices), then (MMA_M, MMA_N) = (1, 1) per warpgroup. Element
            # (c, r, j) is register c + 2 r + 4 j of a compact fragment.
            assert cute.size(tCcC, mode=[1]) == 1 and cute.size(tCcC, mode=[2]) == 1
            frag = tCcC.shape[0]
            assert cute.size(frag[0]) == 2 and cute.size(frag[1]) == 2
            n_slices = cute.size(frag[2])
            assert n_slices * 8 == BN
            # weight column block of each 8-column slice, known at compile time (0 for
            # every slice when block_n >= BN)
            slice_block = [(j * 8) // self.scale_block_n for j in range(n_slices)]

            # scale rows of this thread's 2 accumulator rows (rows past the expert's
            # end read its last scale row: they are never stored)
            a_scale_row = cute.make_rmem_tensor(cute.make_layout(2), cutlass.Int32)
            for r in cutlass.range_constexpr(2):
                row = cutlass.min(m_start + tCcC[(0, r, 0), 0, 0][0], row_end - 1)
                a_scale_row[r] = expert_scale_row + (row - row_begin) // act_block_m
            # weight scale column blocks of the tile (columns past Nout clamp)
            b_col_block = cute.make_rmem_tensor(cute.make_layout(self.col_blocks), cutlass.Int32)
            last_col_block = (n_out - 1) // self.scale_block_n
            for cb in cutlass.range_constexpr(self.col_blocks):
                b_col_block[cb] = cutlass.min(
                    (tile_n * BN + cb * self.scale_block_n) // self.scale_block_n,
                    last_col_block)

            f_group = self._scale_registers(cutlass.Float32)
            self._load_scales(f_group, 0, mAF, mBF, expert, a_scale_row, b_col_block)
            weight = cute.make_rmem_tensor(cute.make_layout((2, self.col_blocks)), cutlass.Int32)
            if cutlass.const_expr(self.one_group_k_blocks > 0):
                # All of K is one super group and its K-block count is compiled in: the K
                # loop unrolls and every K-block's Q is loaded up front.
                num_kb = self.one_group_k_blocks
                q_all = [self._scale_registers(cutlass.Int32) for _ in range(num_kb)]
                for kb in cutlass.range_constexpr(num_kb):
                    self._load_scales(q_all[kb], kb, mAQ, mBQ, expert, a_scale_row, b_col_block)
                for kb in cutlass.range_constexpr(num_kb):
                    stages.consumer_wait(consumer)
                    tiled_mma = self._issue_mma(tiled_mma, acc_block, tCrA, tCrB,
                                                consumer.index)
                    self._block_weights(weight, q_all[kb])
                    warpgroup.wait_group(0)
                    stages.consumer_release(consumer)
                    consumer.advance()
                    if cutlass.const_expr(kb + self.num_stages < num_kb):  # noqa: SIM102
                        if warp_idx == 0:   # refill the released stage
                            self._load_stage(stages, producer, tma_atom_a, tAgA, tAsA,
                                             tma_atom_b, tBgB, tBsB)
                            producer.advance()
                    self._weigh(acc_group, acc_block, weight, slice_block, n_slices)
            else:
                # Q of K-block k loaded two blocks ahead (an L2 round trip outlasts one
                # block's wgmma and weighting) into two register sets that alternate by
                # name (K-blocks in pairs), so no in-flight load is copied; the F of a super
                # group are loaded at the previous group's flush.
                q_even = self._scale_registers(cutlass.Int32)
                q_odd = self._scale_registers(cutlass.Int32)
                self._load_scales(q_even, 0, mAQ, mBQ, expert, a_scale_row, b_col_block)
                self._load_scales(q_odd, cutlass.min(1, k_tile_count - 1), mAQ, mBQ, expert,
                             a_scale_row, b_col_block)
                operands = (stages, tma_atom_a, tAgA, tAsA, tma_atom_b, tBgB, tBsB, tCrA,
                            tCrB, mAQ, mAF, mBQ, mBF, expert, a_scale_row, b_col_block,
                            warp_idx)
                # (the pipeline states are assigned from the helper's return: the DSL
                # carries through a loop or branch only the names assigned or
                # method-called in it)
                for k_pair in cutlass.range(0, k_tile_count, 2, unroll=1):
                    tiled_mma, producer, consumer = self._k_block(
                        k_pair, k_tile_count, tiled_mma, producer, consumer, acc_block,
                        acc_group, acc_f, weight, q_even, f_group, slice_block, n_slices,
                        operands)
                    if k_pair + 1 < k_tile_count:
                        tiled_mma, producer, consumer = self._k_block(
                            k_pair + 1, k_tile_count, tiled_mma, producer, consumer,
                            acc_block, acc_group, acc_f, weight, q_odd, f_group, slice_block,
                            n_slices, operands)
            f_a, f_b = f_group

            # ---- epilogue: out = out_dtype(acc + bias), predicated on the expert's rows
            # and Nout; directly in column pairs, or staged through shared memory
            out_pair = cute.make_rmem_tensor(cute.make_layout(2), self.out_dtype)
            pair_bytes = 2 * self.out_dtype.width // 8
            if cutlass.const_expr(self.staged_store):
                sEpi = cute.make_tensor(
                    cute.recast_ptr(storage.sB.data_ptr(), dtype=self.out_dtype),
                    cute.make_layout((BM, self.epi_pitch), stride=(self.epi_pitch, 1)))
                cute.arch.sync_threads()   # every wgmma has read its B stage
            for r in cutlass.range_constexpr(2):
                row = tCcC[(0, r, 0), 0, 0][0]
                row_ok = m_start + row < row_end
                for j in cutlass.range_constexpr(n_slices):
                    col = tCcC[(0, r, j), 0, 0][1]
                    if cutlass.const_expr(self.staged_store):
                        keep = True
                    else:
                        keep = row_ok & (tile_n * BN + col < n_out)
                    if keep:
                        for c in cutlass.range_constexpr(2):
                            if cutlass.const_expr(self.one_super_group):
                                # the one flush: 0 + (F_A * F_B) * float(S) is this exactly
                                value = (f_a[r] * f_b[slice_block[j]]) * cutlass.Float32(
                                    acc_group[c + 2 * r + 4 * j])
                            else:
                                value = acc_f[c + 2 * r + 4 * j]
                            if cutlass.const_expr(self.has_bias):
                                value = value + mBias[expert, cutlass.min(tile_n * BN + col + c,
                                                                          n_out - 1)]
                            out_pair[c] = value.to(self.out_dtype)
                        if cutlass.const_expr(self.staged_store):
                            dst = cute.make_tensor((sEpi.iterator + row * self.epi_pitch + col)
                                                   .align(pair_bytes), cute.make_layout(2))
                        else:
                            dst = tCgOut[(None, r, j), 0, 0]
                            dst = cute.make_tensor(dst.iterator.align(pair_bytes), dst.layout)
                        cute.autovec_copy(out_pair, dst)
            if cutlass.const_expr(self.staged_store):
                cute.arch.sync_threads()
                # 16-byte pieces: a warp stores 512 contiguous bytes of 1-4 rows
                piece = 16 // (self.out_dtype.width // 8)
                pieces_per_row = BN // piece
                out_piece = cute.make_rmem_tensor(cute.make_layout(piece), self.out_dtype)
                for i in cutlass.range_constexpr(BM * pieces_per_row // self.num_threads):
                    idx = tidx + i * self.num_threads
                    row = idx // pieces_per_row
                    col = (idx % pieces_per_row) * piece
                    if (m_start + row < row_end) & (tile_n * BN + col < n_out):
                        src = cute.make_tensor((sEpi.iterator + row * self.epi_pitch + col)
                                               .align(16), cute.make_layout(piece))
                        cute.autovec_copy(src, out_piece)
                        dst = cute.make_tensor(
                            (gOut.iterator + cutlass.Int64(row) * n_out + col).align(16),
                            cute.make_layout(piece))
                        cute.autovec_copy(out_piece, dst)

    # ------------------------------------------------------------------ device helpers
    # (traced inline into the kernel; Python loops unroll at compile time)
    def _scale_registers(self, dtype):
        """One scale column (Q of a K-block: Int32, or F of a super group: Float32) of this
        thread's 2 rows and of the tile's column blocks: (a side, b side)."""
        return (cute.make_rmem_tensor(cute.make_layout(2), dtype),
                cute.make_rmem_tensor(cute.make_layout(self.col_blocks), dtype))

    def _load_scales(self, dst, column, mA_scale, mB_scale, expert, a_scale_row,
                     b_col_block):
        """dst <- column ``column`` (a K-block of Q_A / Q_B, or a super group of F_A / F_B)
        at this thread's 2 scale rows and the tile's weight column blocks."""
        dst_a, dst_b = dst
        for r in range(2):
            dst_a[r] = mA_scale[a_scale_row[r], column]
        for cb in range(self.col_blocks):
            dst_b[cb] = mB_scale[expert, b_col_block[cb], column]

    def _block_weights(self, weight, q):
        q_a, q_b = q
        for r in range(2):
            for cb in range(self.col_blocks):
                weight[r, cb] = q_a[r] * q_b[cb]

    @cute.jit
    def _k_block(self, k_tile, k_tile_count, tiled_mma, producer, consumer, acc_block,
                 acc_group, acc_f, weight, q, f_group, slice_block, n_slices, operands):
        """K-block ``k_tile``: D_b = A_b B_b^T (wait), refill the released stage, S_g +=
        Q_A Q_B D_b, flush at the end of a super group; ``q`` holds this block's Q and is
        then reloaded with block k_tile + 2's. Returns (tiled_mma, producer, consumer):
        see _issue_mma."""
        (stages, tma_atom_a, tAgA, tAsA, tma_atom_b, tBgB, tBsB, tCrA, tCrB,
         mAQ, mAF, mBQ, mBF, expert, a_scale_row, b_col_block, warp_idx) = operands
        G = self.super_group_size
        stages.consumer_wait(consumer)
        tiled_mma = self._issue_mma(tiled_mma, acc_block, tCrA, tCrB, consumer.index)
        self._block_weights(weight, q)
        # unconditional (clamped past the last block): a predicated load would have to
        # merge with the old value, and the compiler does that with a copy that waits for
        # the load
        self._load_scales(q, cutlass.min(k_tile + 2, k_tile_count - 1), mAQ, mBQ, expert,
                     a_scale_row, b_col_block)
        warpgroup.wait_group(0)
        stages.consumer_release(consumer)
        consumer.advance()
        # refill the released stage while this warpgroup weights D_b
        if warp_idx == 0:  # noqa: SIM102 -- DSL: a warp test, then the stage count
            if producer.count < k_tile_count:
                self._load_stage(stages, producer, tma_atom_a, tAgA, tAsA, tma_atom_b, tBgB,
                                 tBsB)
                producer.advance()
        self._weigh(acc_group, acc_block, weight, slice_block, n_slices)
        if cutlass.const_expr(not self.one_super_group):  # noqa: SIM102 -- compile-time
            if (k_tile + 1) % G == 0 or k_tile + 1 == k_tile_count:
                self._flush(acc_f, acc_group, f_group, slice_block, n_slices)
                if k_tile + 1 < k_tile_count:   # the next super group's F
                    self._load_scales(f_group, (k_tile + 1) // G, mAF, mBF, expert, a_scale_row,
                                 b_col_block)
        return tiled_mma, producer, consumer

    def _load_stage(self, stages, producer, tma_atom_a, tAgA, tAsA, tma_atom_b, tBgB, tBsB):
        """Warp 0: wait for the stage to be free, then TMA K-block producer.count into it."""
        stages.producer_acquire(producer)
        cute.copy(tma_atom_a, tAgA[None, producer.count], tAsA[None, producer.index],
                  tma_bar_ptr=stages.producer_get_barrier(producer))
        cute.copy(tma_atom_b, tBgB[None, producer.count], tBsB[None, producer.index],
                  tma_bar_ptr=stages.producer_get_barrier(producer))
        stages.producer_commit(producer)

    def _issue_mma(self, tiled_mma, acc, tCrA, tCrB, stage):
        """acc = A_b B_b^T of the K-block in `stage`: block_k / 32 wgmma k-steps, the first
        one overwriting acc; committed as one group, not waited for. Returns tiled_mma,
        whose ACCUMULATE field it changes: the caller rebinds it, so that the tracer
        carries it through loops and branches."""
        warpgroup.fence()
        tiled_mma.set(warpgroup.Field.ACCUMULATE, False)
        for kk in range(cute.size(tCrA, mode=[2])):
            cute.gemm(tiled_mma, acc, tCrA[None, None, kk, stage], tCrB[None, None, kk, stage],
                      acc)
            tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()
        return tiled_mma

    def _weigh(self, acc_group, acc, weight, slice_block, n_slices):
        """S_g += Q_A Q_B D_b (int32, exact under the SPEC 5 bound)."""
        for j in range(n_slices):
            for r in range(2):
                for c in range(2):
                    e = c + 2 * r + 4 * j
                    acc_group[e] = acc_group[e] + weight[r, slice_block[j]] * acc[e]

    def _flush(self, acc_f, acc_group, f_group, slice_block, n_slices):
        """End of a super group: acc += (F_A * F_B) * float(S_g); S_g = 0."""
        f_a, f_b = f_group
        for j in range(n_slices):
            for r in range(2):
                f_ab = f_a[r] * f_b[slice_block[j]]
                for c in range(2):
                    e = c + 2 * r + 4 * j
                    acc_f[e] = acc_f[e] + f_ab * cutlass.Float32(acc_group[e])
        acc_group.fill(0)
