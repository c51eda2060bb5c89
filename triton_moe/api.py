"""Public API: quantize the experts once, route, run the INT8 hybrid MoE forward.

Every argument is checked here, once, with an error naming it; the stage launchers behind
this layer trust their inputs. Nothing here reads a device value back to the host on the
CUDA path, so ``moe_forward`` can be captured in a CUDA graph (the ``torch`` backend is
the exception: it is the slow, exact oracle).
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor

from triton_moe.backends import require_backend
from triton_moe.config import ActBlockM, QuantConfig, resolve_act_block_m

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEVICE_TYPES = ("cpu", "cuda")
OPERAND_ALIGNMENT = 16  # bytes; see _check_aligned
# Pair ids p = t * top_k + j and permuted rows are int32 in every stage (docs/design.md).
MAX_PAIRS = 2**31 - 1
StageCallback = Callable[[str], None]


# --------------------------------------------------------------------------- validation
def _check_tensor(name: str, tensor, *, ndim: int | None = None, dtypes=None,
                  device: torch.device | None = None, contiguous: bool = True,
                  aligned: bool = False) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} must be on {device} (where the weights are), got {tensor.device}")
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()), got strides "
                         f"{tuple(tensor.stride())} for shape {tuple(tensor.shape)}")
    if aligned:
        _check_aligned(name, tensor)


def _has_storage(tensor: torch.Tensor) -> bool:
    """False for meta and fake tensors (shape inference, torch.compile tracing)."""
    return not (tensor.is_meta or isinstance(tensor, FakeTensor))


def _check_aligned(name: str, tensor: torch.Tensor) -> None:
    """Kernel operands must start on a 16-byte boundary: the kernels (Triton's pointer
    specialization, the CuTe DSL's assumed_align=16 copies) load 16-byte vectors."""
    if tensor.numel() == 0 or not _has_storage(tensor):
        return
    misalignment = tensor.data_ptr() % OPERAND_ALIGNMENT
    if misalignment:
        raise ValueError(
            f"{name} must start at a {OPERAND_ALIGNMENT}-byte aligned address (the kernels "
            f"load {OPERAND_ALIGNMENT}-byte vectors); its data pointer is {misalignment} bytes "
            f"past one (a view with storage_offset={tensor.storage_offset()}): pass "
            f"{name.split('.')[-1]}.clone()")


def _check_device_type(name: str, tensor: torch.Tensor, *, allow_meta: bool = False) -> None:
    allowed = DEVICE_TYPES + (("meta",) if allow_meta else ())
    if tensor.device.type not in allowed:
        raise ValueError(
            f"{name} is on {tensor.device}; the forward runs on cuda tensors (or cpu tensors "
            "under the Triton interpreter / with backend='torch'). For shape inference call "
            "torch.ops.triton_moe.moe_forward on meta tensors")


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# --------------------------------------------------------------------------- weights
@dataclasses.dataclass(frozen=True)
class QuantizedMoEWeights:
    """INT8 expert weights with their two-level scales (layouts: docs/design.md).

    ``w13_q`` int8 [E, 2N, K] (rows 0..N-1 gate, N..2N-1 up), ``w13_qscale`` int32
    [E, 2N/block_n, K/block_k], ``w13_fscale`` fp32 [E, 2N/block_n, SG(K)];
    ``w2_q`` int8 [E, K, N], ``w2_qscale`` int32 [E, K/block_n, N/block_k],
    ``w2_fscale`` fp32 [E, K/block_n, SG(N)]; ``config`` says how they were made.
    """

    w13_q: torch.Tensor
    w13_qscale: torch.Tensor
    w13_fscale: torch.Tensor
    w2_q: torch.Tensor
    w2_qscale: torch.Tensor
    w2_fscale: torch.Tensor
    config: QuantConfig

    @property
    def num_experts(self) -> int:
        return self.w13_q.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w13_q.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.w2_q.shape[2]

    @property
    def device(self) -> torch.device:
        return self.w13_q.device


def quantize_weights(w13: torch.Tensor, w2: torch.Tensor, *, block_n: int = 64,
                     block_k: int = 128, q_max: int = 16, super_group_size: int | None = None,
                     scale_rounding: str = "consistent", act_block_m: ActBlockM = 1,
                     allow_int32_overflow: bool = False) -> QuantizedMoEWeights:
    """Quantize expert weights once (offline) to INT8 with (Q, F) block scales (SPEC 4).

    Args:
        w13: [E, 2N, K] float (gate rows then up rows), w2: [E, K, N] float, same device.
        block_n, block_k: weight scale block (rows x K columns); block_k is also the
            activations' K-block.
        q_max: Q factors lie in [0, q_max].
        super_group_size: K-blocks per fp32 factor F; None = the largest int32-safe value
            (4 for q_max 16, block_k 128). Larger values that can wrap int32 raise
            unless ``allow_int32_overflow=True`` (the reference design uses 256).
        scale_rounding: "consistent" (default: Q = ceil(s/F), int8 quantized with Q*F) or
            "nearest" (reference design: Q = rint(s/F), int8 quantized with s).
        act_block_m: activation scale block rows used by the forward: 1 (default,
            per-token scales: most accurate and fastest), "auto" (the reference design:
            128, or 64 when tokens*top_k/E <= 70), or any int >= 1.
    """
    config = QuantConfig.create(block_k=block_k, block_n=block_n, q_max=q_max,
                                super_group_size=super_group_size,
                                scale_rounding=scale_rounding, act_block_m=act_block_m,
                                allow_int32_overflow=allow_int32_overflow)
    _check_tensor("w13", w13, ndim=3, dtypes=ACTIVATION_DTYPES, contiguous=False)
    _check_tensor("w2", w2, ndim=3, dtypes=ACTIVATION_DTYPES, device=w13.device,
                  contiguous=False)
    _check_device_type("w13", w13, allow_meta=True)
    num_experts, two_n, hidden = w13.shape
    if num_experts < 1:
        raise ValueError("w13 must hold at least one expert, got shape "
                         f"{tuple(w13.shape)}")
    if two_n % 2:
        raise ValueError(f"w13.shape[1] must be 2*N (gate and up rows), got {two_n}")
    inter = two_n // 2
    if tuple(w2.shape) != (num_experts, hidden, inter):
        raise ValueError(f"w2 must have shape [E, K, N] = {(num_experts, hidden, inter)} to "
                         f"match w13 {tuple(w13.shape)}, got {tuple(w2.shape)}")
    for dim_name, dim in (("hidden size K", hidden), ("intermediate size N", inter)):
        if dim % block_k:
            raise ValueError(f"{dim_name}={dim} must be a multiple of block_k={block_k}")
        if dim % block_n:
            raise ValueError(f"{dim_name}={dim} must be a multiple of block_n={block_n}")
    # Offline, so reading values is fine: a NaN/Inf weight would make its block's scales
    # NaN and every output that touches the block garbage, without any error later.
    for name, weight in (("w13", w13), ("w2", w2)):
        if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
            raise ValueError(f"{name} contains NaN or Inf values; expert weights must be finite")
    from reference import quant as ref_quant

    opts = dict(block_n=block_n, block_k=block_k, q_max=q_max,
                super_group_size=config.super_group_size, scale_rounding=scale_rounding)
    w13_q, w13_qscale, w13_fscale = ref_quant.quantize_weight(w13.contiguous(), **opts)
    w2_q, w2_qscale, w2_fscale = ref_quant.quantize_weight(w2.contiguous(), **opts)
    return QuantizedMoEWeights(w13_q, w13_qscale, w13_fscale, w2_q, w2_qscale, w2_fscale,
                               config)


# --------------------------------------------------------------------------- routing
def route(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax",
          renormalize: bool = True, num_expert_group: int | None = None,
          topk_group: int | None = None, correction_bias: torch.Tensor | None = None,
          routed_scaling_factor: float = 1.0, backend: str | None = None):
    """Pick each token's top-k experts (SPEC 2).

    Args:
        router_logits: [M, E] fp32/bf16/fp16.
        scoring: "softmax" (top-k of softmax, renormalized if asked) or "sigmoid"
            (DeepSeek-V3: grouped selection on sigmoid + correction_bias, weights are the
            unbiased sigmoid, renormalized if asked, times routed_scaling_factor).
        num_expert_group, topk_group: sigmoid scoring only; None = one group / all groups.
    Returns:
        (topk_weights fp32 [M, top_k], topk_ids int32 [M, top_k]), each row in descending
        score order, ties to the lower expert index.
    """
    _check_tensor("router_logits", router_logits, ndim=2, dtypes=ACTIVATION_DTYPES)
    _check_device_type("router_logits", router_logits)
    num_experts = router_logits.shape[1]
    _check_positive_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds the number of experts E={num_experts}")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if scoring == "softmax" and (num_expert_group is not None or topk_group is not None
                                 or correction_bias is not None
                                 or routed_scaling_factor != 1.0):
        raise ValueError("num_expert_group, topk_group, correction_bias and "
                         "routed_scaling_factor apply to scoring='sigmoid' only")
    if scoring == "sigmoid":
        groups = 1 if num_expert_group is None else num_expert_group
        _check_positive_int("num_expert_group", groups)
        if num_experts % groups:
            raise ValueError(f"num_expert_group={groups} must divide the number of "
                             f"experts E={num_experts}")
        kept = groups if topk_group is None else topk_group
        _check_positive_int("topk_group", kept)
        if kept > groups:
            raise ValueError(f"topk_group={kept} exceeds num_expert_group={groups}")
        if top_k > kept * (num_experts // groups):
            raise ValueError(f"top_k={top_k} exceeds the {kept * (num_experts // groups)} "
                             f"experts in the topk_group={kept} kept groups")
        if correction_bias is not None:
            _check_tensor("correction_bias", correction_bias, ndim=1,
                          dtypes=ACTIVATION_DTYPES, device=router_logits.device)
            if correction_bias.shape[0] != num_experts:
                raise ValueError(f"correction_bias must have shape [E]=[{num_experts}], "
                                 f"got {tuple(correction_bias.shape)}")
    name = require_backend(backend, router_logits.device)
    if name == "torch":
        from reference import routing as impl
    else:
        from triton_moe import routing as impl
    return impl.route(router_logits, top_k, scoring=scoring, renormalize=renormalize,
                      num_expert_group=num_expert_group, topk_group=topk_group,
                      correction_bias=correction_bias,
                      routed_scaling_factor=routed_scaling_factor)


# --------------------------------------------------------------------------- forward
# Weights that passed _check_weights, by id (a frozen dataclass: its tensors' shapes,
# dtypes and devices cannot change), so the checks run once per weights object.
_VALIDATED_WEIGHTS: weakref.WeakValueDictionary[int, QuantizedMoEWeights] = \
    weakref.WeakValueDictionary()


def _check_weights(weights, *, allow_meta: bool = False) -> None:
    """Every weight tensor against the layout of docs/design.md and ``weights.config``."""
    if not isinstance(weights, QuantizedMoEWeights):
        raise TypeError("weights must be the QuantizedMoEWeights returned by "
                        f"quantize_weights, got {type(weights).__name__}")
    if _VALIDATED_WEIGHTS.get(id(weights)) is weights:
        return
    cfg = weights.config
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"weights.config must be a QuantConfig, got {type(cfg).__name__}")
    _check_tensor("weights.w13_q", weights.w13_q, ndim=3, dtypes=(torch.int8,), aligned=True)
    _check_device_type("weights.w13_q", weights.w13_q, allow_meta=allow_meta)
    num_experts, two_n, hidden = weights.w13_q.shape
    inter = two_n // 2
    if num_experts < 1 or two_n % 2:
        raise ValueError(f"weights.w13_q must be [E, 2N, K] with E >= 1, got "
                         f"{tuple(weights.w13_q.shape)}")
    for dim_name, dim in (("hidden size K", hidden), ("intermediate size N", inter)):
        if dim % cfg.block_k or dim % cfg.block_n or dim == 0:
            raise ValueError(f"weights: {dim_name}={dim} must be a positive multiple of "
                             f"block_k={cfg.block_k} and block_n={cfg.block_n}")
    bn, bk = cfg.block_n, cfg.block_k
    expected = {
        "w13_q": ((num_experts, two_n, hidden), torch.int8),
        "w13_qscale": ((num_experts, two_n // bn, hidden // bk), torch.int32),
        "w13_fscale": ((num_experts, two_n // bn, cfg.num_super_groups(hidden)), torch.float32),
        "w2_q": ((num_experts, hidden, inter), torch.int8),
        "w2_qscale": ((num_experts, hidden // bn, inter // bk), torch.int32),
        "w2_fscale": ((num_experts, hidden // bn, cfg.num_super_groups(inter)), torch.float32),
    }
    for field, (shape, dtype) in expected.items():
        tensor = getattr(weights, field)
        _check_tensor(f"weights.{field}", tensor, ndim=3, dtypes=(dtype,),
                      device=weights.w13_q.device, aligned=True)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"weights.{field} must have shape {shape} (docs/design.md, "
                             f"with {cfg}), got {tuple(tensor.shape)}")
    if all(_has_storage(getattr(weights, field)) for field in expected):
        _VALIDATED_WEIGHTS[id(weights)] = weights


def _check_forward_inputs(hidden_states, weights, topk_weights, topk_ids, expert_map,
                          check_ids: bool | None, *, allow_meta: bool = False):
    _check_weights(weights, allow_meta=allow_meta)
    device = weights.device
    _check_tensor("hidden_states", hidden_states, ndim=2, dtypes=ACTIVATION_DTYPES,
                  device=device, aligned=True)
    num_tokens, hidden = hidden_states.shape
    if hidden != weights.hidden_size:
        raise ValueError(f"hidden_states.shape[1]={hidden} must equal the weights' hidden "
                         f"size K={weights.hidden_size}")
    _check_tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32, torch.int64),
                  device=device)
    _check_tensor("topk_weights", topk_weights, ndim=2, dtypes=(torch.float32,),
                  device=device)
    if topk_ids.shape[0] != num_tokens or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [M, top_k] with "
                         f"M={num_tokens} (hidden_states rows)")
    top_k = topk_ids.shape[1]
    num_global = weights.num_experts
    if expert_map is not None:
        _check_tensor("expert_map", expert_map, ndim=1, dtypes=(torch.int32, torch.int64),
                      device=device)
        num_global = expert_map.shape[0]
    if top_k < 1 or top_k > num_global:
        raise ValueError(f"top_k={top_k} (topk_ids.shape[1]) must be in [1, {num_global}] "
                         "(the number of experts)")
    if num_tokens * top_k > MAX_PAIRS:
        raise ValueError(f"M * top_k = {num_tokens} * {top_k} (token, expert) pairs exceed "
                         f"{MAX_PAIRS}: pair ids are int32; split the batch")
    # Range checks read values: free on CPU; on CUDA they sync, so only when asked.
    if check_ids is None:
        check_ids = device.type == "cpu"
    if check_ids and topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_global:
            raise ValueError(f"topk_ids must lie in [0, {num_global}), got values in "
                             f"[{lo}, {hi}]")
    if check_ids and expert_map is not None and expert_map.numel():
        lo, hi = int(expert_map.min()), int(expert_map.max())
        if lo < -1 or hi >= weights.num_experts:
            raise ValueError(f"expert_map values must be -1 or a local expert id in "
                             f"[0, {weights.num_experts}), got values in [{lo}, {hi}]")


def moe_forward(hidden_states: torch.Tensor, weights: QuantizedMoEWeights,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                backend: str | None = None, expert_map: torch.Tensor | None = None,
                stage_callback: StageCallback | None = None,
                check_ids: bool | None = None) -> torch.Tensor:
    """The INT8 hybrid MoE forward (SPEC 3-7): [M, K] in hidden_states.dtype.

    Args:
        hidden_states: [M, K] bf16/fp16/fp32, contiguous, 16-byte aligned, on the
            weights' device.
        weights: from :func:`quantize_weights`.
        topk_weights: fp32 [M, top_k]; topk_ids: int32/int64 [M, top_k] expert ids
            (global ids when ``expert_map`` is given).
        backend: "triton", "cutlass" or "torch"; default ``$TRITON_MOE_BACKEND`` or triton.
        expert_map: int32 [E_global], global id -> local id or -1 (pair dropped).
        stage_callback: called with each stage name just before it runs
            ("permute_quantize", "gemm1", "silu_quantize", "gemm2", "unpermute"; on the
            small-batch path of ``triton_moe.decode``: "decode_gate_up", "decode_down")
            and with "end" after the last: hook CUDA events or NVTX ranges here.
        check_ids: verify that ids lie in range; default True on CPU (free) and False on
            CUDA, where the check would sync the host with the device. Unchecked, an
            out-of-range id makes its token's output NaN (no memory is touched).

    Under ``torch.compile`` the call becomes one ``torch.ops.triton_moe.moe_forward``
    node (``triton_moe.ops``): no graph break, shapes from its fake implementation. A
    ``stage_callback`` cannot enter a graph: with one, the call runs eagerly (a graph
    break; an error under ``fullgraph=True``).

    Non-finite activations (NaN/Inf in hidden_states) never crash or hang the forward:
    they make non-finite the outputs of every token that shares an activation scale block
    with the bad token (the ``act_block_m`` rows of one expert's segment; with
    ``act_block_m=1`` only the bad token itself) and leave all other tokens unchanged.
    """
    if torch.compiler.is_compiling():
        if stage_callback is None:
            from triton_moe import ops

            return ops.moe_forward_op(hidden_states, weights, topk_weights, topk_ids,
                                      backend=backend, expert_map=expert_map,
                                      check_ids=check_ids)
        return _moe_forward_eager_not_traced(
            hidden_states, weights, topk_weights, topk_ids, backend=backend,
            expert_map=expert_map, stage_callback=stage_callback, check_ids=check_ids)
    return _moe_forward_eager(hidden_states, weights, topk_weights, topk_ids,
                              backend=backend, expert_map=expert_map,
                              stage_callback=stage_callback, check_ids=check_ids)


def _moe_forward_eager(hidden_states, weights, topk_weights, topk_ids, *, backend,
                       expert_map, stage_callback, check_ids) -> torch.Tensor:
    """Validate, pick the backend and run (the body of ``moe_forward`` and of the
    ``triton_moe::moe_forward`` op)."""
    _check_forward_inputs(hidden_states, weights, topk_weights, topk_ids, expert_map,
                          check_ids)
    name = require_backend(backend, weights.device)
    topk_ids = topk_ids.to(torch.int32)
    if expert_map is not None:
        expert_map = expert_map.to(torch.int32)
    cfg = weights.config
    num_tokens, top_k = topk_ids.shape
    act_block_m = resolve_act_block_m(cfg.act_block_m, num_tokens * top_k,
                                      weights.num_experts)
    if name == "torch":
        from reference import moe as ref_moe

        if num_tokens == 0:
            return hidden_states.new_empty(hidden_states.shape)
        return ref_moe.moe_forward(
            hidden_states, weights.w13_q, weights.w13_qscale, weights.w13_fscale,
            weights.w2_q, weights.w2_qscale, weights.w2_fscale, topk_weights, topk_ids,
            block_n=cfg.block_n, block_k=cfg.block_k, q_max=cfg.q_max,
            super_group_size=cfg.super_group_size, scale_rounding=cfg.scale_rounding,
            act_block_m=act_block_m, expert_map=expert_map)
    from triton_moe import forward

    if name == "cutlass":
        import cutlass_backend

        if cfg.block_k not in cutlass_backend.SUPPORTED_BLOCK_K:
            raise ValueError(f"the cutlass backend supports block_k in "
                             f"{cutlass_backend.SUPPORTED_BLOCK_K}, the weights use "
                             f"block_k={cfg.block_k}")
        gemm = cutlass_backend.grouped_gemm
    else:
        from triton_moe.gemm import grouped_gemm as gemm
    return forward.moe_forward_triton(hidden_states, weights, topk_weights, topk_ids,
                                      act_block_m=act_block_m, expert_map=expert_map,
                                      gemm=gemm, stage_callback=stage_callback)


# Under torch.compile, a call with a stage_callback runs eagerly behind a graph break.
_moe_forward_eager_not_traced = torch.compiler.disable(_moe_forward_eager)


def fused_moe(hidden_states: torch.Tensor, weights: QuantizedMoEWeights,
              router_logits: torch.Tensor, top_k: int, *, backend: str | None = None,
              expert_map: torch.Tensor | None = None,
              stage_callback: StageCallback | None = None, **routing_options) -> torch.Tensor:
    """:func:`route` then :func:`moe_forward`; ``routing_options`` go to :func:`route`."""
    _check_tensor("router_logits", router_logits, ndim=2, dtypes=ACTIVATION_DTYPES)
    if isinstance(weights, QuantizedMoEWeights) and router_logits.device != weights.device:
        raise ValueError(f"router_logits must be on {weights.device} (where the weights "
                         f"are), got {router_logits.device}")
    if router_logits.shape[0] != getattr(hidden_states, "shape", (None,))[0]:
        raise ValueError(f"router_logits has {router_logits.shape[0]} rows but "
                         f"hidden_states has {getattr(hidden_states, 'shape', None)}")
    if stage_callback is not None:
        stage_callback("route")
    topk_weights, topk_ids = route(router_logits, top_k, backend=backend, **routing_options)
    return moe_forward(hidden_states, weights, topk_weights, topk_ids, backend=backend,
                       expert_map=expert_map, stage_callback=stage_callback,
                       check_ids=False)
