"""Hybrid grouped GEMM (SPEC 5): ``triton_moe.gemm`` against the ``reference.gemm`` oracle,
the oracle against a float64 dequantized matmul, its int32-wrap detector, and sm_90 compiles.

Tolerances. fp32 output: under the interpreter the kernel performs the same fp32 operations
in the same order as the reference (design.md), so it must match exactly. Compiled, the
compiler may contract ``acc + (F_A*F_B) * S_g`` into one FMA, which skips one rounding per
super group, each worth at most an ulp of the running magnitude:
|diff| <= (SG + 1) * 2**-22 * (sum_g |F_A F_B S_g| + |bias|). bf16/fp16 output: the fp32 values
agree to that bound, so the rounded outputs are within one ulp of the dtype (the interpreter
also truncates fp32 -> bf16 instead of rounding to nearest).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from reference import gemm as ref_gemm
from triton_moe import gemm as triton_gemm
from triton_moe.config import resolve_act_block_m

SENTINEL = -12288.0  # exact in bf16, fp16 and fp32
TILE_VARIANTS = []  # the distinct configs of the table, in table order
for _, _, _config in triton_gemm.GEMM_CONFIGS:
    if _config not in TILE_VARIANTS:
        TILE_VARIANTS.append(_config)
TILE_IDS = [f"tile{c['BLOCK_M']}x{c['BLOCK_N']}s{c['num_stages']}" for c in TILE_VARIANTS]


@dataclasses.dataclass
class Problem:
    tensors: tuple       # positional args of grouped_gemm, in order
    options: dict        # act_block_m, block_n, block_k, super_group_size
    bias: torch.Tensor | None
    num_valid_rows: int  # R = expert_offsets[E]


def make_problem(counts, k_in, n_out, *, act_block_m, block_n, block_k, super_group_size,
                 extra_rows=3, q_max=16, q_min=0, with_bias=False, seed=0, device="cpu"):
    """Random inputs in design.md's layouts: full-range int8, Q in [q_min, q_max], F > 0."""
    gen = torch.Generator(device=device).manual_seed(seed)
    num_experts = len(counts)
    valid_rows = sum(counts)
    num_rows = valid_rows + extra_rows
    num_k_blocks = k_in // block_k
    num_groups = -(-num_k_blocks // super_group_size)
    scale_rows = num_rows if act_block_m == 1 else -(-num_rows // act_block_m) + num_experts
    counts_t = torch.tensor(counts, dtype=torch.int64)
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int32)
    expert_offsets[1:] = counts_t.cumsum(0)
    scale_row_offsets = torch.zeros(num_experts + 1, dtype=torch.int32)
    scale_row_offsets[1:] = ((counts_t + act_block_m - 1) // act_block_m).cumsum(0)

    def ints(low, high, shape, dtype):
        return torch.randint(low, high + 1, shape, generator=gen, device=device, dtype=dtype)

    def positive(shape):  # F ~ s / q_max for absmax ~ 1: [1e-4, 1e-3)
        return (torch.rand(shape, generator=gen, device=device) * 9 + 1) * 1e-4

    a_q = ints(-127, 127, (num_rows, k_in), torch.int8)
    b_q = ints(-127, 127, (num_experts, n_out, k_in), torch.int8)
    a_qscale = ints(q_min, q_max, (scale_rows, num_k_blocks), torch.int32)
    b_qscale = ints(q_min, q_max, (num_experts, n_out // block_n, num_k_blocks), torch.int32)
    a_fscale = positive((scale_rows, num_groups))
    b_fscale = positive((num_experts, n_out // block_n, num_groups))
    bias = torch.randn(num_experts, n_out, generator=gen, device=device) if with_bias else None
    tensors = (a_q, a_qscale, a_fscale, b_q, b_qscale, b_fscale,
               expert_offsets.to(device), scale_row_offsets.to(device))
    options = dict(act_block_m=act_block_m, block_n=block_n, block_k=block_k,
                   super_group_size=super_group_size)
    return Problem(tensors, options, bias, valid_rows)


def run_both(problem, out_dtype, config=None):
    """(kernel output written into a sentinel-filled buffer, reference output)."""
    a_q, b_q = problem.tensors[0], problem.tensors[3]
    out = torch.full((a_q.shape[0], b_q.shape[1]), SENTINEL, dtype=out_dtype, device=a_q.device)
    got = triton_gemm.grouped_gemm(*problem.tensors, **problem.options, out_dtype=out_dtype,
                                   bias=problem.bias, out=out, config=config)
    assert got is out
    expected = ref_gemm.grouped_gemm(*problem.tensors, **problem.options, out_dtype=out_dtype,
                                     bias=problem.bias)
    return got, expected


def term_magnitude(problem):
    """sum_g |F_A F_B S_g| + |bias| per valid output element, float64 [R, Nout]: the scale
    of every fp32 rounding in the combination, for the FMA-contraction bound."""
    a_q, a_qscale, a_fscale, b_q, b_qscale, b_fscale, offsets, scale_offsets = problem.tensors
    opts = problem.options
    partials = ref_gemm.super_group_partials(a_q, a_qscale, b_q, b_qscale, offsets,
                                             scale_offsets, **opts).double().abs()
    magnitude = torch.zeros(problem.num_valid_rows, b_q.shape[1], dtype=torch.float64,
                            device=a_q.device)
    offsets, scale_offsets = offsets.tolist(), scale_offsets.tolist()
    cols = torch.arange(b_q.shape[1], device=a_q.device)
    for expert in range(len(offsets) - 1):
        start, end = offsets[expert], offsets[expert + 1]
        local_rows = torch.arange(end - start, device=a_q.device)
        rows = scale_offsets[expert] + local_rows // opts["act_block_m"]
        f_a = a_fscale[rows].double()
        f_b = b_fscale[expert][cols // opts["block_n"]].double()
        magnitude[start:end] = (f_a[:, None, :] * f_b[None, :, :] * partials[start:end]).sum(-1)
        if problem.bias is not None:
            magnitude[start:end] += problem.bias[expert].double().abs()
    return magnitude


def assert_matches(got, expected, problem):
    """Valid rows match the reference within the module's stated tolerance; rows >= R keep
    the sentinel (never written)."""
    valid = problem.num_valid_rows
    assert torch.all(got[valid:].float() == SENTINEL), "rows >= R were written"
    got, expected = got[:valid], expected[:valid]
    if got.dtype == torch.float32:
        if got.device.type == "cpu":  # interpreter: same fp32 ops in the same order
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        else:  # FMA contraction skips one rounding per super group (and shifts the bias add)
            num_groups = problem.tensors[2].shape[1]
            bound = (num_groups + 1) * 2.0**-22 * term_magnitude(problem)
            excess = ((got.double() - expected.double()).abs() - bound).max().item()
            assert excess <= 0, f"fp32 error above bound by {excess}"
    else:
        mantissa_bits = {torch.bfloat16: 7, torch.float16: 10}[got.dtype]
        _, exponent = torch.frexp(expected.float())
        ulp = torch.ldexp(torch.ones_like(expected, dtype=torch.float32),
                          exponent - 1 - mantissa_bits)
        allowed = ulp
        if got.device.type != "cpu":
            # The fp32 values may differ by the FMA bound above before rounding; where the
            # super groups cancel, that is many ulps of a small result.
            num_groups = problem.tensors[2].shape[1]
            allowed = ulp + (num_groups + 1) * 2.0**-22 * term_magnitude(problem)
        diff = (got.float() - expected.float()).abs()
        assert torch.all(diff <= allowed), f"max diff {(diff / ulp).max().item()} ulp"


# Ragged counts with an empty expert; P = R + 3 is no multiple of any tile.
RAGGED = [37, 0, 70, 9]


@pytest.mark.parametrize("config", TILE_VARIANTS, ids=TILE_IDS)
@pytest.mark.parametrize("act_block_m", [1, 64, 128])
def test_tile_variants_and_act_blocks(device, config, act_block_m):
    problem = make_problem(RAGGED, 256, 128, act_block_m=act_block_m, block_n=64, block_k=128,
                           super_group_size=1, seed=act_block_m, device=device)
    assert_matches(*run_both(problem, torch.float32, config), problem)


@pytest.mark.parametrize("super_group_size", [1, 2, 4, 3])  # 3: SG = 3 groups of 3, 3, 2
def test_super_groups(device, super_group_size):
    problem = make_problem(RAGGED, 256, 128, act_block_m=64, block_n=64, block_k=32,
                           super_group_size=super_group_size, seed=10 + super_group_size,
                           device=device)
    assert_matches(*run_both(problem, torch.float32), problem)


def test_scale_block_smaller_than_tile(device):
    """Nout 192 over BLOCK_N 128 (ragged N tile) with 64-column weight scale blocks and
    32-row activation scale blocks inside a 64-row tile: per-row and per-column Q/F from a
    few scale blocks per tile (the ragged tile's second block is clamped to the last one);
    tiles visited in groups of 2 M-tiles."""
    config = dict(TILE_VARIANTS[1], BLOCK_N=128, GROUP_M=2)
    problem = make_problem(RAGGED, 256, 192, act_block_m=32, block_n=64, block_k=64,
                           super_group_size=2, q_min=1, seed=20, device=device)
    assert_matches(*run_both(problem, torch.float32, config), problem)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_out_dtype_with_bias(device, out_dtype):
    problem = make_problem([12, 30, 0, 5], 256, 128, act_block_m=64, block_n=64, block_k=128,
                           super_group_size=2, with_bias=True, seed=30, device=device)
    assert_matches(*run_both(problem, out_dtype), problem)


@pytest.mark.parametrize("counts", [[45], [0, 0, 45, 0]], ids=["one_expert", "one_of_four"])
def test_all_rows_in_one_expert(device, counts):
    problem = make_problem(counts, 256, 64, act_block_m=128, block_n=64, block_k=128,
                           super_group_size=2, q_min=1, seed=40, device=device)
    assert_matches(*run_both(problem, torch.float32), problem)


def test_no_rows(device):
    problem = make_problem([0, 0], 256, 64, act_block_m=64, block_n=64, block_k=128,
                           super_group_size=2, extra_rows=0, device=device)
    out = triton_gemm.grouped_gemm(*problem.tensors, **problem.options, out_dtype=torch.bfloat16)
    assert out.shape == (0, 64) and out.dtype == torch.bfloat16


def test_config_table():
    """Tile choice by P / E and K-blocks: 16 rows for decode-like batches, else 64 x 128
    with 3 pipeline stages, 4 at <= 70 rows per expert when K is long."""
    select = triton_gemm.select_config
    assert select(8 * 16, 8, 16)["BLOCK_M"] == 16
    assert select(8 * 16, 8, 16)["SWAP_AB"]
    assert (select(8 * 70, 8, 16)["BLOCK_M"], select(8 * 70, 8, 16)["num_stages"]) == (64, 4)
    assert select(8 * 70, 8, 4)["num_stages"] == 3
    assert select(8 * 71, 8, 16)["num_stages"] == 3
    default = select(65536, 256, 2048 // 128)
    assert (default["BLOCK_M"], default["BLOCK_N"], default["num_warps"]) == (64, 128, 4)
    assert not select(65536, 256, 512 // 128)["SWAP_AB"]


# --- the oracle itself ---------------------------------------------------------------

def test_reference_matches_dequantized_matmul():
    """out ~= (A * Q_A F_A) @ (B * Q_B F_B)^T in float64, expert by expert (SPEC 5)."""
    problem = make_problem(RAGGED, 256, 128, act_block_m=32, block_n=64, block_k=64,
                           super_group_size=3, with_bias=True, seed=50)
    a_q, a_qscale, a_fscale, b_q, b_qscale, b_fscale, offsets, scale_offsets = problem.tensors
    opts = problem.options
    block_k, group = opts["block_k"], opts["super_group_size"]
    k_blocks = torch.arange(a_q.shape[1]) // block_k   # K column -> K-block
    k_groups = k_blocks // group                        # K column -> super group
    out = ref_gemm.grouped_gemm(*problem.tensors, **opts, out_dtype=torch.float32,
                                bias=problem.bias)
    offsets, scale_offsets = offsets.tolist(), scale_offsets.tolist()
    for expert in range(len(offsets) - 1):
        start, end = offsets[expert], offsets[expert + 1]
        rows = scale_offsets[expert] + torch.arange(end - start) // opts["act_block_m"]
        a_scale = a_qscale[rows][:, k_blocks].double() * a_fscale[rows][:, k_groups].double()
        b_rows = torch.arange(b_q.shape[1]) // opts["block_n"]
        b_scale = (b_qscale[expert][b_rows][:, k_blocks].double()
                   * b_fscale[expert][b_rows][:, k_groups].double())
        expected = ((a_q[start:end].double() * a_scale) @ (b_q[expert].double() * b_scale).T
                    + problem.bias[expert].double())
        torch.testing.assert_close(out[start:end].double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.all(out[problem.num_valid_rows:] == 0)


def test_reference_partials_shape_and_sum():
    problem = make_problem([5, 0, 9], 256, 64, act_block_m=4, block_n=64, block_k=32,
                           super_group_size=3, seed=60)
    a_q, a_qscale, _, b_q, b_qscale, _, offsets, scale_offsets = problem.tensors
    partials = ref_gemm.super_group_partials(a_q, a_qscale, b_q, b_qscale, offsets,
                                             scale_offsets, **problem.options)
    assert partials.shape == (a_q.shape[0], 64, 3) and partials.dtype == torch.int64
    # With all Q = 1 the super-group sums add up to the plain integer matmul.
    ones_a, ones_b = torch.ones_like(a_qscale), torch.ones_like(b_qscale)
    plain = ref_gemm.super_group_partials(a_q, ones_a, b_q, ones_b, offsets, scale_offsets,
                                          **problem.options).sum(-1)
    torch.testing.assert_close(plain[:5], a_q[:5].long() @ b_q[0].long().T, rtol=0, atol=0)
    torch.testing.assert_close(plain[5:14], a_q[5:14].long() @ b_q[2].long().T, rtol=0, atol=0)


@pytest.mark.parametrize("super_group_size, wraps", [(256, True), (4, False)])
def test_wrap_detector_adversarial(super_group_size, wraps):
    """All-127 operands with Q = q_max = 16 and block_k 128: one K-block adds
    16*16*128*127^2 ~ 5.3e8, so a super group of 8 blocks (G = 256 covers all of K = 1024)
    passes 2^31 while G = 4 peaks at ~2.11e9 < 2^31 - 1 (SPEC 5)."""
    num_rows, k_in, n_out = 4, 1024, 64
    a_q = torch.full((num_rows, k_in), 127, dtype=torch.int8)
    b_q = torch.full((1, n_out, k_in), 127, dtype=torch.int8)
    a_qscale = torch.full((2, k_in // 128), 16, dtype=torch.int32)
    b_qscale = torch.full((1, n_out // 64, k_in // 128), 16, dtype=torch.int32)
    offsets = torch.tensor([0, num_rows], dtype=torch.int32)
    scale_offsets = torch.tensor([0, 1], dtype=torch.int32)
    opts = dict(act_block_m=128, block_n=64, block_k=128, super_group_size=super_group_size)
    assert ref_gemm.int32_would_wrap(a_q, a_qscale, b_q, b_qscale, offsets, scale_offsets,
                                     **opts) is wraps
    largest = ref_gemm.max_running_partial(a_q, a_qscale, b_q, b_qscale, offsets,
                                           scale_offsets, **opts)
    assert largest == min(super_group_size, 8) * 16 * 16 * 128 * 127 * 127


# --- compiled for sm_90 on this machine ------------------------------------------------

# Under TRITON_INTERPRET=1 every @triton.jit function, triton.language's own included, is an
# interpreter object that cannot be compiled, so the sm_90 compiles run in one child process
# with the interpreter off, and report what the PTX and the cubin hold. Arguments are
# specialized as a launch at the default workload specializes them (ints equal to 1 become
# constants, pointers and multiples of 16 carry divisibility 16): without that the loads
# would not vectorize and register use would not be the real one.
COMPILE_SCRIPT = r"""
import json, re, sys
from aot import compile_for_hopper, launch_specialization, register_usage
from triton_moe import gemm as triton_gemm

kernel = triton_gemm.grouped_gemm_kernel
num_rows, num_experts, k_in, n_out = 65536, 256, 2048, 1024
k_blocks, groups = k_in // 128, k_in // 128 // 4
results = {}
for case in json.loads(sys.argv[1]):
    config = dict(case["config"])
    num_warps, num_stages = config.pop("num_warps"), config.pop("num_stages")
    act_block_m = case["act_block_m"]
    per_token = act_block_m == 1
    values = dict(
        num_experts=num_experts, n_out=n_out,
        num_m_tiles=triton_gemm.num_m_tiles_bound(num_rows, num_experts, config["BLOCK_M"]),
        stride_aqm=k_blocks, stride_aqk=1, stride_afm=groups, stride_afg=1,
        stride_bqe=n_out // 64 * k_blocks, stride_bqn=k_blocks, stride_bqk=1,
        stride_bfe=n_out // 64 * groups, stride_bfn=groups, stride_bfg=1,
        stride_biase=n_out if per_token else 0, stride_biasn=1 if per_token else 0,
        stride_om=n_out, stride_on=1)
    pointers = dict(a_desc=f"tensordesc<i8[{config['BLOCK_M']}, 128]>",
                    b_desc=f"tensordesc<i8[{config['BLOCK_N']}, 128]>",
                    a_qscale_ptr="*i32", b_qscale_ptr="*i32", expert_offsets_ptr="*i32",
                    scale_row_offsets_ptr="*i32", a_fscale_ptr="*fp32", b_fscale_ptr="*fp32",
                    bias_ptr="*fp32", out_ptr="*fp32" if per_token else "*bf16")
    constexprs = dict(SCALE_BLOCK_M=act_block_m, SCALE_BLOCK_N=64, SUPER_GROUP=4, BLOCK_K=128,
                      NUM_K_BLOCKS=k_blocks, EXPERTS_PAD=num_experts, HAS_BIAS=per_token,
                      NUM_STAGES=num_stages, **config)
    signature, unit, divisible = launch_specialization(
        dict(pointers, **{name: "i32" for name in values}), values)
    try:
        compiled = compile_for_hopper(kernel, signature, dict(constexprs, **unit),
                                      num_warps=num_warps, num_stages=num_stages,
                                      divisible_by_16=divisible)
        ptx = compiled.asm["ptx"]
        results[case["id"]] = dict(wgmma=sorted(set(re.findall(r"wgmma\.mma_async\S*", ptx))),
                                   mma_sync="mma.sync" in ptx,
                                   tma="cp.async.bulk.tensor" in ptx,
                                   **register_usage(compiled))
    except Exception as exc:
        results[case["id"]] = dict(error=f"{type(exc).__name__}: {exc}")
print(json.dumps(results))
"""
# Every tile variant at the activation scale block "auto" picks for its batch size; per-token
# scales (vector Q/F, bias, fp32 out) on the smallest and the default tile; 32-row scale
# blocks inside the 64-row tile (the few-blocks vector of ``_tile_scales``).
COMPILE_CASES = [dict(id=f"{TILE_IDS[variant]}-abm{act_block_m}", config=TILE_VARIANTS[variant],
                      act_block_m=act_block_m)
                 for variant, act_block_m in ((0, 1), (0, 64), (2, 64), (1, 128), (1, 1),
                                              (1, 32))]


@pytest.fixture(scope="module")
def hopper_ptx_summary():
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "tests"), str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(COMPILE_CASES)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case_id", [case["id"] for case in COMPILE_CASES])
def test_compiles_to_int8_wgmma_on_sm90(hopper_ptx_summary, case_id):
    """Each tile variant, with per-tile and per-token (1) activation scales, must issue
    signed int8 wgmma on Hopper, the point of the hybrid scheme (SPEC 5), fed by TMA; the
    16-row tile gets there by swapping operands (a 16-row M would fall back to mma.sync).
    No register spills (no stack or local bytes): a spilling variant ran 3x slower on an
    H200 (bench/results/gemm_tuning.md)."""
    summary = hopper_ptx_summary[case_id]
    assert "error" not in summary, summary.get("error")
    assert any(re.search(r"\.s32\.s8\.s8", instr) for instr in summary["wgmma"]), summary
    assert not summary["mma_sync"], summary
    assert summary["tma"], summary
    assert summary["spill_bytes"] == 0, summary


# --- real sizes, GPU only ---------------------------------------------------------------

def random_counts(num_rows, num_experts, seed):
    """Skewed per-expert row counts summing to num_rows, some experts empty."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(num_experts, generator=gen) ** 3
    weights[torch.randperm(num_experts, generator=gen)[: num_experts // 16]] = 0
    experts = torch.multinomial(weights, num_rows, replacement=True, generator=gen)
    return torch.bincount(experts, minlength=num_experts).tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("num_rows, k_in, n_out", [
    (65536, 2048, 1024),   # GEMM1 of the default workload: M 8192 x top-8 pairs
    (65536, 512, 2048),    # GEMM2
    (512, 2048, 1024),     # decode-like: M 64 x top-8, 2 rows per expert (16-row tile)
], ids=["gemm1", "gemm2", "decode"])
def test_default_workload(num_rows, k_in, n_out):
    """256 experts, default quantization (SPEC 8), act_block_m as "auto" resolves it."""
    num_experts = 256
    act_block_m = resolve_act_block_m("auto", num_rows, num_experts)
    counts = random_counts(num_rows - 64, num_experts, seed=70)   # 64 rows past R
    problem = make_problem(counts, k_in, n_out, act_block_m=act_block_m, block_n=64,
                           block_k=128, super_group_size=4, extra_rows=64, seed=71,
                           device="cuda")
    for out_dtype in (torch.bfloat16, torch.float32):
        assert_matches(*run_both(problem, out_dtype), problem)
