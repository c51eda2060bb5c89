"""The reference INT8 hybrid forward against the fp32 truth, and its exact properties.

Tolerance derivation (relative L2 error of the whole forward against ``moe_float``):
int8 rounding with a block scale of absmax/127 leaves a uniform error of +-step/2, i.e.
about absmax / (127 * sqrt(12)) RMS. For N(0, 1) data a 128x128 block's absmax is ~4
sigma, so each quantized operand carries ~0.9% relative error and one GEMM ~1.3% (issue
6 measures 1.30% plain, 1.35% consistent). The forward chains GEMM1, a re-quantization of
silu(gate)*up (heavier tailed: ~2%) and GEMM2 (~1.3%): about sqrt(1.3^2+2^2+1.3^2) = 2.7%.
We assert < 5% for Gaussian activations (measured 2.8-3.0%). With 1% of the channels
scaled by 30 the activation blocks' absmax grows ~30x while most values do not: GEMM1's
error grows to ~6% (issue 6 table), so we assert < 10% (measured 6.8-7.2%). "nearest"
(the reference design) has no such bound: a block with s < F/2 is dropped and the rest
are scaled by Q*F != s; measured 3.9-4.8% and 7.9-17.5%, asserted < 6% and < 25%.
The "nearest" rounding must be measurably worse than "consistent" on the outlier data.
"""
import pytest
import torch

import triton_moe
from reference.moe import moe_float

E, K, N = 8, 256, 128


def _layer(seed, outliers=False, num_tokens=96, top_k=2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * N, K, generator=gen) * 0.02
    w2 = torch.randn(E, K, N, generator=gen) * 0.02
    x = torch.randn(num_tokens, K, generator=gen)
    if outliers:
        channels = torch.randperm(K, generator=gen)[: max(1, K // 100)]
        x[:, channels] *= 30.0
    logits = torch.randn(num_tokens, E, generator=gen)
    tw, ti = triton_moe.route(logits, top_k, backend="torch")
    return x.to(dtype), w13, w2, tw, ti


def _rel_l2(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("rounding, outliers, bound", [
    ("consistent", False, 0.05), ("consistent", True, 0.10),
    ("nearest", False, 0.06), ("nearest", True, 0.25)])
def test_reference_close_to_fp32_truth(rounding, outliers, bound):
    x, w13, w2, tw, ti = _layer(0, outliers)
    opts = {} if rounding == "consistent" else dict(super_group_size=256,
                                                    allow_int32_overflow=True)
    weights = triton_moe.quantize_weights(w13, w2, scale_rounding=rounding, **opts)
    out = triton_moe.moe_forward(x, weights, tw, ti, backend="torch")
    err = _rel_l2(out, moe_float(x, w13, w2, tw, ti))
    assert 1e-4 < err < bound, err   # > 1e-4: int8 quantization must show; < bound: derived


def test_consistent_beats_nearest_on_outliers():
    x, w13, w2, tw, ti = _layer(1, outliers=True)
    truth = moe_float(x, w13, w2, tw, ti)
    errs = {}
    for rounding in ("consistent", "nearest"):
        weights = triton_moe.quantize_weights(w13, w2, scale_rounding=rounding,
                                              super_group_size=4)
        errs[rounding] = _rel_l2(triton_moe.moe_forward(x, weights, tw, ti,
                                                        backend="torch"), truth)
    assert errs["consistent"] < errs["nearest"], errs


def test_per_token_scales_help_outliers():
    x, w13, w2, tw, ti = _layer(2, outliers=True)
    truth = moe_float(x, w13, w2, tw, ti)
    errs = {}
    for act_block_m in (128, 1):
        weights = triton_moe.quantize_weights(w13, w2, act_block_m=act_block_m)
        errs[act_block_m] = _rel_l2(triton_moe.moe_forward(x, weights, tw, ti,
                                                           backend="torch"), truth)
    assert errs[1] < errs[128], errs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reference_output_dtype_and_shape(dtype):
    x, w13, w2, tw, ti = _layer(3, dtype=dtype, num_tokens=5)
    weights = triton_moe.quantize_weights(w13, w2)
    out = triton_moe.moe_forward(x, weights, tw, ti, backend="torch")
    assert out.dtype == dtype and out.shape == x.shape
    assert _rel_l2(out, moe_float(x, w13, w2, tw, ti)) < 0.05


def test_expert_map_drops_non_local_experts():
    x, w13, w2, tw, ti = _layer(4)
    # Global experts 0..7 -> only even ones are local (ids 0..3 on this device).
    expert_map = torch.tensor([0, -1, 1, -1, 2, -1, 3, -1], dtype=torch.int32)
    local = slice(0, None, 2)
    weights = triton_moe.quantize_weights(w13[local].contiguous(), w2[local].contiguous())
    out = triton_moe.moe_forward(x, weights, tw, ti, backend="torch", expert_map=expert_map)
    # Truth: the full layer with the non-local pairs' weights set to zero.
    tw_local = torch.where(ti % 2 == 0, tw, torch.zeros_like(tw))
    truth = moe_float(x, w13, w2, tw_local, ti)
    assert _rel_l2(out, truth) < 0.05
    assert torch.equal(truth, moe_float(x, w13[local], w2[local], tw, ti,
                                        expert_map=expert_map))


def test_empty_batch():
    x, w13, w2, tw, ti = _layer(5, num_tokens=0)
    weights = triton_moe.quantize_weights(w13, w2)
    out = triton_moe.moe_forward(x, weights, tw, ti, backend="torch")
    assert out.shape == (0, K)
