"""The forward as a custom op (``torch.ops.triton_moe.moe_forward``): schema, fake
implementation, torch.compile without graph breaks, CUDA graph capture.

Interpreter tier: tiny shapes (K=128, N=64, block_k=64, block_n=32: few Triton programs),
compile with the "eager"/"aot_eager" backends. The op runs the same code as
``triton_moe.moe_forward``, so its output must equal the eager forward bit for bit; the
same holds for anything compiled around it that only passes tensors through.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import triton_moe
from triton_moe import ops

E, K, N, M, TOP_K = 4, 128, 64, 6, 2
QUANT = dict(block_k=64, block_n=32)
OP = torch.ops.triton_moe.moe_forward.default


def _weights(device, seed=0, **quant):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * N, K, generator=gen) * 0.05
    w2 = torch.randn(E, K, N, generator=gen) * 0.05
    return triton_moe.quantize_weights(w13.to(device), w2.to(device), **{**QUANT, **quant})


def _batch(num_tokens, device, seed=1, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, K, generator=gen).to(dtype)
    tw, ti = triton_moe.route(torch.randn(num_tokens, E, generator=gen), TOP_K, backend="torch")
    return x.to(device), tw.to(device), ti.to(device)


def _op_args(x, weights, tw, ti, *, expert_map=None, backend=None, check_ids=None):
    cfg = weights.config
    act_block_m = ops.AUTO_ACT_BLOCK_M if cfg.act_block_m == "auto" else cfg.act_block_m
    return (x, weights.w13_q, weights.w13_qscale, weights.w13_fscale, weights.w2_q,
            weights.w2_qscale, weights.w2_fscale, tw, ti, expert_map, cfg.block_n,
            cfg.block_k, cfg.q_max, cfg.super_group_size, cfg.scale_rounding, act_block_m,
            backend, check_ids)


class _GraphRecorder:
    """A torch.compile backend that keeps the FX graphs it is given and runs them as is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def op_calls(self):
        return [node for gm in self.graphs for node in gm.graph.nodes
                if node.op == "call_function" and node.target in (OP, torch.ops.triton_moe.moe_forward)]


# ----------------------------------------------------------------------------- registration
def test_op_schema():
    schema = str(OP._schema)
    assert schema.startswith("triton_moe::moe_forward(Tensor hidden_states, Tensor w13_q, "
                             "Tensor w13_qscale, Tensor w13_fscale, Tensor w2_q, "
                             "Tensor w2_qscale, Tensor w2_fscale, Tensor topk_weights, "
                             "Tensor topk_ids, Tensor? expert_map, ")
    assert schema.endswith("str? backend=None, bool? check_ids=None) -> Tensor")
    assert torch.Tag.needs_fixed_stride_order in OP.tags


def test_opcheck():
    """torch.library.opcheck: schema (no mutation, no aliasing), fake tensor against the
    real output, and AOT dispatch with dynamic shapes. The torch backend keeps it fast;
    the registration under test does not depend on the backend."""
    weights = _weights("cpu")
    x, tw, ti = _batch(M, "cpu")
    torch.library.opcheck(OP, _op_args(x, weights, tw, ti, backend="torch"))
    expert_map = torch.tensor([-1, 0, 1, -1, 2, 3, -1, -1], dtype=torch.int32)
    ti_global = (ti * 2 + 1).clamp(max=7).to(torch.int32)  # global ids 1, 3, 5, 7
    torch.library.opcheck(OP, _op_args(x, weights, tw, ti_global, expert_map=expert_map,
                                       backend="torch"),
                          test_utils=("test_schema", "test_faketensor"))


def test_fake_impl_in_fake_tensor_mode():
    weights = _weights("cpu")
    x, tw, ti = _batch(M, "cpu", dtype=torch.float16)
    wide_x, float_ids = torch.zeros(M, 2 * K, dtype=torch.float16), ti.float()
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                     for a in _op_args(x, weights, tw, ti)]
        out = OP(*fake_args)
        assert out.shape == (M, K) and out.dtype == torch.float16 and out.is_contiguous()
        bad = list(fake_args)
        bad[0] = mode.from_tensor(wide_x)
        with pytest.raises(ValueError, match=r"hidden_states.shape\[1\]=256 must equal"):
            OP(*bad)
        bad = list(fake_args)
        bad[8] = mode.from_tensor(float_ids)
        with pytest.raises(TypeError, match="topk_ids must have dtype"):
            OP(*bad)
        bad = list(fake_args)
        bad[16] = "numpy"
        with pytest.raises(ValueError, match="'numpy' is not a backend"):
            OP(*bad)


def test_op_on_meta_tensors_is_shape_inference():
    weights = _weights("cpu")
    meta = triton_moe.QuantizedMoEWeights(
        *[t.to("meta") for t in (weights.w13_q, weights.w13_qscale, weights.w13_fscale,
                                 weights.w2_q, weights.w2_qscale, weights.w2_fscale)],
        weights.config)
    x = torch.empty(1000, K, dtype=torch.bfloat16, device="meta")
    tw = torch.empty(1000, TOP_K, device="meta")
    ti = torch.empty(1000, TOP_K, dtype=torch.int32, device="meta")
    out = triton_moe.moe_forward_op(x, meta, tw, ti)
    assert out.device.type == "meta" and out.shape == (1000, K) and out.dtype == torch.bfloat16


def test_op_equals_moe_forward(device):
    weights = _weights(device)
    x, tw, ti = _batch(M, device)
    eager = triton_moe.moe_forward(x, weights, tw, ti, backend="triton")
    assert torch.equal(triton_moe.moe_forward_op(x, weights, tw, ti, backend="triton"), eager)


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("compile_backend", ["recorder", "aot_eager"])
def test_compile_fullgraph_matches_eager(compile_backend, device):
    """moe_forward inside a compiled function: one op node, no graph break (fullgraph),
    and the eager result."""
    weights = _weights(device)
    x, tw, ti = _batch(M, device)
    eager = triton_moe.moe_forward(x, weights, tw, ti, backend="triton")

    def layer(hidden, topk_weights, topk_ids):
        out = triton_moe.moe_forward(hidden, weights, topk_weights, topk_ids, backend="triton")
        return out, out.float() * 2.0

    recorder = _GraphRecorder()
    backend = recorder if compile_backend == "recorder" else compile_backend
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    out, doubled = compiled(x, tw, ti)
    assert torch.equal(out, eager)
    assert torch.equal(doubled, eager.float() * 2.0)
    if compile_backend == "recorder":
        assert len(recorder.graphs) == 1 and len(recorder.op_calls()) == 1


def test_compile_dynamic_shapes_and_fused_experts_inplace():
    """Dynamic M (the fake implementation on symbolic shapes) and fused_experts with
    inplace=True (a mutation of a graph input) compile with fullgraph=True and give the
    eager results (torch backend: the graph plumbing is under test here, not kernels)."""
    weights = _weights("cpu")

    def layer(hidden, topk_weights, topk_ids):
        return triton_moe.fused_experts(hidden, weights, None, topk_weights, topk_ids,
                                        inplace=True, backend="torch")

    recorder = _GraphRecorder()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True,
                             backend="aot_eager")  # the registered name: needs no submodule import
    for num_tokens, seed in ((M, 1), (11, 2)):
        x, tw, ti = _batch(num_tokens, "cpu", seed=seed)
        expected = triton_moe.moe_forward(x, weights, tw, ti, backend="torch")
        buffer = x.clone()
        result = compiled(buffer, tw, ti)
        assert torch.equal(buffer, expected) and torch.equal(result, expected)
    compiled_rec = torch.compile(
        lambda h, w_, i_: triton_moe.moe_forward(h, weights, w_, i_, backend="torch"),
        fullgraph=True, dynamic=True, backend=recorder)
    compiled_rec(*_batch(M, "cpu"))
    compiled_rec(*_batch(13, "cpu", seed=3))
    assert len(recorder.graphs) == 1, "a second M must not recompile"


def test_compile_rejects_bad_input_at_trace_time():
    weights = _weights("cpu")
    _, tw, ti = _batch(M, "cpu")
    compiled = torch.compile(lambda h: triton_moe.moe_forward(h, weights, tw, ti),
                             fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"hidden_states.shape\[1\]=256 must equal"):
        compiled(torch.zeros(M, 2 * K, dtype=torch.bfloat16))


def test_stage_callback_cannot_enter_a_graph():
    """A Python callback cannot be part of a graph: with fullgraph=True it is an error at
    trace time (without fullgraph the call runs eagerly behind a graph break)."""
    weights = _weights("cpu")
    x, tw, ti = _batch(M, "cpu")
    stages = []
    compiled = torch.compile(
        lambda h: triton_moe.moe_forward(h, weights, tw, ti, backend="torch",
                                         stage_callback=stages.append),
        fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="(?i)disable|skip|graph break"):
        compiled(x)


# ----------------------------------------------------------------------------- GPU tier
def _gpu_problem(num_tokens, seed=0, hidden=2048, inter=512, experts=64, top_k=8):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.02
    w2 = torch.randn(experts, hidden, inter, generator=gen) * 0.02
    weights = triton_moe.quantize_weights(w13.cuda(), w2.cuda())
    x = torch.randn(num_tokens, hidden, generator=gen).bfloat16().cuda()
    logits = torch.randn(num_tokens, experts, generator=gen).cuda()
    return weights, x, logits, top_k


@pytest.mark.gpu
def test_gpu_inductor_fullgraph_matches_eager():
    weights, x, logits, top_k = _gpu_problem(1024)
    tw, ti = triton_moe.route(logits, top_k)

    def layer(hidden, topk_weights, topk_ids):
        out = triton_moe.moe_forward(hidden, weights, topk_weights, topk_ids)
        return out, hidden + out

    eager_out, eager_sum = layer(x, tw, ti)
    compiled = torch.compile(layer, fullgraph=True)  # inductor
    out, summed = compiled(x, tw, ti)
    assert torch.equal(out, eager_out)
    torch.testing.assert_close(summed, eager_sum, atol=0, rtol=0)  # bf16 add: one rounding
    # a second batch size through the same compiled function (dynamic M)
    gen = torch.Generator().manual_seed(1)
    x2 = torch.randn(333, x.shape[1], generator=gen).bfloat16().cuda()
    tw2, ti2 = triton_moe.route(torch.randn(333, logits.shape[1], generator=gen).cuda(), top_k)
    out2, _ = compiled(x2, tw2, ti2)
    assert torch.equal(out2, triton_moe.moe_forward(x2, weights, tw2, ti2))


@pytest.mark.gpu
@pytest.mark.parametrize("entry", ["op", "fused_experts_inplace", "fused_moe", "compiled"])
def test_gpu_cuda_graph_capture_and_replay_with_new_inputs(entry):
    """The whole forward captured in a CUDA graph, replayed after copying new inputs into
    the same buffers (new tokens and new routing), gives the eager result bit for bit."""
    weights, x, logits, top_k = _gpu_problem(512)
    tw, ti = triton_moe.route(logits, top_k)
    compiled = torch.compile(lambda h, w_, i_: triton_moe.moe_forward(h, weights, w_, i_),
                             fullgraph=True)

    def run(hidden, router_logits, topk_weights, topk_ids):
        if entry == "op":
            return triton_moe.moe_forward_op(hidden, weights, topk_weights, topk_ids)
        if entry == "fused_experts_inplace":
            return triton_moe.fused_experts(hidden, weights, None, topk_weights, topk_ids,
                                            inplace=True)
        if entry == "fused_moe":
            return triton_moe.fused_moe(hidden, weights, router_logits, top_k)
        return compiled(hidden, topk_weights, topk_ids)

    def eager(hidden, router_logits, topk_weights, topk_ids):
        if entry == "fused_moe":
            return triton_moe.fused_moe(hidden, weights, router_logits, top_k)
        return triton_moe.moe_forward(hidden, weights, topk_weights, topk_ids)

    static = [x.clone(), logits.clone(), tw.clone(), ti.clone()]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile, autotune) outside the capture
        for _ in range(2):
            warm_inputs = [t.clone() for t in static]
            run(*warm_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(*static)
    for seed in (0, 5):
        _, x_new, logits_new, _ = _gpu_problem(512, seed=seed)
        tw_new, ti_new = triton_moe.route(logits_new, top_k)
        expected = eager(x_new, logits_new, tw_new, ti_new)
        for buf, new in zip(static, (x_new, logits_new, tw_new, ti_new)):
            buf.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, expected), f"replay with seed {seed} differs"
