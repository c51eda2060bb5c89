"""Un-permute (SPEC 7): the oracle on a hand-worked case, the Triton kernel against the
oracle, and the kernel compiled for sm_90.

Tolerance: none, the kernel must match the oracle bit for bit. Both add the terms in fp32
in order of j with one rounding per multiply and per add: under the interpreter that is
numpy fp32 arithmetic; compiled, the kernel is launched with enable_fp_fusion=False, so
no multiply-add is contracted into an FMA (which would round once and change the last
fp32 bit; the PTX is checked below). The fp32 -> bf16 store rounds to nearest even in
both modes (the interpreter's own cast truncates; the kernel rounds on the bits).
"""
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from reference import permute as ref_permute
from reference import unpermute as ref
from tests.aot import compile_for_hopper, run_without_interpreter
from triton_moe import unpermute as tri
from triton_moe.jit_utils import fp32_to_bf16_rne

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _routed_case(num_tokens, top_k, hidden, dtype, device, seed, drop_fraction=0.25):
    """mm2_out, topk_weights, pair_to_row from a real permutation with dropped pairs.

    Dropped pairs get NaN weights: the kernel must skip them, not multiply by them.
    """
    gen = torch.Generator().manual_seed(seed)
    num_global = 16
    topk_ids = torch.randint(0, num_global, (num_tokens, top_k), generator=gen,
                             dtype=torch.int32)
    expert_map = torch.arange(num_global, dtype=torch.int32)
    expert_map[torch.rand(num_global, generator=gen) < drop_fraction] = -1
    expert_map[expert_map >= 0] = torch.arange(int((expert_map >= 0).sum()), dtype=torch.int32)
    perm = ref_permute.permute(topk_ids, num_global, expert_map=expert_map)
    num_pairs = num_tokens * top_k
    mm2_out = (torch.randn(num_pairs, hidden, generator=gen) * 3).to(dtype)
    topk_weights = torch.rand(num_tokens, top_k, generator=gen)
    topk_weights.view(-1)[perm.pair_to_row < 0] = float("nan")
    return mm2_out.to(device), topk_weights.to(device), perm.pair_to_row.to(device)


def _assert_bit_equal(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.cpu(), want.cpu()), (got.float() - want.float()).abs().max()


# ----------------------------------------------------------------------------- the oracle
def test_reference_hand_worked():
    mm2_out = torch.tensor([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0], [5.0, 5.0]])
    topk_weights = torch.tensor([[0.5, 2.0], [float("nan"), 0.25]])
    pair_to_row = torch.tensor([2, 0, -1, 1], dtype=torch.int32)  # pair 2 dropped
    out = ref.unpermute(mm2_out, topk_weights, pair_to_row)
    assert out.tolist() == [[0.5 * 100 + 2.0 * 1, 0.5 * 200 + 2.0 * 2], [2.5, 5.0]]


def test_reference_adds_in_order_of_j():
    # 1 + 2**-24 + 2**-24: left to right each add rounds back to 1; any other order is
    # 1 + 2**-23. The oracle must take j in order.
    mm2_out = torch.tensor([[1.0], [2.0 ** -24], [2.0 ** -24]])
    out = ref.unpermute(mm2_out, torch.ones(1, 3), torch.tensor([0, 1, 2], dtype=torch.int32))
    assert out.item() == 1.0


# ----------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,top_k,hidden", [(1, 1, 64), (17, 8, 256), (5, 2, 1500)])
def test_unpermute_matches_reference(num_tokens, top_k, hidden, dtype, device):
    mm2_out, topk_weights, pair_to_row = _routed_case(num_tokens, top_k, hidden, dtype, device,
                                                      seed=num_tokens)
    got = tri.unpermute(mm2_out, topk_weights, pair_to_row)
    want = ref.unpermute(mm2_out.cpu(), topk_weights.cpu(), pair_to_row.cpu())
    assert not want.isnan().any()
    _assert_bit_equal(got, want)


def test_unpermute_adds_in_order_of_j(device):
    mm2_out = torch.tensor([[1.0], [2.0 ** -24], [2.0 ** -24]], device=device)
    pair_to_row = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    assert tri.unpermute(mm2_out, torch.ones(1, 3, device=device), pair_to_row).item() == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_unpermute_into_strided_out_with_strided_weights(dtype, device):
    """``out`` a column slice of a wider buffer, weights a transposed view: strides honoured,
    nothing outside the slice touched."""
    mm2_out, topk_weights, pair_to_row = _routed_case(9, 4, 96, dtype, device, seed=3)
    weights_view = topk_weights.t().contiguous().t()  # same values, strides (1, M)
    buffer = torch.full((9, 200), 7.0, dtype=dtype, device=device)
    out = buffer[:, 50:146]
    assert tri.unpermute(mm2_out, weights_view, pair_to_row, out=out) is out
    _assert_bit_equal(out, ref.unpermute(mm2_out.cpu(), topk_weights.cpu(), pair_to_row.cpu()))
    assert (buffer[:, :50] == 7).all() and (buffer[:, 146:] == 7).all()


def test_unpermute_invalid_pair_poisons_its_token(device):
    mm2 = torch.randn(8, 64, device=device)
    weights = torch.rand(4, 2, device=device)
    pair_to_row = torch.tensor([0, 1, 2, ref_permute.INVALID_PAIR, 4, -1, 6, 7],
                               dtype=torch.int32, device=device)
    got = tri.unpermute(mm2, weights, pair_to_row)
    want = ref.unpermute(mm2.cpu(), weights.cpu(), pair_to_row.cpu())
    assert torch.isnan(got[1]).all() and torch.isnan(want[1]).all()
    keep = torch.tensor([0, 2, 3])
    assert torch.equal(got[keep].cpu(), want[keep])
    assert torch.isfinite(want[keep]).all()


def test_unpermute_all_pairs_dropped(device):
    mm2_out = torch.randn(12, 64, device=device)
    pair_to_row = torch.full((12,), -1, dtype=torch.int32, device=device)
    topk_weights = torch.full((4, 3), float("nan"), device=device)
    out = tri.unpermute(mm2_out, topk_weights, pair_to_row)
    assert (out == 0).all()


def test_unpermute_empty_batch(device, monkeypatch):
    monkeypatch.setattr(tri, "_unpermute_kernel", None)  # a launch would raise
    out = tri.unpermute(torch.empty(0, 64, device=device), torch.empty(0, 8, device=device),
                        torch.empty(0, dtype=torch.int32, device=device))
    assert out.shape == (0, 64)


@triton.jit
def _round_to_bf16_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, fp32_to_bf16_rne(x), mask=offs < n)


def test_fp32_to_bf16_rounds_to_nearest_even(device):
    gen = torch.Generator().manual_seed(4)
    bf16_grid = torch.randn(256, generator=gen).to(torch.bfloat16).float()
    # Exact ties: a bf16 value plus half its ulp (bf16 keeps 8 significant bits).
    half_ulp = torch.ldexp(torch.ones_like(bf16_grid), torch.frexp(bf16_grid).exponent - 9)
    special = torch.tensor([0.0, -0.0, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -(1.0 + 2.0 ** -8),
                            3.3895e38, -3.3895e38, float("inf"), float("-inf"), 1e-40, -1e-40,
                            2.0 ** -133, torch.finfo(torch.float32).max])
    x = torch.cat([torch.randn(512, generator=gen) * 100, bf16_grid + half_ulp,
                   bf16_grid - half_ulp, bf16_grid + 0.99 * half_ulp, special]).contiguous()
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    x_dev, y_dev = x.to(device), y.to(device)
    _round_to_bf16_kernel[(triton.cdiv(x.numel(), 1024),)](x_dev, y_dev, x.numel(), BLOCK=1024)
    want = x.to(torch.bfloat16)
    assert torch.equal(y_dev.cpu().view(torch.int16), want.view(torch.int16))
    nan = torch.tensor([float("nan")], device=device)
    y_nan = torch.empty(1, dtype=torch.bfloat16, device=device)
    _round_to_bf16_kernel[(1,)](nan, y_nan, 1, BLOCK=16)
    assert y_nan.isnan().all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_unpermute_real_size_gpu(dtype):
    mm2_out, topk_weights, pair_to_row = _routed_case(8192, 8, 2048, dtype, "cuda", seed=5)
    _assert_bit_equal(tri.unpermute(mm2_out, topk_weights, pair_to_row),
                      ref.unpermute(mm2_out, topk_weights, pair_to_row))


# ----------------------------------------------------------------------------- sm_90 compile
def compile_kernel_for_sm90() -> dict:
    """Compile the kernel for sm_90 per output dtype; returns the f32 multiply/add/FMA
    counts of its PTX as launched (no fp fusion), and for bf16 with Triton's default.

    Runs in a child process without TRITON_INTERPRET (see ``test_kernel_compiles_for_sm90``).
    """

    counts = {}
    for ptr_type in ("*fp32", "*bf16", "*fp16"):
        signature = {"mm2_ptr": ptr_type, "topk_weights_ptr": "*fp32", "pair_to_row_ptr": "*i32",
                     "out_ptr": ptr_type, "hidden": "i32", "stride_mm2_m": "i32",
                     "stride_w_m": "i32", "stride_w_j": "i32", "stride_out_m": "i32"}
        constexprs = {"TOP_K": 8, "BLOCK_K": tri.UNPERMUTE_CONFIG["MAX_BLOCK_K"]}
        fused = None
        if ptr_type == "*bf16":  # Triton's default options, once, as a control
            fused = compile_for_hopper(tri._unpermute_kernel, dict(signature), constexprs,
                                       num_warps=tri.UNPERMUTE_CONFIG["num_warps"])
        # As launched: without fp fusion.
        unfused = compile_for_hopper(tri._unpermute_kernel, dict(signature), constexprs,
                                     num_warps=tri.UNPERMUTE_CONFIG["num_warps"],
                                     enable_fp_fusion=False)
        for label, compiled in (("default", fused), ("launched", unfused)):
            if compiled is None:
                continue
            ptx = compiled.asm["ptx"]
            counts[f"{ptr_type} {label}"] = {op: ptx.count(op + ".rn.f32")
                                             for op in ("fma", "mul", "add")}
    return counts


def test_kernel_compiles_for_sm90():
    """In a child process: under TRITON_INTERPRET=1, @triton.jit builds interpreter objects
    that cannot be compiled."""
    counts = run_without_interpreter("tests.test_unpermute", "compile_kernel_for_sm90")
    for ptr_type in ("*fp32", "*bf16", "*fp16"):
        launched = counts[f"{ptr_type} launched"]
        assert launched["fma"] == 0 and launched["mul"] > 0 and launched["add"] > 0, counts
    # The check means something: with default fusion the multiply-adds do contract.
    assert counts["*bf16 default"]["fma"] > 0, counts
