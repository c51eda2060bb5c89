"""A serving-engine entry point: vLLM's ``fused_experts`` arguments, our INT8 forward.

An inference engine that calls vLLM's
``vllm.model_executor.layers.fused_moe.fused_moe.fused_experts(hidden_states, w1, w2,
topk_weights, topk_ids, inplace=..., activation=..., apply_router_weight_on_input=...,
global_num_experts=..., expert_map=..., w1_scale=..., w2_scale=..., block_shape=...)``
can call :func:`fused_experts` with the same keywords. The differences are the weights
(INT8 with two-level (Q, F) block scales, made once by ``triton_moe.quantize_weights``)
and that every argument after ``topk_ids`` is keyword-only (vLLM's positional order has
changed between releases; names have not).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from triton_moe import api
from triton_moe.config import QuantConfig

SUPPORTED_ACTIVATIONS = ("silu",)

# Messages of the weight validation name QuantizedMoEWeights fields; a caller of
# fused_experts passed them as these arguments (longest names first).
_ARGUMENT_NAMES = (
    ("weights.w13_qscale", "w1_scale[0]"), ("weights.w13_fscale", "w1_scale[1]"),
    ("weights.w2_qscale", "w2_scale[0]"), ("weights.w2_fscale", "w2_scale[1]"),
    ("weights.w13_q", "w1"), ("weights.w2_q", "w2"), ("weights: ", "w1/w2: "),
)


def _scale_pair(name: str, scale) -> tuple[torch.Tensor, torch.Tensor]:
    if (not isinstance(scale, (tuple, list)) or len(scale) != 2
            or not all(isinstance(t, torch.Tensor) for t in scale)):
        raise TypeError(
            f"{name} must be the pair (qscale int32, fscale fp32) of triton_moe's two-level "
            f"block scales (QuantizedMoEWeights.{'w13' if name == 'w1_scale' else 'w2'}_qscale, "
            f"..._fscale), got {type(scale).__name__}; a single fp32 block-scale tensor (vLLM's "
            "int8 block format) cannot be used: quantize the float weights once with "
            "triton_moe.quantize_weights")
    return scale[0], scale[1]


def _config_for(block_shape, quant_config: QuantConfig | None) -> QuantConfig:
    if quant_config is not None and not isinstance(quant_config, QuantConfig):
        raise TypeError("quant_config must be a triton_moe.QuantConfig (the one the weights "
                        f"were quantized with), got {type(quant_config).__name__}")
    if quant_config is not None:
        return quant_config
    if block_shape is None:
        return QuantConfig.create()
    return QuantConfig.create(block_n=block_shape[0], block_k=block_shape[1])


def _weights_from_arguments(w1, w2, w1_scale, w2_scale, block_shape,
                            quant_config) -> api.QuantizedMoEWeights:
    """QuantizedMoEWeights from either form of (w1, w2, scales); errors name the
    arguments of fused_experts."""
    if block_shape is not None and (
            not isinstance(block_shape, Sequence) or len(block_shape) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in block_shape)):
        raise ValueError(f"block_shape must be [block_n, block_k] (two ints), got "
                         f"{block_shape!r}")
    if isinstance(w1, api.QuantizedMoEWeights):
        if w2 is not None or w1_scale is not None or w2_scale is not None:
            raise ValueError("w1 is a QuantizedMoEWeights (it holds both layers and their "
                             "scales): pass w2=None, w1_scale=None, w2_scale=None")
        if quant_config is not None and quant_config != w1.config:
            raise ValueError(f"quant_config={quant_config} differs from the weights' "
                             f"config {w1.config}")
        weights = w1
    else:
        for name, tensor in (("w1", w1), ("w2", w2)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be an int8 torch.Tensor (or w1 a "
                                f"QuantizedMoEWeights with w2=None), got "
                                f"{type(tensor).__name__}")
            if tensor.dtype != torch.int8:
                raise TypeError(f"{name} must be int8 (quantize float weights once with "
                                f"triton_moe.quantize_weights), got {tensor.dtype}")
        if w1_scale is None or w2_scale is None:
            raise ValueError("int8 w1/w2 need their scales: w1_scale=(w13_qscale, "
                             "w13_fscale), w2_scale=(w2_qscale, w2_fscale)")
        w13_qscale, w13_fscale = _scale_pair("w1_scale", w1_scale)
        w2_qscale, w2_fscale = _scale_pair("w2_scale", w2_scale)
        weights = api.QuantizedMoEWeights(w1, w13_qscale, w13_fscale, w2, w2_qscale,
                                          w2_fscale, _config_for(block_shape, quant_config))
        try:
            api._check_weights(weights)
        except (TypeError, ValueError) as exc:
            message = str(exc)
            for field, argument in _ARGUMENT_NAMES:
                message = message.replace(field, argument)
            raise type(exc)(message) from None
    cfg = weights.config
    if block_shape is not None and list(block_shape) != [cfg.block_n, cfg.block_k]:
        raise ValueError(f"block_shape={list(block_shape)} must be [block_n, block_k] = "
                         f"{[cfg.block_n, cfg.block_k]} of the weights' quantization")
    return weights


def fused_experts(hidden_states: torch.Tensor, w1, w2, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, *, inplace: bool = False, activation: str = "silu",
                  apply_router_weight_on_input: bool = False, global_num_experts: int = -1,
                  expert_map: torch.Tensor | None = None, w1_scale=None, w2_scale=None,
                  block_shape: Sequence[int] | None = None, use_int8_w8a8: bool | None = None,
                  use_fp8_w8a8: bool = False, use_int8_w8a16: bool = False,
                  use_int4_w4a16: bool = False, per_channel_quant: bool = False,
                  w1_zp: torch.Tensor | None = None, w2_zp: torch.Tensor | None = None,
                  a1_scale: torch.Tensor | None = None, a2_scale: torch.Tensor | None = None,
                  quant_config: QuantConfig | None = None, backend: str | None = None,
                  check_ids: bool | None = None) -> torch.Tensor:
    """MoE experts on routed tokens with vLLM's ``fused_experts`` arguments (INT8 hybrid).

    ``y[t] = sum_j topk_weights[t, j] * (w2[e] @ (silu(w1[e, :N] @ x[t]) * (w1[e, N:] @ x[t])))``
    with ``e = topk_ids[t, j]``, computed as triton_moe's INT8 hybrid-blockwise forward
    (SPEC 3-7; ``triton_moe.moe_forward``).

    Args:
        hidden_states: [M, K] bf16/fp16/fp32 activations, contiguous, on the weights' device.
        w1: the gate/up projection, either a ``QuantizedMoEWeights`` from
            ``triton_moe.quantize_weights`` (then ``w2``, ``w1_scale`` and ``w2_scale`` are
            None: it holds both layers), or int8 ``[E, 2N, K]`` (``w13_q``: rows 0..N-1
            gate, N..2N-1 up, the layout of vLLM's ``w13_weight``).
        w2: int8 ``[E, K, N]`` down projection (``w2_q``), or None with a
            QuantizedMoEWeights ``w1``.
        topk_weights: [M, top_k] fp32 (bf16/fp16 accepted and widened exactly) router
            weights; topk_ids: [M, top_k] int32/int64 expert ids (global ids with
            ``expert_map``).
        inplace: write the result into ``hidden_states`` and return it (as vLLM's
            ``inplace=True``); otherwise a new tensor is returned.
        activation: "silu" (SiLU-gated: ``silu(gate) * up``). Any other value raises
            NotImplementedError naming it.
        apply_router_weight_on_input: multiply each token by its router weight before
            the first GEMM instead of weighting the expert outputs (vLLM's meaning;
            needs top_k == 1).
        global_num_experts: the number of experts of the whole model; -1 = the length of
            ``expert_map``, or E without one. Checked against both.
        expert_map: int32/int64 [global_num_experts]: global expert id -> local id in
            [0, E), or -1 for experts of another rank (those pairs contribute nothing).
        w1_scale, w2_scale: with int8 tensors, the pairs ``(w13_qscale int32
            [E, 2N/block_n, K/block_k], w13_fscale fp32 [E, 2N/block_n, SG(K)])`` and
            ``(w2_qscale int32 [E, K/block_n, N/block_k], w2_fscale fp32
            [E, K/block_n, SG(N)])`` (docs/design.md, SG(C) = ceil(C/block_k/G)).
        block_shape: ``[block_n, block_k]`` of the weight scale blocks (vLLM's meaning);
            optional, checked against the weights' config.
        use_int8_w8a8: accepted for compatibility; the scheme is always INT8 weights and
            INT8 activations with block scales, whatever its value.
        use_fp8_w8a8, use_int8_w8a16, use_int4_w4a16, per_channel_quant, w1_zp, w2_zp,
            a1_scale, a2_scale: other vLLM quantization schemes; set, they raise
            NotImplementedError (activation scales are always computed per block).
        quant_config: the ``triton_moe.QuantConfig`` the int8 tensors were made with
            (default ``QuantConfig.create()`` with ``block_shape``); not vLLM's
            FusedMoEQuantConfig.
        backend, check_ids: as ``triton_moe.moe_forward``.

    Returns:
        [M, K] in hidden_states.dtype (``hidden_states`` itself when ``inplace``).

    No host sync on CUDA (unless ``check_ids=True``): CUDA-graph capturable, and under
    ``torch.compile`` the forward is one custom-op node.
    """
    if activation not in SUPPORTED_ACTIVATIONS:
        raise NotImplementedError(f"activation={activation!r} is not implemented; "
                                  f"triton_moe supports {SUPPORTED_ACTIVATIONS} "
                                  "(silu(gate) * up)")
    for flag_name, flag in (("use_fp8_w8a8", use_fp8_w8a8), ("use_int8_w8a16", use_int8_w8a16),
                            ("use_int4_w4a16", use_int4_w4a16),
                            ("per_channel_quant", per_channel_quant)):
        if flag:
            raise NotImplementedError(f"{flag_name}=True is not implemented: triton_moe runs "
                                      "INT8 weights and activations with block scales only")
    for tensor_name, tensor in (("w1_zp", w1_zp), ("w2_zp", w2_zp), ("a1_scale", a1_scale),
                                ("a2_scale", a2_scale)):
        if tensor is not None:
            raise NotImplementedError(f"{tensor_name} is not supported: triton_moe has no zero "
                                      "points and computes activation scales per block")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    weights = _weights_from_arguments(w1, w2, w1_scale, w2_scale, block_shape, quant_config)

    api._check_tensor("topk_weights", topk_weights, ndim=2, dtypes=api.ACTIVATION_DTYPES,
                      device=weights.device)
    if not isinstance(global_num_experts, int) or isinstance(global_num_experts, bool):
        raise TypeError(f"global_num_experts must be an int, got {global_num_experts!r}")
    if expert_map is not None:
        api._check_tensor("expert_map", expert_map, ndim=1,
                          dtypes=(torch.int32, torch.int64), device=weights.device)
    num_global = weights.num_experts if expert_map is None else expert_map.shape[0]
    if global_num_experts not in (-1, num_global):
        where = ("expert_map has" if expert_map is not None
                 else "w1 holds (no expert_map given)")
        raise ValueError(f"global_num_experts={global_num_experts} but {where} "
                         f"{num_global} experts")
    topk_weights = topk_weights.float()
    if apply_router_weight_on_input:
        if topk_weights.shape[1] != 1:
            raise ValueError("apply_router_weight_on_input=True needs top_k == 1 (as in "
                             f"vLLM), got topk_weights of shape {tuple(topk_weights.shape)}")
        api._check_tensor("hidden_states", hidden_states, ndim=2,
                          dtypes=api.ACTIVATION_DTYPES, device=weights.device)
        if topk_weights.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"topk_weights {tuple(topk_weights.shape)} must be [M, 1] with "
                             f"M={hidden_states.shape[0]} (hidden_states rows)")
        # (w * x) @ W13^T == w * (x @ W13^T): vLLM weights GEMM1's output; we scale the
        # input (in fp32, rounded once to the activation dtype) and combine with weight 1.
        forward_input = (hidden_states.float() * topk_weights).to(hidden_states.dtype)
        topk_weights = torch.ones_like(topk_weights)
    else:
        forward_input = hidden_states
    out = api.moe_forward(forward_input, weights, topk_weights, topk_ids, backend=backend,
                          expert_map=expert_map, check_ids=check_ids)
    if inplace:
        return hidden_states.copy_(out)
    return out
