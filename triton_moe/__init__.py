"""INT8 hybrid-blockwise Mixture-of-Experts forward pass in Triton.

Public API::

    weights = quantize_weights(w13, w2)                      # once, offline
    topk_weights, topk_ids = route(router_logits, top_k)     # SPEC 2
    y = moe_forward(hidden_states, weights, topk_weights, topk_ids)
    y = fused_moe(hidden_states, weights, router_logits, top_k)   # route + forward
    y = fused_experts(hidden_states, weights, None, topk_weights, topk_ids)  # vLLM names

``torch.ops.triton_moe.moe_forward`` (``triton_moe.ops``) is the forward as a custom op:
``moe_forward`` goes through it under ``torch.compile`` (no graph break).

The backend is chosen by ``backend=`` or ``$TRITON_MOE_BACKEND`` (triton, cutlass, torch).
"""
from triton_moe import ops  # registers torch.ops.triton_moe.moe_forward
from triton_moe.api import QuantizedMoEWeights, fused_moe, moe_forward, quantize_weights, route
from triton_moe.backends import BACKENDS, BackendUnavailableError, available_backends
from triton_moe.config import QuantConfig
from triton_moe.ops import moe_forward_op
from triton_moe.serving import fused_experts

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "QuantConfig",
    "QuantizedMoEWeights",
    "available_backends",
    "fused_experts",
    "fused_moe",
    "moe_forward",
    "moe_forward_op",
    "ops",
    "quantize_weights",
    "route",
]
