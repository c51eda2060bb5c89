"""CuTe DSL hybrid grouped GEMM (cutlass_backend) against reference/gemm.py (SPEC 5).

CPU tier (CI, no GPU): every kernel variant (tile x out dtype x bias) compiles for sm_80
and its PTX holds the signed int8 MMA, cp.async and ldmatrix; the package imports and
explains itself without the DSL. GPU tier (``@pytest.mark.gpu``): results against the
oracle on ragged experts, empty experts, several super groups, per-token / 64 / 128-row
activation scales, ragged Nout, and the default workload's two GEMMs.
"""
from __future__ import annotations

import importlib.util
import os
import re
import time

import pytest
import torch

import cutlass_backend
from reference import gemm as ref_gemm

HAS_DSL = importlib.util.find_spec("cutlass") is not None and (
    importlib.util.find_spec("cutlass.cute") is not None)
needs_dsl = pytest.mark.skipif(
    not HAS_DSL, reason=f"nvidia-cutlass-dsl is not installed ({cutlass_backend.INSTALL_HINT})")

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SIGNED_MMA = "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32"


# ----------------------------------------------------------------------------- CPU tier
def test_import_without_dsl_explains_how_to_install(monkeypatch):
    # Simulate a missing DSL: importing cutlass.cute raises ImportError.
    monkeypatch.setitem(__import__("sys").modules, "cutlass.cute", None)
    monkeypatch.setattr(cutlass_backend, "_kernel_module", None)
    ok, reason = cutlass_backend.is_available()
    assert not ok and "nvidia-cutlass-dsl" in reason and cutlass_backend.INSTALL_HINT in reason
    with pytest.raises(RuntimeError, match=r"pip install 'triton-moe\[cutlass\]'"):
        cutlass_backend.grouped_gemm(*([None] * 8), act_block_m=128, block_n=64, block_k=128,
                                     super_group_size=4, out_dtype=torch.bfloat16)


@needs_dsl
def test_is_available_names_the_missing_piece():
    ok, reason = cutlass_backend.is_available()
    if torch.cuda.is_available():
        assert ok and reason == ""
    else:
        assert not ok and "CUDA" in reason


@needs_dsl
def test_default_tile_and_reference_tile_choice(monkeypatch):
    from cutlass_backend import gemm

    monkeypatch.delenv(gemm.TILE_ENV_VAR, raising=False)
    for num_rows, num_experts in ((8192 * 8, 256), (70 * 256, 256), (16, 0)):
        # Hopper: the wgmma kernel; other GPUs (and block_n it cannot tile): SM80 mma.sync
        assert gemm.select_tile(num_rows, num_experts, 64, (9, 0)) == "sm90_64x128"
        assert gemm.select_tile(num_rows, num_experts, 128, (9, 0)) == "sm90_64x128"
        assert gemm.select_tile(num_rows, num_experts, 48, (9, 0)) == "small_racc"
        assert gemm.select_tile(num_rows, num_experts, 64, (8, 0)) == "small_racc"
        assert gemm.select_tile(num_rows, num_experts, 64, (10, 0)) == "small_racc"
    assert gemm.DEFAULT_TILE == "small_racc"
    assert gemm.reference_tile(8192 * 8, 256) == "large"   # 256 rows per expert
    assert gemm.reference_tile(70 * 256, 256) == "small"   # reference switch at <= 70 rows
    assert gemm.reference_tile(16, 0) == "small"
    monkeypatch.setenv(gemm.TILE_ENV_VAR, "large")
    assert gemm.select_tile(16, 4, 64, (9, 0)) == "large"
    monkeypatch.setenv(gemm.TILE_ENV_VAR, "huge")
    with pytest.raises(ValueError, match="TRITON_MOE_CUTLASS_TILE='huge' is not a tile"):
        gemm.select_tile(16, 4, 64, (9, 0))


# Tile names of cutlass_backend.gemm.TILE_CONFIGS (kept here so collection needs no DSL;
# test_tile_names_match_the_kernel_table pins the two together).
TILES = ("large", "small", "small_racc", "small_racc_s4", "large_w64x32", "large_w64x32_racc",
         "large_w64x32_racc_s4", "n128_w32x64", "n128_w32x64_racc", "n128_w32x64_racc_s4",
         "wide_w64x32", "wide_w64x32_racc_s4")
NEW_TILES = TILES[2:]
# Hopper tiles (cutlass_backend.gemm_sm90.SM90_TILE_CONFIGS): TMA + int8 wgmma, sm_90 only.
SM90_TILES = ("sm90_64x128", "sm90_64x128_s4", "sm90_128x128", "sm90_64x64")


def _is_hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


needs_hopper = pytest.mark.skipif(not _is_hopper(), reason="sm_90a kernel: needs an H100/H200")


def tile_param(tile):
    """A tile name as a parameter, skipped off Hopper when it is an sm_90a kernel."""
    return pytest.param(tile, marks=needs_hopper) if tile in SM90_TILES else tile

# Every (tile, out dtype, bias) variant of the default tiles in the scalar-weight form (the
# default scales) at block_k 128; the per-row ("rows": per-token activation scales) and
# per-row/per-column ("general") forms once per default tile (they differ from the scalar
# one only in the weighting; dtype and bias only touch the shared epilogue); block_k 64 and
# 256 once each. Every other tile in its "tile" and "rows" forms (bf16, no bias), and the
# "general" form of the tiles whose BM + BN scale entries exceed the thread count (two
# staging slots). 1-3 s per compile (2-core CPU).
COMPILE_VARIANTS = [(tile, dtype, bias, "tile", 128) for tile in ("large", "small")
                    for dtype in OUT_DTYPES for bias in (False, True)]
COMPILE_VARIANTS += [("large", torch.bfloat16, False, "general", 128),
                     ("small", torch.float32, True, "general", 128),
                     ("large", torch.bfloat16, True, "rows", 128),
                     ("small", torch.float16, False, "rows", 128),
                     ("large", torch.bfloat16, False, "tile", 64),
                     ("small", torch.float16, True, "general", 256)]
COMPILE_VARIANTS += [(tile, torch.bfloat16, False, mode, 128) for tile in NEW_TILES
                     for mode in ("tile", "rows")]
COMPILE_VARIANTS += [(tile, torch.float32, True, "general", 128)
                     for tile in ("n128_w32x64", "large_w64x32_racc")]
# The default tile (DEFAULT_TILE) with the other output dtypes and bias.
COMPILE_VARIANTS += [("small_racc", torch.float32, True, "rows", 128),
                     ("small_racc", torch.float16, False, "general", 128)]


@needs_dsl
def test_tile_names_match_the_kernel_table():
    from cutlass_backend import gemm

    assert set(TILES) == set(gemm.TILE_CONFIGS)
    assert set(SM90_TILES) == set(gemm.gemm_sm90.SM90_TILE_CONFIGS)
    assert gemm.tile_names() == sorted(TILES) + sorted(SM90_TILES)
    for name, cfg in gemm.TILE_CONFIGS.items():
        kernel = gemm.HybridGroupedGemm.from_config(cfg, 128, None, False, "general")
        assert kernel.num_threads == 32 * cfg.num_warps, name


@needs_dsl
def test_scale_mode_follows_tile_and_scale_blocks():
    from cutlass_backend import gemm

    assert gemm.scale_mode_for("large", 128, 64) == "tile"
    assert gemm.scale_mode_for("large", 256, 128) == "tile"
    assert gemm.scale_mode_for("large", 64, 64) == "rows"      # 64-row blocks, 128-row tile
    assert gemm.scale_mode_for("small", 1, 64) == "rows"       # per-token scales
    assert gemm.scale_mode_for("small", 1, 32) == "general"
    assert gemm.scale_mode_for("n128_w32x64", 64, 64) == "general"   # BN 128 > block_n
    assert gemm.scale_mode_for("n128_w32x64", 1, 128) == "rows"


@needs_dsl
@pytest.mark.parametrize(
    "tile, out_dtype, has_bias, scale_mode, block_k", COMPILE_VARIANTS,
    ids=[f"{t}-{str(d).split('.')[-1]}-{'bias' if b else 'nobias'}-{m}-k{k}"
         for t, d, b, m, k in COMPILE_VARIANTS])
def test_variant_compiles_for_sm80_with_signed_mma(tile, out_dtype, has_bias, scale_mode,
                                                   block_k, tmp_path, monkeypatch):
    """Compile on placeholder pointers for sm_80 (no GPU) and read the PTX it dumps."""
    from cutlass_backend import gemm

    monkeypatch.setenv("CUTE_DSL_ARCH", "sm_80")
    monkeypatch.setenv("CUTE_DSL_KEEP_PTX", "1")
    monkeypatch.setenv("CUTE_DSL_DUMP_DIR", str(tmp_path))
    start = time.perf_counter()
    # The DSL reads its env once per process, so pass the same settings as options too.
    gemm.compile_variant(tile, block_k, out_dtype, has_bias, scale_mode,
                         options=f"--gpu-arch sm_80 --keep-ptx --dump-dir {tmp_path}")
    seconds = time.perf_counter() - start
    ptx_files = [p for p in os.listdir(tmp_path) if p.endswith(".sm_80.ptx")]
    assert len(ptx_files) == 1, ptx_files
    ptx = (tmp_path / ptx_files[0]).read_text()
    mma_lines = [line.strip() for line in ptx.splitlines() if "mma.sync" in line]
    # signed operands (signless i8 would silently give .u8.u8, CUTE_DSL.md), and the
    # whole warp sub-tile x one K-block: (warp_m / 16) x (warp_n / 8) x (block_k / 32)
    # MMAs per loop trip (8 x block_k / 32 for a 32x32 warp tile)
    cfg = gemm.TILE_CONFIGS[tile]
    assert mma_lines and all(SIGNED_MMA in line for line in mma_lines), mma_lines[:3]
    assert len(mma_lines) == (cfg.warp_m // 16) * (cfg.warp_n // 8) * block_k // 32
    assert "cp.async.cg.shared.global" in ptx and "cp.async.wait_group" in ptx
    # one ldmatrix.x4 per 16 rows of A and per 16 columns of B per k-step, in the loop,
    # plus the prologue's first k-step
    ldmatrix = [line for line in ptx.splitlines() if "ldmatrix" in line]
    assert ldmatrix and all("ldmatrix.sync.aligned.m8n8.x4.shared.b16" in line
                            for line in ldmatrix)
    assert len(ldmatrix) == (cfg.warp_m + cfg.warp_n) // 16 * (block_k // 32 + 1)
    assert ".local" not in ptx          # no register spills to local memory in the PTX
    assert f".minnctapersm {cfg.min_blocks_per_sm}" in ptx   # register budget per CTA
    print(f"compile {tile}/{out_dtype}/bias={has_bias}/{scale_mode}/k{block_k}: "
          f"{seconds:.1f} s")


# Hopper variants: every tile (bf16, block_n 64, several super groups and one, 16-byte
# staged stores); per dtype / bias / block_n / block_k / pair stores once.
# (tile, out dtype, bias, block_n, one super group, staged store, block_k)
SM90_COMPILE_VARIANTS = [(tile, torch.bfloat16, False, 64, one, True, 128)
                         for tile in SM90_TILES for one in (False, True)]
SM90_COMPILE_VARIANTS += [("sm90_64x128", torch.float32, True, 128, False, True, 128),
                          ("sm90_64x128", torch.float16, True, 32, True, False, 128),
                          ("sm90_64x128", torch.bfloat16, False, 64, False, False, 128),
                          ("sm90_64x128", torch.bfloat16, False, 256, False, True, 64),
                          ("sm90_128x128", torch.bfloat16, True, 64, False, True, 256)]
SIGNED_WGMMA = "wgmma.mma_async.sync.aligned.m64n{n}k32.satfinite.s32.s8.s8"


@needs_dsl
@pytest.mark.parametrize(
    "tile, out_dtype, has_bias, block_n, one_group, staged, block_k", SM90_COMPILE_VARIANTS,
    ids=[f"{t}-{str(d).split('.')[-1]}-{'bias' if b else 'nobias'}-n{n}-"
         f"{'onegroup' if one else 'groups'}-{'staged' if st else 'pairs'}-k{k}"
         for t, d, b, n, one, st, k in SM90_COMPILE_VARIANTS])
def test_sm90_variant_compiles_with_signed_wgmma_and_tma(tile, out_dtype, has_bias, block_n,
                                                         one_group, staged, block_k, tmp_path,
                                                         monkeypatch):
    """Compile the Hopper kernel for sm_90a on placeholder pointers (no GPU) and read its
    PTX: signed int8 wgmma, block_k / 32 of them per K-block (one super group: its 4
    K-blocks unrolled; else the main loop takes K-blocks in pairs), TMA loads into an mbarrier
    pipeline, the epilogue's store width, no local memory, the register budget of its CTAs
    per SM."""
    from cutlass_backend import gemm

    monkeypatch.setenv("CUTE_DSL_ARCH", "sm_90a")
    # one super group: of 4 K-blocks (compiled in), G = 4
    gemm.compile_variant(tile, block_k, out_dtype, has_bias,
                         (block_n, 4, 4 if one_group else 0, staged),
                         options=f"--gpu-arch sm_90a --keep-ptx --dump-dir {tmp_path}")
    ptx_files = [p for p in os.listdir(tmp_path) if p.endswith(".sm_90a.ptx")]
    assert len(ptx_files) == 1, ptx_files
    ptx = (tmp_path / ptx_files[0]).read_text()
    cfg = gemm.gemm_sm90.SM90_TILE_CONFIGS[tile]
    wgmma = [line.strip() for line in ptx.splitlines() if "wgmma.mma_async" in line]
    assert wgmma and all(SIGNED_WGMMA.format(n=cfg.block_n) in line for line in wgmma), \
        wgmma[:2]
    # unrolled: 4 K-blocks; else the loop takes K-blocks in pairs
    assert len(wgmma) == (4 if one_group else 2) * (block_k // 32)
    assert re.search(r"wgmma\.wait_group\.sync\.aligned\s+0;", ptx)
    # one 2-D TMA load for A, one 3-D (expert = batch mode) for B, completing on mbarriers
    tma = [line for line in ptx.splitlines() if "cp.async.bulk.tensor" in line]
    assert any(".2d." in line for line in tma) and any(".3d." in line for line in tma)
    assert all("mbarrier::complete_tx::bytes" in line for line in tma)
    assert ".local" not in ptx
    kernel = gemm.gemm_sm90.HybridGroupedGemmSm90(cfg, block_k, None, has_bias, block_n, 4,
                                                   4 if one_group else 0, staged)
    # staged: 16-byte global stores only; else the fragment's column pairs
    stores = [line for line in ptx.splitlines() if "st.global" in line]
    assert stores and all((".v4.b32" in line or ".v4.u32" in line or ".b128" in line)
                          == staged for line in stores), stores[:4]
    assert re.search(rf"\.minnctapersm {kernel.min_blocks_per_sm}\b", ptx)



@needs_dsl
@pytest.mark.parametrize("k_blocks", [1, 3])
def test_sm90_one_super_group_unrolls_its_k_blocks(k_blocks, tmp_path, monkeypatch):
    """All of K one super group of ``k_blocks`` K-blocks (compiled in): the PTX holds
    exactly block_k / 32 wgmma per K-block, unrolled, and no loop over K."""
    from cutlass_backend import gemm

    monkeypatch.setenv("CUTE_DSL_ARCH", "sm_90a")
    gemm.compile_variant("sm90_64x128", 128, torch.bfloat16, False, (64, 4, k_blocks, True),
                         options=f"--gpu-arch sm_90a --keep-ptx --dump-dir {tmp_path}")
    ptx_files = [p for p in os.listdir(tmp_path) if p.endswith(".sm_90a.ptx")]
    ptx = (tmp_path / ptx_files[0]).read_text()
    wgmma = [line for line in ptx.splitlines() if "wgmma.mma_async" in line]
    assert len(wgmma) == k_blocks * 128 // 32
    # a bad count is refused when the kernel is built
    with pytest.raises(AssertionError):
        gemm.gemm_sm90.HybridGroupedGemmSm90(gemm.gemm_sm90.SM90_TILE_CONFIGS["sm90_64x128"],
                                              128, None, False, 64, 4, 5, True)


# ----------------------------------------------------------------------------- GPU tier
def make_problem(*, num_rows, counts, k_in, n_out, act_block_m, block_n=64, block_k=128,
                 super_group_size=4, q_max=16, bias=False, seed=0, exact=False,
                 device="cuda"):
    """Random quantized GEMM inputs in design.md layouts. ``counts`` = rows per expert
    (sum <= num_rows; the rest is padding that must stay unwritten). ``exact`` picks
    F = 1 and Q in {0, 1, 2} so every fp32 step of the oracle is exact (|sums| < 2**24)."""
    gen = torch.Generator().manual_seed(seed)
    num_experts = len(counts)
    num_k_blocks = k_in // block_k
    num_groups = -(-num_k_blocks // super_group_size)
    counts_t = torch.tensor(counts, dtype=torch.int64)
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int64)
    expert_offsets[1:] = counts_t.cumsum(0)
    scale_row_offsets = torch.zeros(num_experts + 1, dtype=torch.int64)
    scale_row_offsets[1:] = ((counts_t + act_block_m - 1) // act_block_m).cumsum(0)
    num_scale_rows = num_rows if act_block_m == 1 else -(-num_rows // act_block_m) + num_experts
    q_hi = 3 if exact else q_max + 1
    # full int8 range, -128 included: a wrong (unsigned) MMA cannot pass
    a_q = torch.randint(-128, 128, (num_rows, k_in), generator=gen, dtype=torch.int8)
    b_q = torch.randint(-128, 128, (num_experts, n_out, k_in), generator=gen, dtype=torch.int8)
    a_qscale = torch.randint(0, q_hi, (num_scale_rows, num_k_blocks), generator=gen,
                             dtype=torch.int32)
    b_qscale = torch.randint(0, q_hi, (num_experts, n_out // block_n, num_k_blocks),
                             generator=gen, dtype=torch.int32)
    if exact:
        a_fscale = torch.ones(num_scale_rows, num_groups)
        b_fscale = torch.ones(num_experts, n_out // block_n, num_groups)
    else:
        a_fscale = torch.rand(num_scale_rows, num_groups, generator=gen) * 1e-3 + 1e-5
        b_fscale = torch.rand(num_experts, n_out // block_n, num_groups, generator=gen) * 1e-3
    problem = {"a_q": a_q, "a_qscale": a_qscale, "a_fscale": a_fscale, "b_q": b_q,
               "b_qscale": b_qscale,
                   "b_fscale": b_fscale, "expert_offsets": expert_offsets.to(torch.int32),
                   "scale_row_offsets": scale_row_offsets.to(torch.int32)}
    problem = {name: t.to(device) for name, t in problem.items()}
    if bias:
        problem["bias"] = (torch.randn(num_experts, n_out, generator=gen) * 0.1).to(device)
    params = {"act_block_m": act_block_m, "block_n": block_n, "block_k": block_k,
                  "super_group_size": super_group_size}
    return problem, params


def tolerance(problem, params, ref, out_dtype):
    """Per-element bound on |kernel - oracle|. The int32 sums are exact in both; the fp32
    combination may differ by FMA contraction (<= 1 ulp per super-group term, bounded by
    2**-23 * sum_g |F_A F_B S_g|, doubled for the sum), and a bf16/fp16 result may then
    round to the neighbouring value (one ulp of the output type: 2**-7 / 2**-10 relative)."""
    partials = ref_gemm.super_group_partials(
        problem["a_q"], problem["a_qscale"], problem["b_q"], problem["b_qscale"],
        problem["expert_offsets"], problem["scale_row_offsets"], **params).double()
    offsets = problem["expert_offsets"].tolist()
    scale_offsets = problem["scale_row_offsets"].tolist()
    num_rows, n_out = ref.shape
    f_a = torch.zeros(num_rows, partials.shape[2], dtype=torch.float64, device=ref.device)
    f_b = torch.zeros(num_rows, n_out, partials.shape[2], dtype=torch.float64, device=ref.device)
    cols = torch.arange(n_out, device=ref.device) // params["block_n"]
    for expert in range(len(offsets) - 1):
        start, end = offsets[expert], offsets[expert + 1]
        if end > start:
            rows = scale_offsets[expert] + torch.arange(end - start, device=ref.device) \
                // params["act_block_m"]
            f_a[start:end] = problem["a_fscale"][rows].double()
            f_b[start:end] = problem["b_fscale"][expert][cols].double()
    magnitude = (partials.abs() * f_a[:, None, :] * f_b).sum(dim=2)
    rel = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 0.0}[out_dtype]
    return 2.0**-22 * magnitude + rel * ref.double().abs() + 1e-30


def check(out, ref, bound, valid_rows):
    """Every valid row within ``bound``; a short diagnosis of the misses otherwise."""
    err = (out[:valid_rows].double() - ref[:valid_rows].double()).abs()
    bad = err > bound[:valid_rows]
    if bad.any():
        rows, cols = bad.nonzero(as_tuple=True)
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} elements off; rows {rows.unique()[:16].tolist()}"
            f", cols {cols.unique()[:16].tolist()}; first: out={out[rows[0], cols[0]].item()}"
            f" ref={ref[rows[0], cols[0]].item()}; max err {err.max().item():.3e}")


def run_case(problem, params, *, out_dtype, tile=None):
    """Kernel and oracle on one problem; rows past expert_offsets[E] must stay untouched."""
    num_rows, n_out = problem["a_q"].shape[0], problem["b_q"].shape[1]
    sentinel = torch.full((num_rows, n_out), float("nan"), device="cuda").to(out_dtype)
    out = cutlass_backend.grouped_gemm(**problem, **params, out_dtype=out_dtype,
                                       out=sentinel.clone(), tile=tile)
    ref = ref_gemm.grouped_gemm(**problem, **params, out_dtype=out_dtype)
    valid_rows = int(problem["expert_offsets"][-1])
    assert torch.isnan(out[valid_rows:]).all(), "rows >= expert_offsets[E] were written"
    return out, ref, valid_rows


def ragged_counts(num_experts, num_rows, seed, empty=(1,)):
    """Uneven rows per expert summing to < num_rows, with some experts empty."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(num_experts, generator=gen) ** 2
    weights[list(empty)] = 0
    counts = (weights / weights.sum() * (num_rows - 5)).floor().to(torch.int64)
    return counts.tolist()


@pytest.mark.gpu
@needs_dsl
@pytest.mark.parametrize("block_n", [64, 128])
@pytest.mark.parametrize("act_block_m", [1, 64, 128])
@pytest.mark.parametrize("tile", [tile_param(t) for t in TILES + SM90_TILES])
def test_integer_part_is_exact(tile, act_block_m, block_n):
    """F = 1 and small Q: every fp32 step is exact, so the kernel must match bit for bit.
    Full-range signed int8, ragged experts, an empty expert, 2 super groups of 2. Over
    every tile variant, act_block_m and block_n reach all three scale modes."""
    counts = ragged_counts(6, 600, seed=act_block_m)
    problem, params = make_problem(num_rows=600, counts=counts, k_in=512, n_out=256,
                                   act_block_m=act_block_m, block_n=block_n,
                                   super_group_size=2, exact=True)
    out, ref, valid_rows = run_case(problem, params, out_dtype=torch.float32, tile=tile)
    check(out, ref, torch.zeros_like(ref, dtype=torch.float64), valid_rows)   # bit-exact


GPU_CASES = [
    # tile, out dtype, bias, act_block_m, block_n, Kin, Nout, G  (KB = Kin / 128)
    ("large", torch.bfloat16, True, 128, 64, 1024, 256, 4),   # SG = 2
    ("large", torch.float32, False, 1, 64, 640, 192, 2),      # per-token scales, SG = 3 ragged
    ("large", torch.float16, False, 64, 32, 768, 96, 4),      # ragged Nout (96 = 64 + 32)
    ("small", torch.bfloat16, False, 64, 64, 512, 128, 1),    # SG = 4 of one block each
    ("small", torch.float32, True, 1, 64, 256, 64, 4),        # SG = 1
    ("small", torch.float16, True, 128, 128, 384, 256, 4),    # block_n > tile N
]


@pytest.mark.gpu
@needs_dsl
@pytest.mark.parametrize("tile, out_dtype, bias, act_block_m, block_n, k_in, n_out, group",
                         GPU_CASES)
def test_matches_reference(tile, out_dtype, bias, act_block_m, block_n, k_in, n_out, group):
    counts = ragged_counts(8, 1000, seed=k_in, empty=(0, 5))
    problem, params = make_problem(num_rows=1000, counts=counts, k_in=k_in, n_out=n_out,
                                   act_block_m=act_block_m, block_n=block_n,
                                   super_group_size=group, bias=bias, seed=k_in + n_out)
    out, ref, valid_rows = run_case(problem, params, out_dtype=out_dtype, tile=tile)
    check(out, ref, tolerance(problem, params, ref, out_dtype), valid_rows)


VARIANT_CASES = [
    # out dtype, bias, act_block_m, block_n, Kin, Nout, G
    (torch.bfloat16, True, 1, 128, 640, 384, 2),     # per-token, "rows" everywhere, SG = 3
    (torch.float16, False, 64, 32, 768, 96, 4),      # "general", ragged Nout (< a 128 tile)
    (torch.float32, False, 128, 64, 1024, 320, 4),   # "tile" / "rows" / "general" by tile
]


@pytest.mark.gpu
@needs_dsl
@pytest.mark.parametrize("out_dtype, bias, act_block_m, block_n, k_in, n_out, group",
                         VARIANT_CASES, ids=["per_token", "general", "default_scales"])
@pytest.mark.parametrize("tile", [tile_param(t) for t in NEW_TILES + SM90_TILES])
def test_variant_matches_reference(tile, out_dtype, bias, act_block_m, block_n, k_in, n_out,
                                   group):
    counts = ragged_counts(8, 1000, seed=k_in + 1, empty=(0, 5))
    problem, params = make_problem(num_rows=1000, counts=counts, k_in=k_in, n_out=n_out,
                                   act_block_m=act_block_m, block_n=block_n,
                                   super_group_size=group, bias=bias, seed=k_in + n_out + 1)
    out, ref, valid_rows = run_case(problem, params, out_dtype=out_dtype, tile=tile)
    check(out, ref, tolerance(problem, params, ref, out_dtype), valid_rows)


@pytest.mark.gpu
@needs_dsl
@pytest.mark.parametrize("tile, block_k, act_block_m, group", [
    ("large", 64, 128, 4), ("small", 64, 1, 4), ("large", 256, 1, 2), ("small", 256, 64, 2),
    pytest.param("sm90_64x128", 64, 1, 4, marks=needs_hopper),
    pytest.param("sm90_128x128", 256, 64, 2, marks=needs_hopper)])
def test_other_block_k(tile, block_k, act_block_m, group):
    """block_k 64 / 256 (K tile = quant block); G keeps G * 16**2 * block_k * 127**2 < 2**31."""
    counts = ragged_counts(5, 700, seed=block_k, empty=(2,))
    problem, params = make_problem(num_rows=700, counts=counts, k_in=4 * 256, n_out=192,
                                   act_block_m=act_block_m, block_k=block_k,
                                   super_group_size=group, bias=True, seed=block_k)
    out, ref, valid_rows = run_case(problem, params, out_dtype=torch.bfloat16, tile=tile)
    check(out, ref, tolerance(problem, params, ref, torch.bfloat16), valid_rows)


@pytest.mark.gpu
@needs_dsl
def test_all_experts_empty_writes_nothing():
    problem, params = make_problem(num_rows=256, counts=[0] * 4, k_in=256, n_out=64,
                                   act_block_m=128)
    out, _, _ = run_case(problem, params, out_dtype=torch.bfloat16)
    assert torch.isnan(out).all()


@pytest.mark.gpu
@needs_dsl
def test_cuda_graph_capture_replays_same_result():
    counts = ragged_counts(4, 512, seed=3)
    problem, params = make_problem(num_rows=512, counts=counts, k_in=512, n_out=128,
                                   act_block_m=64)
    out = torch.empty(512, 128, dtype=torch.bfloat16, device="cuda")
    eager = cutlass_backend.grouped_gemm(**problem, **params, out_dtype=torch.bfloat16).clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):   # warm-up (compile) outside the capture
        cutlass_backend.grouped_gemm(**problem, **params, out_dtype=torch.bfloat16, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    out.zero_()
    with torch.cuda.graph(graph):
        cutlass_backend.grouped_gemm(**problem, **params, out_dtype=torch.bfloat16, out=out)
    graph.replay()
    torch.cuda.synchronize()
    valid_rows = int(problem["expert_offsets"][-1])
    assert torch.equal(out[:valid_rows], eager[:valid_rows])


def default_workload_counts(num_rows, num_experts, seed):
    """Rows per expert of a top-k routing: multinomial around P / E (256 here)."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, num_experts, (num_rows,), generator=gen)
    return torch.bincount(picks, minlength=num_experts).tolist()


@pytest.mark.gpu
@needs_dsl
@pytest.mark.parametrize("act_block_m", [128, 1], ids=["abm128", "per_token"])
@pytest.mark.parametrize("k_in, n_out", [(2048, 1024), (512, 2048)], ids=["gemm1", "gemm2"])
@pytest.mark.parametrize("tile", [None, "small_racc"], ids=["default_tile", "sm80"])
def test_default_workload(k_in, n_out, act_block_m, tile):
    """SPEC 8: M=8192, top-8 -> P=65536 rows over E=256 experts, K=2048, N=512; the
    default tile (the wgmma kernel on Hopper) and the SM80 one."""
    num_rows, num_experts = 65536, 256
    counts = default_workload_counts(num_rows, num_experts, seed=k_in)
    problem, params = make_problem(num_rows=num_rows, counts=counts, k_in=k_in, n_out=n_out,
                                   act_block_m=act_block_m, super_group_size=4, seed=7)
    out, ref, valid_rows = run_case(problem, params, out_dtype=torch.bfloat16, tile=tile)
    check(out, ref, tolerance(problem, params, ref, torch.bfloat16), valid_rows)


@pytest.mark.gpu
@needs_dsl
@needs_hopper
@pytest.mark.parametrize("one_group", [False, True], ids=["groups", "one_group"])
def test_sm90_output_not_16_byte_aligned_stores_pairs(one_group):
    """`out` 4 bytes past a 16-byte boundary: the Hopper kernel falls back to its column-pair
    stores (the staged epilogue's 16-byte stores would be misaligned) and stays correct."""
    counts = ragged_counts(5, 700, seed=11)
    k_in = 512 if one_group else 1024
    problem, params = make_problem(num_rows=700, counts=counts, k_in=k_in, n_out=256,
                                   act_block_m=1, super_group_size=4, bias=True, seed=5)
    buffer = torch.full((700 * 256 + 2,), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = buffer[2:].view(700, 256)
    assert out.data_ptr() % 16 == 4
    cutlass_backend.grouped_gemm(**problem, **params, out_dtype=torch.bfloat16, out=out,
                                 tile="sm90_64x128")
    ref = ref_gemm.grouped_gemm(**problem, **params, out_dtype=torch.bfloat16)
    valid_rows = int(problem["expert_offsets"][-1])
    assert torch.isnan(out[valid_rows:]).all()
    check(out, ref, tolerance(problem, params, ref, torch.bfloat16), valid_rows)


@pytest.mark.gpu
@needs_dsl
@needs_hopper
@pytest.mark.parametrize("k_blocks", [1, 2, 3, 4])
def test_sm90_one_super_group_unrolled_k(k_blocks):
    """All of K one super group: the Hopper kernel compiles the K-block count in and
    unrolls its K loop; fewer K-blocks than TMA stages (1, 2), as many (3) and one more
    (4, a stage refilled). Bit-exact integer part (F = 1, small Q), per-token rows."""
    counts = ragged_counts(5, 700, seed=k_blocks, empty=(3,))
    problem, params = make_problem(num_rows=700, counts=counts, k_in=128 * k_blocks,
                                   n_out=256, act_block_m=1, super_group_size=4,
                                   exact=True, seed=k_blocks)
    out, ref, valid_rows = run_case(problem, params, out_dtype=torch.float32,
                                    tile="sm90_64x128")
    check(out, ref, torch.zeros_like(ref, dtype=torch.float64), valid_rows)   # bit-exact


@pytest.mark.gpu
@needs_dsl
@pytest.mark.parametrize("tile", [tile_param(t) for t in ("small_racc", "sm90_64x128")])
def test_more_experts_than_the_unrolled_search(tile):
    """E = 300 > 256: common.find_expert counts the first 256 keys in straight-line code
    and the rest in a loop; experts past 256 (some empty) must get their rows."""
    num_experts = 300
    gen = torch.Generator().manual_seed(300)
    counts = torch.randint(0, 9, (num_experts,), generator=gen)
    counts[[0, 255, 256, 299]] = torch.tensor([0, 3, 0, 70])   # around the boundary
    problem, params = make_problem(num_rows=int(counts.sum()) + 3, counts=counts.tolist(),
                                   k_in=256, n_out=128, act_block_m=1, exact=True, seed=9)
    out, ref, valid_rows = run_case(problem, params, out_dtype=torch.float32, tile=tile)
    check(out, ref, torch.zeros_like(ref, dtype=torch.float64), valid_rows)   # bit-exact
