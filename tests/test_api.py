"""Public API: configuration, backend selection and input validation."""
import pytest
import torch

import triton_moe
from triton_moe import QuantConfig, backends
from triton_moe.config import max_safe_super_group_size, resolve_act_block_m, super_group_bound

E, K, N, M, TOP_K = 4, 256, 128, 8, 2


@pytest.fixture(scope="module")
def weights():
    gen = torch.Generator().manual_seed(0)
    w13 = torch.randn(E, 2 * N, K, generator=gen) * 0.02
    w2 = torch.randn(E, K, N, generator=gen) * 0.02
    return triton_moe.quantize_weights(w13, w2)


def _inputs(m=M, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, K, generator=gen).to(dtype)
    logits = torch.randn(m, E, generator=gen)
    topk_weights, topk_ids = triton_moe.route(logits, TOP_K, backend="torch")
    return x, topk_weights, topk_ids


# ----------------------------------------------------------------------------- config
def test_default_super_group_is_largest_int32_safe():
    cfg = QuantConfig.create()
    assert cfg.super_group_size == 4 == max_safe_super_group_size(16, 128)
    assert super_group_bound(4, 16, 128) < 2**31 <= super_group_bound(5, 16, 128)
    assert cfg.scale_rounding == "consistent"


def test_reference_design_super_group_needs_opt_in():
    with pytest.raises(ValueError, match="super_group_size=256 can wrap"):
        QuantConfig.create(super_group_size=256, scale_rounding="nearest")
    cfg = QuantConfig.create(super_group_size=256, scale_rounding="nearest",
                             allow_int32_overflow=True)
    assert cfg.super_group_size == 256


@pytest.mark.parametrize("kwargs, match", [
    (dict(scale_rounding="up"), "scale_rounding"),
    (dict(q_max=0), "q_max"),
    (dict(block_k=100), "block_k"),
    (dict(block_k=96), "block_k must be a power of two"),
    (dict(block_n=40), "block_n"),
    (dict(act_block_m=0), "act_block_m"),
    (dict(act_block_m="tile"), "act_block_m"),
    (dict(super_group_size=0), "super_group_size"),
    (dict(q_max=2**10), "no super_group_size is int32-safe"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig.create(**kwargs)


def test_auto_act_block_m_follows_reference_switch():
    assert resolve_act_block_m("auto", 8192 * 8, 256) == 128   # 256 rows per expert
    assert resolve_act_block_m("auto", 64 * 8, 256) == 64      # 2 rows per expert
    assert resolve_act_block_m("auto", 70 * 4, 4) == 64        # exactly 70: 64
    assert resolve_act_block_m(1, 10, 4) == 1


# ----------------------------------------------------------------------------- backends
def test_backend_env_var_and_argument(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.resolve_backend(None) == "triton"
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.resolve_backend(None) == "torch"
    assert backends.resolve_backend("cutlass") == "cutlass"   # argument wins
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=r"\$TRITON_MOE_BACKEND='cuda'.*triton, cutlass, torch"):
        backends.resolve_backend(None)
    with pytest.raises(ValueError, match="valid: triton, cutlass, torch"):
        backends.resolve_backend("numpy")


def test_backend_unavailable_says_why(monkeypatch):
    assert backends.unavailable_reason("torch", "cpu") is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in backends.unavailable_reason("triton", "cpu")
    reason = backends.unavailable_reason("cutlass", "cpu")
    assert reason is not None and ("CUDA" in reason or "nvidia-cutlass-dsl" in reason)
    with pytest.raises(backends.BackendUnavailableError, match="cutlass"):
        backends.require_backend("cutlass", "cpu")
    assert set(triton_moe.available_backends("cpu")) == {"triton", "cutlass", "torch"}


def test_forward_with_unavailable_backend_raises(weights):
    x, tw, ti = _inputs()
    with pytest.raises(backends.BackendUnavailableError, match="cutlass"):
        triton_moe.moe_forward(x, weights, tw, ti, backend="cutlass")


# ----------------------------------------------------------------------------- validation
def test_quantize_weights_validation():
    w13 = torch.randn(E, 2 * N, K)
    w2 = torch.randn(E, K, N)
    with pytest.raises(ValueError, match="w2 must have shape"):
        triton_moe.quantize_weights(w13, w2[:, :, :64])
    with pytest.raises(TypeError, match="w13 must have dtype"):
        triton_moe.quantize_weights(w13.to(torch.int8), w2)
    with pytest.raises(ValueError, match="w13 must be 3-D"):
        triton_moe.quantize_weights(w13[0], w2)
    with pytest.raises(ValueError, match="hidden size K=200 must be a multiple of block_k"):
        triton_moe.quantize_weights(torch.randn(E, 2 * N, 200), torch.randn(E, 200, N))
    with pytest.raises(ValueError, match="intermediate size N=96"):
        triton_moe.quantize_weights(torch.randn(E, 192, K), torch.randn(E, K, 96))
    with pytest.raises(ValueError, match="super_group_size"):
        triton_moe.quantize_weights(w13, w2, super_group_size=8)


def test_quantized_weights_layout(weights):
    assert weights.w13_q.dtype == torch.int8 and weights.w13_q.shape == (E, 2 * N, K)
    assert weights.w13_qscale.dtype == torch.int32
    assert weights.w13_qscale.shape == (E, 2 * N // 64, K // 128)
    assert weights.w13_fscale.dtype == torch.float32
    assert weights.w13_fscale.shape == (E, 2 * N // 64, 1)
    assert weights.w2_q.shape == (E, K, N) and weights.w2_qscale.shape == (E, K // 64, N // 128)
    assert (weights.num_experts, weights.hidden_size, weights.intermediate_size) == (E, K, N)


def test_route_validation():
    logits = torch.randn(M, E)
    with pytest.raises(ValueError, match="top_k=5 exceeds"):
        triton_moe.route(logits, 5)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        triton_moe.route(logits, 0)
    with pytest.raises(ValueError, match="scoring must be"):
        triton_moe.route(logits, 2, scoring="relu")
    with pytest.raises(ValueError, match="apply to scoring='sigmoid' only"):
        triton_moe.route(logits, 2, num_expert_group=2)
    with pytest.raises(ValueError, match="num_expert_group=3 must divide"):
        triton_moe.route(logits, 2, scoring="sigmoid", num_expert_group=3, topk_group=1)
    with pytest.raises(ValueError, match="topk_group=3 exceeds"):
        triton_moe.route(logits, 2, scoring="sigmoid", num_expert_group=2, topk_group=3)
    with pytest.raises(ValueError, match="correction_bias must have shape"):
        triton_moe.route(logits, 2, scoring="sigmoid", correction_bias=torch.zeros(E + 1))
    with pytest.raises(TypeError, match="router_logits must have dtype"):
        triton_moe.route(logits.long(), 2)


@pytest.mark.parametrize("mutate, error, match", [
    (lambda x, w, i: (x.float().double(), w, i), TypeError, "hidden_states must have dtype"),
    (lambda x, w, i: (x[:, :128], w, i), ValueError, "hidden_states must be contiguous"),
    (lambda x, w, i: (x[:, :128].contiguous(), w, i), ValueError, "hidden size K=256"),
    (lambda x, w, i: (x, w, i.float()), TypeError, "topk_ids must have dtype"),
    (lambda x, w, i: (x, w.half(), i), TypeError, "topk_weights must have dtype"),
    (lambda x, w, i: (x, w, i[:-1]), ValueError, r"must both be \[M, top_k\]"),
    (lambda x, w, i: (x, w, i.t()), ValueError, "topk_ids must be contiguous"),
    (lambda x, w, i: (x, w, i + E), ValueError, r"topk_ids must lie in \[0, 4\)"),
    (lambda x, w, i: (x, w, i - 1), ValueError, r"topk_ids must lie in \[0, 4\)"),
    (lambda x, w, i: (x[None], w, i), ValueError, "hidden_states must be 2-D"),
])
def test_forward_validation(weights, mutate, error, match):
    x, tw, ti = mutate(*_inputs())
    with pytest.raises(error, match=match):
        triton_moe.moe_forward(x, weights, tw, ti, backend="torch")


def test_forward_rejects_foreign_weights():
    x, tw, ti = _inputs()
    with pytest.raises(TypeError, match="weights must be the QuantizedMoEWeights"):
        triton_moe.moe_forward(x, {"w13": None}, tw, ti)


def test_expert_map_validation(weights):
    x, tw, ti = _inputs()
    with pytest.raises(ValueError, match="expert_map values must be -1 or a local"):
        triton_moe.moe_forward(x, weights, tw, ti, backend="torch",
                               expert_map=torch.tensor([0, 1, 2, 7], dtype=torch.int32))


def test_fused_moe_rows_must_match(weights):
    x, _, _ = _inputs()
    with pytest.raises(ValueError, match="router_logits has 3 rows"):
        triton_moe.fused_moe(x, weights, torch.randn(3, E), TOP_K, backend="torch")


def test_cutlass_backend_rejects_unsupported_block_k(monkeypatch):
    """The CuTe DSL kernel takes one quant block per K tile: block_k 32 is refused with a
    clear error before any kernel runs (availability is faked: this runs on CPU)."""
    from triton_moe import api

    gen = torch.Generator().manual_seed(0)
    w = triton_moe.quantize_weights(torch.randn(E, 2 * N, K, generator=gen),
                                    torch.randn(E, K, N, generator=gen), block_k=32)
    x, tw, ti = _inputs()
    monkeypatch.setattr(api, "require_backend", lambda backend, device: "cutlass")
    with pytest.raises(ValueError, match=r"cutlass backend supports block_k in \(64, 128, 256\)"):
        triton_moe.moe_forward(x, w, tw, ti, backend="cutlass")
