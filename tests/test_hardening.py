"""Hardening of every public entry point: bad input raises a clear error naming the
argument; edge shapes and non-finite values neither crash, hang nor corrupt memory.

Entry points: quantize_weights, route, moe_forward, fused_moe, fused_experts (both weight
forms) and the custom op (moe_forward_op / torch.ops.triton_moe.moe_forward).

Interpreter tier: tiny shapes (K=128, N=64, block_k=64, block_n=32, E=4: few Triton
programs). Validation raises before any kernel runs, so most cases cost milliseconds; the
behaviour tests run the Triton pipeline a handful of times. Results are compared with
the ``torch`` backend within test_forward's 2e-3 relative L2 (Triton's and torch's exp
may differ by an ulp and move one int8 step), or bit for bit where both runs are Triton.
GPU tier: device mixing with CUDA, two concurrent streams, and a forward whose GEMM
operand offsets exceed 2**31 elements.
"""
import dataclasses
import functools

import pytest
import torch

import triton_moe
from reference import permute as ref_permute
from triton_moe.config import resolve_act_block_m

E, K, N, TOP_K = 4, 128, 64, 2
QUANT = dict(block_k=64, block_n=32)
TOLERANCE = 2e-3  # as tests/test_forward.py


def _rel_l2(out, ref):
    ref = ref.float()
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _weights(device, seed=0, **quant):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * N, K, generator=gen) * 0.05
    w2 = torch.randn(E, K, N, generator=gen) * 0.05
    return triton_moe.quantize_weights(w13.to(device), w2.to(device), **{**QUANT, **quant})


def _batch(num_tokens, device, *, top_k=TOP_K, seed=1, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, K, generator=gen).to(dtype)
    logits = torch.randn(num_tokens, E, generator=gen)
    tw, ti = triton_moe.route(logits, top_k, backend="torch")
    return x.to(device), tw.to(device), ti.to(device)


def _misaligned(tensor, offset=1):
    """A contiguous copy of ``tensor`` whose data starts ``offset`` elements past an
    allocation (storage_offset=offset): 16-byte misaligned for offset * itemsize < 16."""
    buf = torch.zeros(tensor.numel() + 16, dtype=tensor.dtype, device=tensor.device)
    view = buf[offset:offset + tensor.numel()].view(tensor.shape)
    view.copy_(tensor)
    assert view.is_contiguous() and view.data_ptr() % 16
    return view


@functools.cache
def _shared_weights(device):
    """Default-config weights, made once per device (tests never mutate them)."""
    return _weights(device)


@pytest.fixture(scope="module")
def cpu_weights():
    return _shared_weights("cpu")


# ----------------------------------------------------------------------------- entry points
def _moe_forward(x, w, tw, ti, **kw):
    return triton_moe.moe_forward(x, w, tw, ti, **kw)


def _op(x, w, tw, ti, **kw):
    return triton_moe.moe_forward_op(x, w, tw, ti, **kw)


def _fused_experts(x, w, tw, ti, **kw):
    return triton_moe.fused_experts(x, w, None, tw, ti, **kw)


def _fused_experts_tensors(x, w, tw, ti, **kw):
    """The vLLM form: int8 tensors and (qscale, fscale) pairs."""
    return triton_moe.fused_experts(x, w.w13_q, w.w2_q, tw, ti,
                                    w1_scale=(w.w13_qscale, w.w13_fscale),
                                    w2_scale=(w.w2_qscale, w.w2_fscale),
                                    quant_config=w.config, **kw)


ENTRY_POINTS = {"moe_forward": _moe_forward, "op": _op, "fused_experts": _fused_experts,
                "fused_experts_tensors": _fused_experts_tensors}


def _replace(weights, **fields):
    return dataclasses.replace(weights, **fields)


def _wrong_fscale(w):
    return _replace(w, w13_fscale=torch.ones(E, 2 * N // 32, 3, device=w.device))


# (mutate(x, w, tw, ti) -> (x, w, tw, ti, kwargs), error, regex, entry points or None=all)
# A weight named "weights.<field>" by moe_forward is "w1"/"w2"/"w1_scale[i]" for
# fused_experts' tensor form.
BAD_INPUTS = {
    "hidden_fp64": (lambda x, w, tw, ti: (x.double(), w, tw, ti, {}),
                    TypeError, "hidden_states must have dtype", None),
    "hidden_int8": (lambda x, w, tw, ti: (x.to(torch.int8), w, tw, ti, {}),
                    TypeError, "hidden_states must have dtype", None),
    "hidden_3d": (lambda x, w, tw, ti: (x[None], w, tw, ti, {}),
                  ValueError, "hidden_states must be 2-D", None),
    "hidden_size": (lambda x, w, tw, ti: (x[:, :64].contiguous(), w, tw, ti, {}),
                    ValueError, r"hidden_states.shape\[1\]=64 must equal .* K=128", None),
    "hidden_non_contiguous": (lambda x, w, tw, ti: (x.t().contiguous().t(), w, tw, ti, {}),
                              ValueError, "hidden_states must be contiguous", None),
    "hidden_misaligned": (lambda x, w, tw, ti: (_misaligned(x), w, tw, ti, {}),
                          ValueError, "hidden_states must start at a 16-byte aligned", None),
    "hidden_on_meta": (lambda x, w, tw, ti: (x.to("meta"), w, tw, ti, {}),
                       ValueError, "hidden_states must be on", None),
    "ids_float": (lambda x, w, tw, ti: (x, w, tw, ti.float(), {}),
                  TypeError, "topk_ids must have dtype", None),
    "ids_too_large": (lambda x, w, tw, ti: (x, w, tw, ti + E, {}),
                      ValueError, r"topk_ids must lie in \[0, 4\)", None),
    "ids_negative": (lambda x, w, tw, ti: (x, w, tw, ti - 3, {}),
                     ValueError, r"topk_ids must lie in \[0, 4\)", None),
    "ids_rows": (lambda x, w, tw, ti: (x, w, tw[:-1], ti[:-1], {}),
                 ValueError, r"must both be \[M, top_k\]", None),
    "ids_non_contiguous": (lambda x, w, tw, ti: (x, w, tw, ti.t().contiguous().t(), {}),
                           ValueError, "topk_ids must be contiguous", None),
    "ids_on_meta": (lambda x, w, tw, ti: (x, w, tw, ti.to("meta"), {}),
                    ValueError, "topk_ids must be on", None),
    "k_larger_than_e": (lambda x, w, tw, ti: (x, w, torch.ones(x.shape[0], E + 1, device=x.device),
                                              torch.zeros(x.shape[0], E + 1, dtype=torch.int32,
                                                          device=x.device), {}),
                        ValueError, r"top_k=5 \(topk_ids.shape\[1\]\) must be in \[1, 4\]", None),
    "weights_fp64": (lambda x, w, tw, ti: (x, w, tw.double(), ti, {}),
                     TypeError, "topk_weights must have dtype", None),
    "weights_non_contiguous": (lambda x, w, tw, ti: (x, w, tw.t().contiguous().t(), ti, {}),
                               ValueError, "topk_weights must be contiguous", None),
    "weights_bf16": (lambda x, w, tw, ti: (x, w, tw.bfloat16(), ti, {}),
                     TypeError, "topk_weights must have dtype",
                     ("moe_forward", "op")),  # fused_experts widens bf16 exactly
    "expert_map_float": (lambda x, w, tw, ti: (x, w, tw, ti, dict(
        expert_map=torch.zeros(E, device=x.device))),
        TypeError, "expert_map must have dtype", None),
    "expert_map_values": (lambda x, w, tw, ti: (x, w, tw, ti, dict(
        expert_map=torch.tensor([0, 1, 2, 7], dtype=torch.int32, device=x.device))),
        ValueError, "expert_map values must be -1 or a local expert id", None),
    "w13_misaligned": (lambda x, w, tw, ti: (x, _replace(w, w13_q=_misaligned(w.w13_q)), tw, ti,
                                             {}),
                       ValueError, r"(weights\.w13_q|w1) must start at a 16-byte aligned", None),
    "w2_qscale_misaligned": (lambda x, w, tw, ti: (x, _replace(
        w, w2_qscale=_misaligned(w.w2_qscale)), tw, ti, {}),
        ValueError, r"(weights\.w2_qscale|w2_scale\[0\]) must start at a 16-byte", None),
    "w2_on_meta": (lambda x, w, tw, ti: (x, _replace(w, w2_q=w.w2_q.to("meta")), tw, ti, {}),
                   ValueError, r"(weights\.w2_q|w2) must be on", None),
    "w13_q_float": (lambda x, w, tw, ti: (x, _replace(w, w13_q=w.w13_q.float()), tw, ti, {}),
                    TypeError, r"(weights\.w13_q|w1) must (have dtype|be int8)", None),
    "w13_fscale_shape": (lambda x, w, tw, ti: (x, _wrong_fscale(w), tw, ti, {}),
                         ValueError, r"(weights\.w13_fscale|w1_scale\[1\]) must have shape", None),
    "w2_non_contiguous": (lambda x, w, tw, ti: (x, _replace(
        w, w2_q=w.w2_q.transpose(1, 2).contiguous().transpose(1, 2)), tw, ti, {}),
        ValueError, r"(weights\.w2_q|w2) must be contiguous", None),
    "all_on_meta": (lambda x, w, tw, ti: (x.to("meta"), _replace(w, **{
        f.name: getattr(w, f.name).to("meta") for f in dataclasses.fields(w)
        if f.name != "config"}), tw.to("meta"), ti.to("meta"), {}),
        ValueError, r"(weights\.w13_q|w1) is on meta; the forward runs on cuda",
        ("moe_forward", "fused_experts", "fused_experts_tensors")),  # op: shape inference
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(entry, case, device):
    mutate, error, match, entries = BAD_INPUTS[case]
    if entries is not None and entry not in entries:
        pytest.skip(f"{case} is valid input for {entry}")
    x, tw, ti = _batch(6, device)
    x, w, tw, ti, kwargs = mutate(x, _shared_weights(device), tw, ti)
    if "topk_ids must lie" in match or "expert_map values" in match:
        kwargs = {**kwargs, "check_ids": True}  # value checks: default only on CPU
    with pytest.raises(error, match=match):
        ENTRY_POINTS[entry](x, w, tw, ti, backend="triton", **kwargs)


def test_ids_are_checked_by_default_on_cpu_only(cpu_weights):
    x, tw, ti = _batch(6, "cpu")
    for entry in ENTRY_POINTS.values():
        with pytest.raises(ValueError, match="topk_ids must lie"):
            entry(x, cpu_weights, tw, ti + E, backend="torch")


def test_foreign_weights_rejected():
    x, tw, ti = _batch(6, "cpu")
    for entry in (_moe_forward, _op, _fused_experts):
        with pytest.raises(TypeError, match="QuantizedMoEWeights"):
            entry(x, {"w13": None}, tw, ti)


def test_too_many_pairs_for_int32_ids(cpu_weights):
    """P = M * top_k must fit int32 (pair ids, permuted rows). Checked on meta tensors
    (shape inference allocates nothing) through the op's fake implementation."""
    meta = _replace(cpu_weights, **{f.name: getattr(cpu_weights, f.name).to("meta")
                                    for f in dataclasses.fields(cpu_weights)
                                    if f.name != "config"})
    m = 2**29
    x = torch.empty(m, K, dtype=torch.bfloat16, device="meta")
    tw = torch.empty(m, 4, device="meta")
    ti = torch.empty(m, 4, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match=r"M \* top_k = 536870912 \* 4 .* pair ids are int32"):
        triton_moe.moe_forward_op(x, meta, tw, ti)
    assert triton_moe.moe_forward_op(x[:2**28], meta, tw[:2**28], ti[:2**28]).shape == (2**28, K)


# ----------------------------------------------------------------------------- quantize_weights
def test_quantize_weights_hardening():
    w13 = torch.randn(E, 2 * N, K)
    w2 = torch.randn(E, K, N)
    with pytest.raises(TypeError, match="w13 must have dtype"):
        triton_moe.quantize_weights(w13.to(torch.int8), w2, **QUANT)
    with pytest.raises(TypeError, match="w2 must be a torch.Tensor"):
        triton_moe.quantize_weights(w13, w2.numpy(), **QUANT)
    with pytest.raises(ValueError, match="w2 must be on cpu"):
        triton_moe.quantize_weights(w13, w2.to("meta"), **QUANT)
    with pytest.raises(ValueError, match="w2 must have shape"):
        triton_moe.quantize_weights(w13, w2[1:], **QUANT)
    with pytest.raises(ValueError, match="hidden size K=96 must be a multiple of block_k=64"):
        triton_moe.quantize_weights(torch.randn(E, 2 * N, 96), torch.randn(E, 96, N), **QUANT)
    with pytest.raises(ValueError, match=r"w13.shape\[1\] must be 2\*N"):
        triton_moe.quantize_weights(torch.randn(E, 2 * N + 1, K), w2, **QUANT)
    for name, bad_value in (("w13", float("nan")), ("w2", float("inf"))):
        w13_bad, w2_bad = w13.clone(), w2.clone()
        (w13_bad if name == "w13" else w2_bad)[1, 2, 3] = bad_value
        with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
            triton_moe.quantize_weights(w13_bad, w2_bad, **QUANT)
    # Non-contiguous (e.g. a transposed checkpoint) is fine: same weights as contiguous.
    w13_t = w13.transpose(1, 2).contiguous().transpose(1, 2)
    a = triton_moe.quantize_weights(w13_t, w2, **QUANT)
    b = triton_moe.quantize_weights(w13, w2, **QUANT)
    assert torch.equal(a.w13_q, b.w13_q) and torch.equal(a.w13_qscale, b.w13_qscale)
    # On meta: shapes only (for the op's shape inference).
    meta = triton_moe.quantize_weights(w13.to("meta"), w2.to("meta"), **QUANT)
    assert meta.w13_q.device.type == "meta" and meta.w13_q.shape == (E, 2 * N, K)


# ----------------------------------------------------------------------------- route
def test_route_hardening():
    logits = torch.randn(6, E)
    with pytest.raises(TypeError, match="router_logits must have dtype"):
        triton_moe.route(logits.long(), 2)
    with pytest.raises(ValueError, match="router_logits must be 2-D"):
        triton_moe.route(logits[0], 2)
    with pytest.raises(ValueError, match="router_logits must be contiguous"):
        triton_moe.route(logits.t().contiguous().t(), 2)
    with pytest.raises(ValueError, match="router_logits is on meta"):
        triton_moe.route(logits.to("meta"), 2)
    with pytest.raises(ValueError, match="top_k=5 exceeds the number of experts E=4"):
        triton_moe.route(logits, 5)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        triton_moe.route(logits, 0)
    with pytest.raises(ValueError, match="correction_bias must be on cpu"):
        triton_moe.route(logits, 2, scoring="sigmoid", correction_bias=torch.zeros(E, device="meta"))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_edge_cases(backend, scoring, device):
    empty_w, empty_i = triton_moe.route(torch.empty(0, E, device=device), 2, scoring=scoring,
                                        backend=backend)
    assert empty_w.shape == empty_i.shape == (0, 2)
    # k == E, one token
    _, one_i = triton_moe.route(torch.randn(1, E, device=device), E, scoring=scoring,
                                    backend=backend)
    assert sorted(one_i[0].tolist()) == list(range(E))
    # Non-finite logits: no crash, ids stay in range, other rows are unaffected.
    logits = torch.randn(8, E, generator=torch.Generator().manual_seed(0)).to(device)
    clean_w, clean_i = triton_moe.route(logits, 2, scoring=scoring, backend=backend)
    bad = logits.clone()
    bad[2, 1] = float("nan")
    bad[5, :] = float("inf")
    bad[6, 3] = float("-inf")
    w, ids = triton_moe.route(bad, 2, scoring=scoring, backend=backend)
    assert ((ids >= 0) & (ids < E)).all()
    others = torch.tensor([0, 1, 3, 4, 7], device=device)
    assert torch.equal(ids[others], clean_i[others]) and torch.equal(w[others], clean_w[others])


# ----------------------------------------------------------------------------- fused_moe
def test_fused_moe_hardening(cpu_weights):
    x, _, _ = _batch(6, "cpu")
    logits = torch.randn(6, E)
    with pytest.raises(ValueError, match="router_logits must be on cpu"):
        triton_moe.fused_moe(x, cpu_weights, logits.to("meta"), 2)
    with pytest.raises(ValueError, match="router_logits has 5 rows"):
        triton_moe.fused_moe(x, cpu_weights, logits[:5], 2)
    with pytest.raises(ValueError, match="top_k=5 exceeds"):
        triton_moe.fused_moe(x, cpu_weights, logits, 5)
    with pytest.raises(TypeError, match="hidden_states must have dtype"):
        triton_moe.fused_moe(x.double(), cpu_weights, logits, 2, backend="torch")
    with pytest.raises(ValueError, match="hidden_states must start at a 16-byte aligned"):
        triton_moe.fused_moe(_misaligned(x), cpu_weights, logits, 2, backend="torch")


# ----------------------------------------------------------------------------- fused_experts
def test_fused_experts_argument_errors(cpu_weights):
    w = cpu_weights
    x, tw, ti = _batch(6, "cpu")
    scales = dict(w1_scale=(w.w13_qscale, w.w13_fscale), w2_scale=(w.w2_qscale, w.w2_fscale))
    fe = triton_moe.fused_experts
    with pytest.raises(NotImplementedError, match="activation='gelu' is not implemented"):
        fe(x, w, None, tw, ti, activation="gelu")
    for flag in ("use_fp8_w8a8", "use_int8_w8a16", "use_int4_w4a16", "per_channel_quant"):
        with pytest.raises(NotImplementedError, match=f"{flag}=True is not implemented"):
            fe(x, w, None, tw, ti, **{flag: True})
    with pytest.raises(NotImplementedError, match="a1_scale is not supported"):
        fe(x, w, None, tw, ti, a1_scale=torch.ones(1))
    with pytest.raises(ValueError, match="pass w2=None"):
        fe(x, w, w.w2_q, tw, ti)
    with pytest.raises(TypeError, match="w1 must be int8"):
        fe(x, torch.randn(E, 2 * N, K), w.w2_q, tw, ti, **scales)
    with pytest.raises(ValueError, match="int8 w1/w2 need their scales"):
        fe(x, w.w13_q, w.w2_q, tw, ti)
    with pytest.raises(TypeError, match="w1_scale must be the pair"):
        fe(x, w.w13_q, w.w2_q, tw, ti, w1_scale=torch.ones(E, 4, 2), w2_scale=scales["w2_scale"])
    with pytest.raises(ValueError, match=r"block_shape=\[64, 64\] must be \[block_n, block_k\]"):
        fe(x, w, None, tw, ti, block_shape=[64, 64])
    with pytest.raises(ValueError, match="block_shape must be"):
        fe(x, w, None, tw, ti, block_shape=[64])
    with pytest.raises(TypeError, match="quant_config must be a triton_moe.QuantConfig"):
        fe(x, w.w13_q, w.w2_q, tw, ti, quant_config={"block_k": 64}, **scales)
    with pytest.raises(ValueError, match="w1/w2: intermediate size N=64 must be a positive "
                                         "multiple of block_k=128"):
        fe(x, w.w13_q, w.w2_q, tw, ti, **scales)  # the default config is not the weights'
    with pytest.raises(ValueError, match=r"w1_scale\[1\] must have shape \(4, 4, 2\)"):
        fe(x, w.w13_q, w.w2_q, tw, ti, **scales,
           quant_config=triton_moe.QuantConfig.create(**QUANT, super_group_size=1))
    with pytest.raises(ValueError, match="global_num_experts=8 but w1 holds"):
        fe(x, w, None, tw, ti, global_num_experts=8)
    with pytest.raises(ValueError, match="global_num_experts=4 but expert_map has 8"):
        fe(x, w, None, tw, ti, global_num_experts=4,
           expert_map=torch.tensor([0, 1, 2, 3, -1, -1, -1, -1], dtype=torch.int32))
    with pytest.raises(ValueError, match="apply_router_weight_on_input=True needs top_k == 1"):
        fe(x, w, None, tw, ti, apply_router_weight_on_input=True)
    with pytest.raises(TypeError, match="inplace must be a bool"):
        fe(x, w, None, tw, ti, inplace="yes")


def test_fused_experts_semantics(cpu_weights):
    """inplace, block_shape, global_num_experts, expert_map and apply_router_weight_on_input
    mean what they mean in vLLM (torch backend: exact and fast)."""
    w = cpu_weights
    x, tw, ti = _batch(9, "cpu")
    expected = triton_moe.moe_forward(x, w, tw, ti, backend="torch")
    out = triton_moe.fused_experts(x, w, None, tw, ti, backend="torch", block_shape=[32, 64],
                                   global_num_experts=E, use_int8_w8a8=True)
    assert torch.equal(out, expected) and out.data_ptr() != x.data_ptr()
    out = _fused_experts_tensors(x, w, tw.bfloat16(), ti.long(), backend="torch")
    assert torch.equal(out, triton_moe.moe_forward(x, w, tw.bfloat16().float(), ti,
                                                   backend="torch"))
    buffer = x.clone()
    result = triton_moe.fused_experts(buffer, w, None, tw, ti, inplace=True, backend="torch")
    assert result.data_ptr() == buffer.data_ptr() and torch.equal(buffer, expected)
    # Expert parallelism: 8 global experts, the odd ones live here.
    expert_map = torch.tensor([-1, 0, -1, 1, -1, 2, -1, 3], dtype=torch.int32)
    ti_global = torch.stack([ti[:, 0] * 2 + 1, ti[:, 1] * 2], 1).to(torch.int32)
    out = triton_moe.fused_experts(x, w, None, tw, ti_global, expert_map=expert_map,
                                   global_num_experts=8, backend="torch")
    assert torch.equal(out, triton_moe.moe_forward(x, w, tw, ti_global, expert_map=expert_map,
                                                   backend="torch"))
    # Router weight on the input (top_k = 1): silu-gating is not linear, so this differs
    # from weighting the output, and equals the forward of the scaled tokens.
    tw1, ti1 = tw[:, :1].contiguous(), ti[:, :1].contiguous()
    scaled = (x.float() * tw1).to(x.dtype)
    out = triton_moe.fused_experts(x, w, None, tw1, ti1, apply_router_weight_on_input=True,
                                   backend="torch")
    assert torch.equal(out, triton_moe.moe_forward(scaled, w, torch.ones_like(tw1), ti1,
                                                   backend="torch"))


# ----------------------------------------------------------------------------- edge shapes
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_empty_batch(entry, device):
    weights = _weights(device)
    x, tw, ti = _batch(0, device)
    out = ENTRY_POINTS[entry](x, weights, tw, ti, backend="triton")
    assert out.shape == (0, K) and out.dtype == x.dtype
    assert triton_moe.fused_moe(x, weights, torch.empty(0, E, device=device), 2,
                                backend="triton").shape == (0, K)


def test_one_token_on_every_expert(device):
    """M = 1 with top_k = E: every expert holds exactly one row."""
    weights = _weights(device)
    x, tw, ti = _batch(1, device, top_k=E)
    out = triton_moe.moe_forward_op(x, weights, tw, ti, backend="triton")
    ref = triton_moe.moe_forward(x, weights, tw, ti, backend="torch")
    assert torch.isfinite(out).all() and _rel_l2(out, ref) < TOLERANCE


def test_every_token_on_one_expert(device):
    """All pairs on the last expert, the others empty (through fused_experts, vLLM form,
    int64 ids)."""
    weights = _weights(device)
    x, tw, _ = _batch(12, device, top_k=1)
    ti = torch.full((12, 1), E - 1, dtype=torch.int64, device=device)
    out = _fused_experts_tensors(x, weights, tw, ti, backend="triton")
    ref = triton_moe.moe_forward(x, weights, tw, ti, backend="torch")
    assert torch.isfinite(out).all() and _rel_l2(out, ref) < TOLERANCE


def test_unchecked_bad_ids_poison_their_token_through_op(device):
    """check_ids=False passes through the op: an out-of-range id makes its token NaN and
    leaves the others as they were (per-token scales: dropping a pair cannot move another
    row's scale block). The torch backend keeps it fast; tests/test_forward.py runs the
    same check on the Triton kernels."""
    weights = _weights(device, act_block_m=1)
    x, tw, ti = _batch(8, device)
    good = triton_moe.moe_forward(x, weights, tw, ti, backend="torch")
    bad = ti.clone()
    bad[2, 0], bad[5, 1] = E + 100, -1
    out = triton_moe.moe_forward_op(x, weights, tw, bad, backend="torch", check_ids=False)
    poisoned = torch.zeros(8, dtype=torch.bool, device=device)
    poisoned[[2, 5]] = True
    assert torch.isnan(out[poisoned]).all() and torch.equal(out[~poisoned], good[~poisoned])


# ----------------------------------------------------------------------------- non-finite
def _tokens_sharing_a_scale_block(topk_ids, bad_tokens, act_block_m):
    """Tokens with a pair in the same activation scale block (expert, block of act_block_m
    rows counted from the expert's segment start) as a pair of a bad token."""
    top_k = topk_ids.shape[1]
    perm = ref_permute.permute(topk_ids.cpu(), E, act_block_m=act_block_m)
    rows = perm.pair_to_row.long()
    local = ref_permute.local_expert_ids(topk_ids.cpu(), E).reshape(-1).long()
    block = (rows - perm.expert_offsets.long()[local]) // act_block_m
    keys = local * (rows.numel() + 1) + block
    bad_keys = {int(keys[t * top_k + j]) for t in bad_tokens for j in range(top_k)}
    hit = torch.tensor([int(key) in bad_keys for key in keys]).reshape(-1, top_k).any(1)
    return hit



def _clean_output(weights, backend, num_tokens, device):
    key = (backend, weights.config.act_block_m, num_tokens, device)
    if key not in _CLEAN_OUTPUTS:
        x, tw, ti = _batch(num_tokens, device, seed=4)
        _CLEAN_OUTPUTS[key] = triton_moe.moe_forward(x, weights, tw, ti, backend=backend)
    return _CLEAN_OUTPUTS[key]


_CLEAN_OUTPUTS = {}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: NaN -> int casts
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("act_block_m", [4, 1])
@pytest.mark.parametrize("bad_value", ["inf", "nan"])
def test_non_finite_activations_poison_only_their_scale_block(bad_value, act_block_m, backend,
                                                              device, request):
    """The documented NaN/Inf policy: a token with NaN or Inf activations makes non-finite
    the whole output of every token sharing an activation scale block with it (tile-wise
    scales: act_block_m rows of one expert's segment; per-token: itself only); every other
    token's output is bit-identical to the clean run. No crash, no hang."""
    weights = _weights(device, act_block_m=act_block_m)
    num_tokens = 16 if act_block_m > 1 else 6
    clean = _clean_output(weights, backend, num_tokens, device)
    x, tw, ti = _batch(num_tokens, device, seed=4)
    bad_tokens = (3, num_tokens - 2)
    x_bad = x.clone()
    x_bad[bad_tokens[0], 5] = float(bad_value)
    x_bad[bad_tokens[1], 100] = float(bad_value)
    out = triton_moe.moe_forward(x_bad, weights, tw, ti, backend=backend)
    resolved = resolve_act_block_m(act_block_m, num_tokens * TOP_K, E)
    hit = _tokens_sharing_a_scale_block(ti, bad_tokens, resolved).to(device)
    if act_block_m == 1:
        assert hit.nonzero().flatten().tolist() == list(bad_tokens)
    else:
        assert 2 < int(hit.sum()) < num_tokens  # the test separates the two sets
    assert not torch.isfinite(out[hit]).any(), "a token of a poisoned block kept finite values"
    assert torch.equal(out[~hit], clean[~hit]), "a token outside the poisoned blocks changed"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_router_weight_poisons_only_its_token(backend, device):
    weights = _shared_weights(device)
    x, tw, ti = _batch(8, device)
    clean = triton_moe.moe_forward(x, weights, tw, ti, backend=backend)
    tw_bad = tw.clone()
    tw_bad[4, 1] = float("nan")
    out = triton_moe.moe_forward(x, weights, tw_bad, ti, backend=backend)
    assert torch.isnan(out[4]).all()
    keep = torch.arange(8, device=device) != 4
    assert torch.equal(out[keep], clean[keep])


# ----------------------------------------------------------------------------- GPU tier
@pytest.mark.gpu
def test_gpu_device_mixing_is_rejected():
    weights = _weights("cuda")
    x, tw, ti = _batch(6, "cuda")
    cpu_weights = _weights("cpu")
    for entry in ENTRY_POINTS.values():
        with pytest.raises(ValueError, match="hidden_states must be on cpu"):
            entry(x, cpu_weights, tw.cpu(), ti.cpu())
        with pytest.raises(ValueError, match="topk_ids must be on cuda"):
            entry(x, weights, tw, ti.cpu())
        with pytest.raises(ValueError, match=r"(weights\.w2_fscale|w2_scale\[1\]) must be on cuda"):
            entry(x, _replace(weights, w2_fscale=weights.w2_fscale.cpu()), tw, ti)
    with pytest.raises(ValueError, match="router_logits must be on cuda"):
        triton_moe.fused_moe(x, weights, torch.randn(6, E), 2)
    with pytest.raises(ValueError, match="w2 must be on cuda"):
        triton_moe.quantize_weights(torch.randn(E, 2 * N, K, device="cuda"),
                                    torch.randn(E, K, N), **QUANT)


@pytest.mark.gpu
def test_gpu_concurrent_streams_give_correct_results():
    """Two CUDA streams run forwards on different batches at the same time (interleaved
    launches, kernels overlap); each result equals the serial one bit for bit."""
    gen = torch.Generator().manual_seed(0)
    hidden, inter, experts = 2048, 512, 64
    weights = triton_moe.quantize_weights(
        (torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.02).cuda(),
        (torch.randn(experts, hidden, inter, generator=gen) * 0.02).cuda())
    batches = []
    for num_tokens in (1536, 700):
        x = torch.randn(num_tokens, hidden, generator=gen).bfloat16().cuda()
        logits = torch.randn(num_tokens, experts, generator=gen).cuda()
        batches.append((x, logits))
    serial = [triton_moe.fused_moe(x, weights, logits, 8) for x, logits in batches]
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    results = [[], []]
    for _ in range(8):
        for i, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                x, logits = batches[i]
                results[i].append(triton_moe.fused_moe(x, weights, logits, 8))
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for i in range(2):
        for out in results[i]:
            assert torch.equal(out, serial[i])


@pytest.mark.gpu
def test_gpu_operand_offsets_beyond_int32():
    """P * K > 2**31: the GEMM1 A operand (a_q [P, K] int8), GEMM2's output and the
    un-permute's input (mm2 [P, K] bf16, > 2**32 bytes) are indexed past 2**31 elements,
    so an int32 row * stride product would wrap. The rows of the last experts sit at the
    end of the permuted order, past row 2**31 / K; tokens routed there are checked against
    the reference on a small batch of their own (per-token scales make a token's result
    independent of the batch around it). About 12 GB of GPU memory."""
    hidden, inter, experts, top_k = 2048, 512, 64, 8
    num_tokens = 2**31 // (hidden * top_k) + 16384   # P = 1,179,648 pairs
    num_pairs = num_tokens * top_k
    assert num_pairs * hidden > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = triton_moe.quantize_weights(
        torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) * 0.02,
        torch.randn(experts, hidden, inter, device="cuda", generator=gen) * 0.02,
        act_block_m=1)
    x = torch.randn(num_tokens, hidden, device="cuda", generator=gen).bfloat16()
    logits = torch.randn(num_tokens, experts, device="cuda", generator=gen)
    tw, ti = triton_moe.route(logits, top_k)
    out = triton_moe.moe_forward(x, weights, tw, ti)
    assert torch.isfinite(out).all()
    counts = torch.bincount(ti.flatten().long(), minlength=experts)
    last_start = int(counts[:-1].sum())          # first permuted row of the last expert
    assert last_start * hidden > 2**31, "the last expert's rows must lie past 2**31 elements"
    on_last = (ti == experts - 1).any(1).nonzero().flatten()
    check = torch.cat([on_last[:48], on_last[-48:], torch.arange(16, device="cuda")])
    ref = triton_moe.moe_forward(x[check], weights, tw[check], ti[check], backend="torch")
    assert _rel_l2(out[check], ref) < TOLERANCE
    del out
    torch.cuda.empty_cache()
