"""The forward as a PyTorch custom operator, for ``torch.compile`` and graph capture.

``torch.ops.triton_moe.moe_forward`` is registered through ``torch.library.custom_op``::

    triton_moe::moe_forward(Tensor hidden_states, Tensor w13_q, Tensor w13_qscale,
        Tensor w13_fscale, Tensor w2_q, Tensor w2_qscale, Tensor w2_fscale,
        Tensor topk_weights, Tensor topk_ids, Tensor? expert_map, SymInt block_n,
        SymInt block_k, SymInt q_max, SymInt super_group_size, str scale_rounding,
        SymInt act_block_m, str? backend=None, bool? check_ids=None) -> Tensor

Its real implementation is :func:`triton_moe.moe_forward` (same validation, same
backends); its fake implementation checks every shape, dtype and device without reading
a value and returns an empty tensor shaped like ``hidden_states``, so ``torch.compile``
(``fullgraph=True`` included) and ``torch.export`` trace one opaque node instead of
breaking the graph on Triton launches. ``triton_moe.moe_forward`` itself routes through
the op while compiling, so compiled code needs no change; :func:`moe_forward_op` is the
same call spelled explicitly. ``act_block_m = 0`` means ``"auto"`` (resolved from the
real shapes inside the op). The op allocates its output and mutates nothing; nothing in
it syncs the host on CUDA (unless ``check_ids=True``), so a CUDA graph can capture it.
The op is not differentiable (inference only).

Called on meta tensors, the op runs its fake implementation: shape inference only.
"""
from __future__ import annotations

from typing import Optional

import torch

from triton_moe import api
from triton_moe.backends import resolve_backend
from triton_moe.config import QuantConfig

OP_NAME = "triton_moe::moe_forward"
AUTO_ACT_BLOCK_M = 0  # act_block_m value that stands for QuantConfig's "auto"


def _weights_from_tensors(w13_q, w13_qscale, w13_fscale, w2_q, w2_qscale, w2_fscale,
                          block_n, block_k, q_max, super_group_size, scale_rounding,
                          act_block_m) -> api.QuantizedMoEWeights:
    """Rebuild QuantizedMoEWeights from the op's flat arguments (validating the config).

    The int32-overflow decision was taken when the weights were quantized, so any
    ``super_group_size`` is accepted here."""
    if act_block_m == AUTO_ACT_BLOCK_M:
        act_block_m = "auto"
    config = QuantConfig.create(block_k=int(block_k), block_n=int(block_n),
                                q_max=int(q_max), super_group_size=int(super_group_size),
                                scale_rounding=scale_rounding,
                                act_block_m=act_block_m if act_block_m == "auto"
                                else int(act_block_m),
                                allow_int32_overflow=True)
    return api.QuantizedMoEWeights(w13_q, w13_qscale, w13_fscale, w2_q, w2_qscale,
                                   w2_fscale, config)


@torch.library.custom_op(OP_NAME, mutates_args=(),
                         tags=(torch.Tag.needs_fixed_stride_order,))
def moe_forward_raw(hidden_states: torch.Tensor, w13_q: torch.Tensor,
                    w13_qscale: torch.Tensor, w13_fscale: torch.Tensor, w2_q: torch.Tensor,
                    w2_qscale: torch.Tensor, w2_fscale: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    expert_map: Optional[torch.Tensor], block_n: int, block_k: int,
                    q_max: int, super_group_size: int, scale_rounding: str,
                    act_block_m: int, backend: Optional[str] = None,
                    check_ids: Optional[bool] = None) -> torch.Tensor:
    """The registered op on flat tensors (layouts: docs/design.md); see the module doc."""
    weights = _weights_from_tensors(w13_q, w13_qscale, w13_fscale, w2_q, w2_qscale,
                                    w2_fscale, block_n, block_k, q_max, super_group_size,
                                    scale_rounding, act_block_m)
    return api._moe_forward_eager(hidden_states, weights, topk_weights, topk_ids,
                                  backend=backend, expert_map=expert_map,
                                  stage_callback=None, check_ids=check_ids)


@moe_forward_raw.register_fake
def _moe_forward_fake(hidden_states, w13_q, w13_qscale, w13_fscale, w2_q, w2_qscale,
                      w2_fscale, topk_weights, topk_ids, expert_map, block_n, block_k,
                      q_max, super_group_size, scale_rounding, act_block_m, backend=None,
                      check_ids=None):
    """Shapes only: every check of the real op that needs no tensor value (so a bad
    argument fails at trace time, naming it), then an empty [M, K] output."""
    weights = _weights_from_tensors(w13_q, w13_qscale, w13_fscale, w2_q, w2_qscale,
                                    w2_fscale, block_n, block_k, q_max, super_group_size,
                                    scale_rounding, act_block_m)
    api._check_forward_inputs(hidden_states, weights, topk_weights, topk_ids, expert_map,
                              check_ids=False, allow_meta=True)
    resolve_backend(backend)  # a bad name fails now; availability is the runtime's
    return hidden_states.new_empty(hidden_states.shape)


def moe_forward_op(hidden_states: torch.Tensor, weights: api.QuantizedMoEWeights,
                   topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                   backend: str | None = None, expert_map: torch.Tensor | None = None,
                   check_ids: bool | None = None) -> torch.Tensor:
    """:func:`triton_moe.moe_forward` through ``torch.ops.triton_moe.moe_forward``
    (same arguments but ``stage_callback``, same result)."""
    if not isinstance(weights, api.QuantizedMoEWeights):
        raise TypeError("weights must be the QuantizedMoEWeights returned by "
                        f"quantize_weights, got {type(weights).__name__}")
    cfg = weights.config
    act_block_m = AUTO_ACT_BLOCK_M if cfg.act_block_m == "auto" else cfg.act_block_m
    return torch.ops.triton_moe.moe_forward(
        hidden_states, weights.w13_q, weights.w13_qscale, weights.w13_fscale,
        weights.w2_q, weights.w2_qscale, weights.w2_fscale, topk_weights, topk_ids,
        expert_map, cfg.block_n, cfg.block_k, cfg.q_max, cfg.super_group_size,
        cfg.scale_rounding, act_block_m, backend, check_ids)
