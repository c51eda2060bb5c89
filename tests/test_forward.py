"""The whole Triton forward against the reference emulation (backend="torch").

Both compute the same int8 values, the same (Q, F) scales and exact integer GEMM sums, so
they agree to the last bit except where a float rounds differently: Triton's and torch's
exp in SiLU may differ by an ulp, which can move an int8 activation by one step in a rare
element, and on the GPU fp32 multiply-adds may be fused. We allow a relative L2
difference of 2e-3, an order of magnitude below the quantization error itself (~3e-2,
tests/test_reference_moe.py), so a real indexing or scaling bug cannot hide in it.
"""
import pytest
import torch

import triton_moe
from reference.moe import moe_float

TOLERANCE = 2e-3


def _rel_l2(out, ref):
    ref = ref.float()
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _make(num_tokens, hidden, inter, num_experts, top_k, *, dtype, device, seed=0,
          ids=None, **quant):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.02
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) * 0.02
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    tw, ti = triton_moe.route(logits, top_k, backend="torch")
    if ids is not None:
        ti = ids(num_tokens, top_k).to(torch.int32)
    weights = triton_moe.quantize_weights(w13.to(device), w2.to(device), **quant)
    return x.to(device), weights, tw.to(device), ti.to(device), w13, w2


CASES = {
    # name: (M, K, N, E, top_k, extra)
    "ragged": (37, 256, 128, 8, 2, {}),
    "top1": (20, 256, 128, 4, 1, {}),
    "one_expert": (24, 256, 128, 4, 2,
                   dict(ids=lambda m, k: torch.stack([torch.full((m,), 2),
                                                      torch.full((m,), 2)], 1)[:, :k])),
    "empty_expert": (30, 256, 128, 6, 2,
                     dict(ids=lambda m, k: (torch.arange(m * k) % 5).reshape(m, k))),
    "per_token": (33, 256, 128, 4, 2, dict(act_block_m=1)),
    "nearest_g256": (33, 256, 128, 4, 2, dict(scale_rounding="nearest", super_group_size=256,
                                              allow_int32_overflow=True)),
    "sg1_k512": (16, 512, 256, 4, 2, dict(super_group_size=1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_forward_matches_reference(case, device):
    m, k_dim, n_dim, e, top_k, extra = CASES[case]
    extra = dict(extra)
    ids = extra.pop("ids", None)
    x, weights, tw, ti, _, _ = _make(m, k_dim, n_dim, e, top_k, dtype=torch.bfloat16,
                                     device=device, ids=ids, **extra)
    out = triton_moe.moe_forward(x, weights, tw, ti, backend="triton")
    ref = triton_moe.moe_forward(x, weights, tw, ti, backend="torch")
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.isfinite(out).all()
    assert _rel_l2(out, ref) < TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_forward_dtypes(dtype, device):
    x, weights, tw, ti, w13, w2 = _make(19, 256, 128, 4, 2, dtype=dtype, device=device)
    out = triton_moe.moe_forward(x, weights, tw, ti, backend="triton")
    ref = triton_moe.moe_forward(x, weights, tw, ti, backend="torch")
    assert out.dtype == dtype
    assert _rel_l2(out, ref) < TOLERANCE
    assert _rel_l2(out, moe_float(x, w13.to(device), w2.to(device), tw, ti)) < 0.05


def test_triton_forward_empty_batch(device):
    x, weights, tw, ti, _, _ = _make(0, 256, 128, 4, 2, dtype=torch.bfloat16, device=device)
    out = triton_moe.moe_forward(x, weights, tw, ti, backend="triton")
    assert out.shape == (0, 256)


def test_triton_forward_expert_map(device):
    x, weights, tw, ti, _, _ = _make(21, 256, 128, 4, 2, dtype=torch.bfloat16, device=device)
    # 8 global experts, 4 local: global 1, 3, 5, 7 live here.
    ti = (ti * 2 + 1 - (torch.arange(ti.numel(), device=device).reshape(ti.shape) % 2) * 1)
    ti = ti.clamp(0, 7).to(torch.int32)
    expert_map = torch.tensor([-1, 0, -1, 1, -1, 2, -1, 3], dtype=torch.int32, device=device)
    out = triton_moe.moe_forward(x, weights, tw, ti, backend="triton", expert_map=expert_map)
    ref = triton_moe.moe_forward(x, weights, tw, ti, backend="torch", expert_map=expert_map)
    assert _rel_l2(out, ref) < TOLERANCE


def test_fused_moe_equals_route_then_forward(device):
    x, weights, _, _, _, _ = _make(17, 256, 128, 8, 2, dtype=torch.bfloat16, device=device)
    logits = torch.randn(17, 8, generator=torch.Generator().manual_seed(3)).to(device)
    tw, ti = triton_moe.route(logits, 2, backend="triton")
    stages = []
    out = triton_moe.fused_moe(x, weights, logits, 2, backend="triton",
                               stage_callback=stages.append)
    assert torch.equal(out, triton_moe.moe_forward(x, weights, tw, ti, backend="triton"))
    assert stages == ["route", "permute_quantize", "gemm1", "silu_quantize", "gemm2",
                      "unpermute", "end"]


# ----------------------------------------------------------------------------- GPU tier
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [
    (8192, 2048, 512, 256, 8),   # default "35B-A3B" workload
    (64, 2048, 512, 256, 8),     # small batch: 64-row activation blocks
    (1000, 2048, 768, 128, 8),   # Qwen3-30B-A3B, ragged
])
def test_gpu_forward_real_sizes(shape):
    m, k_dim, n_dim, e, top_k = shape
    x, weights, tw, ti, w13, w2 = _make(m, k_dim, n_dim, e, top_k, dtype=torch.bfloat16,
                                        device="cuda")
    out = triton_moe.moe_forward(x, weights, tw, ti, backend="triton")
    ref = triton_moe.moe_forward(x, weights, tw, ti, backend="torch")
    assert _rel_l2(out, ref) < TOLERANCE
    assert _rel_l2(out, moe_float(x, w13.cuda(), w2.cuda(), tw, ti)) < 0.05


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_and_determinism():
    x, weights, tw, ti, _, _ = _make(2048, 2048, 512, 64, 8, dtype=torch.bfloat16,
                                     device="cuda")
    eager = triton_moe.moe_forward(x, weights, tw, ti, backend="triton")
    again = triton_moe.moe_forward(x, weights, tw, ti, backend="triton")
    assert torch.equal(eager, again), "run-to-run results differ"

    static_x, static_tw, static_ti = x.clone(), tw.clone(), ti.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):   # warm up (compile) outside the capture
        triton_moe.moe_forward(static_x, weights, static_tw, static_ti, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = triton_moe.moe_forward(static_x, weights, static_tw, static_ti,
                                            backend="triton")
    graph.replay()
    assert torch.equal(static_out, eager)

    # New inputs in the same buffers, new routing: replay must follow them.
    x2, _, tw2, ti2, _, _ = _make(2048, 2048, 512, 64, 8, dtype=torch.bfloat16,
                                  device="cuda", seed=7)
    static_x.copy_(x2)
    static_tw.copy_(tw2)
    static_ti.copy_(ti2)
    graph.replay()
    assert torch.equal(static_out, triton_moe.moe_forward(x2, weights, tw2, ti2,
                                                          backend="triton"))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_out_of_range_ids_poison_only_their_token(backend, device):
    """Without the (syncing) id check, a bad id must neither corrupt memory nor vanish:
    its token's output is NaN and every other token is unaffected. (Per-token activation
    scales, so that dropping the bad pairs cannot change other rows' scale blocks.)"""
    x, weights, tw, ti, _, _ = _make(12, 256, 128, 4, 2, dtype=torch.bfloat16, device=device,
                                     act_block_m=1)
    good = triton_moe.moe_forward(x, weights, tw, ti, backend=backend)
    bad_ids = ti.clone()
    bad_ids[3, 1] = 4       # one past the last expert
    bad_ids[7, 0] = -5      # negative
    out = triton_moe.moe_forward(x, weights, tw, bad_ids, backend=backend, check_ids=False)
    poisoned = torch.zeros(12, dtype=torch.bool, device=device)
    poisoned[[3, 7]] = True
    assert torch.isnan(out[poisoned]).all()
    assert torch.equal(out[~poisoned], good[~poisoned])
    with pytest.raises(ValueError, match="topk_ids must lie in"):
        triton_moe.moe_forward(x, weights, tw, bad_ids, backend=backend, check_ids=True)
