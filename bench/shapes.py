"""Workloads: the MoE layer shapes the benchmark knows by name (SPEC 8), and their cost model.

A workload fixes the layer (hidden size K, intermediate size N, experts E, top_k, routing)
and the batch (M tokens). Operation and byte counts are the ones the report divides by:

    ops   = 2*P*K*2N + 2*P*N*K                       P = M * top_k (token, expert) pairs
    bytes = weight bytes of the experts actually hit + activations in and out
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Workload:
    """One MoE layer shape and batch size."""

    name: str
    num_tokens: int  # M
    hidden: int  # K
    intermediate: int  # N (per expert; w13 holds 2N rows)
    num_experts: int  # E
    top_k: int
    # keyword options for triton_moe.route (SPEC 2); correction_bias is drawn at random
    # when `correction_bias` is set, as DeepSeek-V3 has one
    routing: dict = field(default_factory=dict)
    correction_bias: bool = False

    @property
    def pairs(self) -> int:
        return self.num_tokens * self.top_k

    def with_tokens(self, num_tokens: int) -> "Workload":
        return dataclasses.replace(self, num_tokens=num_tokens)

    def describe(self) -> str:
        return (f"{self.name}: M={self.num_tokens} K={self.hidden} N={self.intermediate} "
                f"E={self.num_experts} top_k={self.top_k}")


_SOFTMAX = {"scoring": "softmax", "renormalize": True}
# DeepSeek-V3: sigmoid scores, 8 expert groups, keep the 4 best groups, weights x 2.5
_DEEPSEEK_ROUTING = {"scoring": "sigmoid", "renormalize": True, "num_expert_group": 8,
                     "topk_group": 4, "routed_scaling_factor": 2.5}

PRESETS: dict[str, Workload] = {
    "35B-A3B": Workload("35B-A3B", 8192, 2048, 512, 256, 8, dict(_SOFTMAX)),
    "qwen3-30b-a3b": Workload("qwen3-30b-a3b", 8192, 2048, 768, 128, 8, dict(_SOFTMAX)),
    "mixtral-8x7b": Workload("mixtral-8x7b", 8192, 4096, 14336, 8, 2, dict(_SOFTMAX)),
    "deepseek-v3": Workload("deepseek-v3", 8192, 7168, 2048, 256, 8, dict(_DEEPSEEK_ROUTING),
                            correction_bias=True),
    # the no-GPU demo: small enough for the Triton interpreter on 2 CPU cores
    "demo": Workload("demo", 16, 256, 128, 8, 2, dict(_SOFTMAX)),
}
DEFAULT_GPU_SHAPE = "35B-A3B"
DEFAULT_CPU_SHAPE = "demo"

# above this many int8 ops the Triton interpreter takes minutes: refused without a GPU
CPU_MAX_OPS = 2e9


def forward_ops(workload: Workload) -> int:
    """Multiply-adds x 2 of both grouped GEMMs: 2*P*K*2N + 2*P*N*K."""
    pairs, hidden, inter = workload.pairs, workload.hidden, workload.intermediate
    return 2 * pairs * hidden * 2 * inter + 2 * pairs * inter * hidden


def forward_bytes(workload: Workload, experts_hit: int, weight_bytes_per_expert: float,
                  act_bytes: int) -> float:
    """Bytes a forward must move at least: weights of the experts hit, activations in and out,
    and the routing (topk ids int32 + topk weights fp32)."""
    activations = 2 * workload.num_tokens * workload.hidden * act_bytes
    routing = workload.pairs * 8
    return experts_hit * weight_bytes_per_expert + activations + routing
