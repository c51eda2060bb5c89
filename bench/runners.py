"""What the benchmark runs: the layer's weights, the rotated inputs, the fp32 truth, and one
`Runner` per backend, all on the same tensors.

Backend names (for --backends):
    triton, cutlass, torch   triton_moe.moe_forward with that backend (INT8 hybrid blockwise)
    bf16                     unquantized grouped-GEMM MoE in the activation dtype
                             (bench.baselines.grouped_mm_moe); the speedup reference
    vllm, sglang             the frameworks' unquantized fused MoE, when importable
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from bench import baselines
from bench.shapes import Workload

LIBRARY_BACKENDS = ("triton", "cutlass", "torch")
BASELINE = "bf16"
PEERS = ("vllm", "sglang")
ALL_BACKENDS = (BASELINE,) + LIBRARY_BACKENDS + PEERS
# run order: the baseline first (speedups need it), the slow reference path last
RUN_ORDER = (BASELINE, "triton", "cutlass") + PEERS + ("torch",)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

StageCallback = Optional[Callable[[str], None]]


@dataclass
class Layer:
    """The MoE layer's weights, shared by every backend and every batch size of a sweep."""

    workload: Workload  # num_tokens is not used
    dtype: torch.dtype
    w13: torch.Tensor  # [E, 2N, K]
    w2: torch.Tensor  # [E, K, N]
    correction_bias: Optional[torch.Tensor]  # [E] fp32 or None
    quant_options: dict
    _qweights: object = None

    def qweights(self):
        """triton_moe.quantize_weights of (w13, w2), made on first use."""
        if self._qweights is None:
            import triton_moe
            self._qweights = triton_moe.quantize_weights(self.w13, self.w2, **self.quant_options)
        return self._qweights


def layer_key(workload: Workload, dtype: torch.dtype) -> tuple:
    return (workload.name, workload.hidden, workload.intermediate, workload.num_experts,
            workload.top_k, dtype)


def make_layer(workload: Workload, dtype: torch.dtype, device, quant_options: dict,
               seed: int = 0) -> Layer:
    """Gaussian weights scaled by 1/sqrt(fan-in), so activations keep unit scale."""
    gen = torch.Generator(device=device).manual_seed(seed)
    experts, hidden, inter = workload.num_experts, workload.hidden, workload.intermediate
    w13 = torch.randn(experts, 2 * inter, hidden, device=device, dtype=dtype, generator=gen)
    w13.mul_(hidden ** -0.5)
    w2 = torch.randn(experts, hidden, inter, device=device, dtype=dtype, generator=gen)
    w2.mul_(inter ** -0.5)
    bias = None
    if workload.correction_bias:
        bias = 0.1 * torch.randn(experts, device=device, dtype=torch.float32, generator=gen)
    return Layer(workload, dtype, w13, w2, bias, dict(quant_options))


@dataclass
class Inputs:
    """`copies` independent batches (hidden states and their routing), rotated while timing
    so that no call finds the previous call's activations or expert weights in L2."""

    hidden: list[torch.Tensor]  # [M, K] each
    topk_weights: list[torch.Tensor]  # fp32 [M, top_k]
    topk_ids: list[torch.Tensor]  # int32 [M, top_k]
    experts_hit: float = 0.0  # distinct experts per batch, averaged over the copies

    @property
    def copies(self) -> int:
        return len(self.hidden)


def make_inputs(workload: Workload, layer: Layer, copies: int, device, seed: int = 1) -> Inputs:
    import triton_moe
    gen = torch.Generator(device=device).manual_seed(seed + 7919 * workload.num_tokens)
    routing = dict(workload.routing)
    if layer.correction_bias is not None:
        routing["correction_bias"] = layer.correction_bias
    inputs = Inputs([], [], [])
    for _ in range(copies):
        hidden = torch.randn(workload.num_tokens, workload.hidden, device=device,
                             dtype=layer.dtype, generator=gen)
        logits = torch.randn(workload.num_tokens, workload.num_experts, device=device,
                             dtype=torch.float32, generator=gen)
        topk_weights, topk_ids = triton_moe.route(logits, workload.top_k, **routing)
        inputs.hidden.append(hidden)
        inputs.topk_weights.append(topk_weights)
        inputs.topk_ids.append(topk_ids)
    # host sync: outside any timed region
    hits = [int(torch.unique(ids).numel()) for ids in inputs.topk_ids]
    inputs.experts_hit = sum(hits) / len(hits)
    return inputs


def auto_copies(workload: Workload, act_bytes: int, l2_bytes: int) -> int:
    """Enough copies that one rotation moves >= 4x the L2 size, between 2 and 16, and no
    more than 2 GiB of hidden states."""
    experts_hit = workload.num_experts * (1 - (1 - workload.top_k / workload.num_experts)
                                          ** workload.num_tokens)
    int8_weights = experts_hit * 3 * workload.intermediate * workload.hidden
    hidden_bytes = workload.num_tokens * workload.hidden * act_bytes
    per_call = int8_weights + 2 * hidden_bytes
    copies = max(2, min(16, math.ceil(4 * l2_bytes / max(per_call, 1))))
    return max(1, min(copies, (2 << 30) // max(hidden_bytes, 1)))


def reference_output(layer: Layer, hidden: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor) -> torch.Tensor:
    """fp32 truth (reference.moe.moe_float; it converts one expert at a time to fp32)."""
    from reference.moe import moe_float
    return moe_float(hidden, layer.w13, layer.w2, topk_weights, topk_ids)


def relative_error(out: torch.Tensor, truth: torch.Tensor) -> float:
    """||out - truth||_2 / ||truth||_2 over the rows of `truth`, in fp64."""
    rows = truth.shape[0]
    diff = out[:rows].double() - truth.double()
    return float(diff.norm() / truth.double().norm().clamp_min(1e-300))


@dataclass
class Runner:
    """One backend, ready to run on copy i of the inputs."""

    name: str
    run: Callable[[int, StageCallback], torch.Tensor]
    int8: bool  # compared with the int8 ceiling, else the bf16 one
    weight_bytes_per_expert: float
    graph_hint: Optional[str] = None  # None: try CUDA-graph capture; else why not
    stages: bool = False  # calls stage_callback
    note: str = ""


def _bytes_per_expert(weights, num_experts: int) -> float:
    """Bytes of every tensor field with a leading expert dim, per expert."""
    if dataclasses.is_dataclass(weights):
        values = [getattr(weights, f.name) for f in dataclasses.fields(weights)]
    else:
        values = list(vars(weights).values())
    total = sum(v.numel() * v.element_size() for v in values
                if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == num_experts)
    return total / num_experts


def make_runner(name: str, layer: Layer, inputs: Inputs) -> Runner:
    """Build the runner for backend `name`; raises with the reason when it cannot run."""
    experts = layer.workload.num_experts
    dense_bytes = (layer.w13[0].numel() + layer.w2[0].numel()) * layer.w13.element_size()
    if name in LIBRARY_BACKENDS:
        import triton_moe
        qweights = layer.qweights()

        def run(i, callback=None):
            return triton_moe.moe_forward(inputs.hidden[i], qweights, inputs.topk_weights[i],
                                          inputs.topk_ids[i], backend=name,
                                          stage_callback=callback)

        # the torch backend is the exact oracle: it loops over experts on the host
        hint = "the torch backend syncs the host" if name == "torch" else None
        from triton_moe.decode import DECODE_CONFIG
        note = ("small-batch path off (--no-decode-path)"
                if name == "triton" and DECODE_CONFIG["max_pairs"] == 0 else "")
        return Runner(name, run, int8=True,
                      weight_bytes_per_expert=_bytes_per_expert(qweights, experts),
                      graph_hint=hint, stages=name != "torch", note=note)
    if name == BASELINE:
        device = layer.w13.device
        why_not = baselines.probe_grouped_mm(device, layer.dtype)
        use_grouped = why_not is None
        note = "torch._grouped_mm" if use_grouped else f"per-expert loop ({why_not})"

        def run(i, callback=None):
            return baselines.grouped_mm_moe(inputs.hidden[i], layer.w13, layer.w2,
                                            inputs.topk_weights[i], inputs.topk_ids[i],
                                            use_grouped_mm=use_grouped)

        hint = None if use_grouped else "the per-expert loop reads offsets on the host"
        return Runner(name, run, int8=False, weight_bytes_per_expert=dense_bytes,
                      graph_hint=hint, note=note)
    if name in PEERS:
        why_not = baselines.peer_unavailable(name)
        if why_not:
            raise RuntimeError(why_not)
        forward = baselines.make_peer(name)

        def run(i, callback=None):
            return forward(inputs.hidden[i], layer.w13, layer.w2, inputs.topk_weights[i],
                           inputs.topk_ids[i])

        return Runner(name, run, int8=False, weight_bytes_per_expert=dense_bytes,
                      note=f"{name} fused_experts, unquantized")
    raise ValueError(f"unknown backend {name!r}")
