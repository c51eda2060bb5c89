"""Drop-in INT8 MoE for Hugging Face transformers models.

    import triton_moe.nn
    model = AutoModelForCausalLM.from_pretrained(...)          # any supported MoE model
    count = triton_moe.nn.replace_moe_blocks(model)            # quantizes every MoE block once

:class:`Int8MoE` takes one transformers MoE block, quantizes its routed experts once with
:func:`triton_moe.quantize_weights` (``w13 = cat(gate, up)`` rows ``[E, 2N, K]``,
``w2 = down [E, K, N]``) and runs :func:`triton_moe.route` + :func:`triton_moe.moe_forward`
in its forward. The block's router (``gate``) and shared experts are kept as they are, as
submodules of the same names, so their state-dict keys and hooks do not change; the float
expert weights are dropped.

Supported blocks (matched by class name; both layouts of the experts are read):

* ``Qwen3MoeSparseMoeBlock``: softmax top-k, renormalized if ``norm_topk_prob``.
* ``MixtralSparseMoeBlock``: softmax top-k, always renormalized.
* ``DeepseekV3MoE``: sigmoid grouped routing (``n_group``, ``topk_group``,
  ``e_score_correction_bias``), renormalized if ``norm_topk_prob``, times
  ``routed_scaling_factor``; its ``shared_experts`` (kept in float) are added.

* Experts as per-expert ``nn.Linear`` modules (transformers 4.x: ``gate_proj``/``up_proj``/
  ``down_proj``, Mixtral ``w1``/``w3``/``w2``) or as fused parameters (transformers 5.x:
  ``experts.gate_up_proj [E, 2N, K]``, ``experts.down_proj [E, K, N]``, honouring the
  ``is_transposed``/``is_concatenated`` flags of transformers' experts integration).
* Output structure: transformers 4.x softmax blocks return ``(hidden, router_logits)``,
  everything else (all 5.x blocks, DeepSeek-V3) a tensor; :class:`Int8MoE` returns the
  same. The router logits are those of the block: its ``gate`` module is called (so
  transformers' router-logit recording and any hooks still see it), except for the 4.x
  DeepSeek-V3 router, which returns no logits: they are computed as it does,
  ``F.linear(x.float(), gate.weight.float())``. transformers 4.x records
  ``output_router_logits`` from the blocks' outputs, found by class, so there a replaced
  block is an ``Int8<Block>(Int8MoE, <Block>)``: still an instance of the block's class.

Differences from the float block: routing weights stay fp32 (Qwen3 and 4.x Mixtral round
them to the activation dtype: far below the INT8 error); exactly tied selection scores go
to the lower expert index (bf16 router logits tie for ~1% of tokens at k=4 of 32 experts;
``torch.topk`` promises no order there, so such a token may use another expert than the
float block); DeepSeek-V3's renormalization has no ``+1e-20`` and
experts of dropped groups are masked with ``-inf`` (transformers 4.x masks with 0, which
differs only when a biased score in a kept group is negative). Inference only: there is
no backward through the INT8 forward, and Mixtral's training-time jitter noise is not
applied.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from triton_moe.api import QuantizedMoEWeights, moe_forward, quantize_weights, route
from triton_moe.backends import resolve_backend

# Block class name -> routing family. Matched by name so that importing this module does
# not need transformers, and so that a user's subclass is not silently treated as one.
SUPPORTED_BLOCKS = {
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "MixtralSparseMoeBlock": "mixtral",
    "DeepseekV3MoE": "deepseek_v3",
}

_WEIGHT_BUFFERS = ("w13_q", "w13_qscale", "w13_fscale", "w2_q", "w2_qscale", "w2_fscale")
# F factors must stay fp32 through model.to(bfloat16) / model.half() (SPEC 4.2).
_FP32_BUFFERS = ("w13_fscale", "w2_fscale")


def is_supported_block(module: nn.Module) -> bool:
    """Whether :class:`Int8MoE` can replace ``module``."""
    return type(module).__name__ in SUPPORTED_BLOCKS


# --------------------------------------------------------------------------- experts
def _linear_weight(expert: nn.Module, names: tuple[str, ...]) -> torch.Tensor:
    for name in names:
        layer = getattr(expert, name, None)
        if layer is not None:
            if getattr(layer, "bias", None) is not None:
                raise NotImplementedError(f"expert projection {name!r} has a bias; "
                                          "Int8MoE supports bias-free experts only")
            return layer.weight
    raise TypeError(f"expert {type(expert).__name__} has none of the projections {names}")


def _check_silu(act_fn, where: str) -> None:
    name = type(act_fn).__name__
    if not (isinstance(act_fn, nn.SiLU) or name in ("SiLUActivation", "SiLU")
            or act_fn is F.silu):
        raise NotImplementedError(f"{where} uses activation {name}; Int8MoE implements "
                                  "the SiLU-gated (SwiGLU) experts only")


def expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [E, 2N, K] gate rows then up rows, w2 [E, K, N]) of a transformers experts
    container: an ``nn.ModuleList`` of gated MLPs (transformers 4.x) or a fused experts
    module with ``gate_up_proj``/``down_proj`` parameters (transformers 5.x)."""
    if isinstance(experts, nn.ModuleList):
        if len(experts) == 0:
            raise ValueError("the block has no experts")
        gates, ups, downs = [], [], []
        for expert in experts:
            _check_silu(getattr(expert, "act_fn", None), type(expert).__name__)
            gates.append(_linear_weight(expert, ("gate_proj", "w1")))
            ups.append(_linear_weight(expert, ("up_proj", "w3")))
            downs.append(_linear_weight(expert, ("down_proj", "w2")))
        w13 = torch.cat([torch.stack(gates), torch.stack(ups)], dim=1)
        return w13, torch.stack(downs)
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        raise TypeError(f"experts {type(experts).__name__} is neither a ModuleList of MLPs "
                        "nor a fused module with gate_up_proj/down_proj parameters")
    if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) \
            is not None:
        raise NotImplementedError("experts with biases are not supported")
    if not getattr(experts, "has_gate", True):
        raise NotImplementedError("experts without a gate projection are not supported")
    if getattr(experts, "has_post_expert_norm", False):
        raise NotImplementedError("experts with a post-expert norm are not supported")
    _check_silu(getattr(experts, "act_fn", None), type(experts).__name__)
    if getattr(experts, "is_transposed", False):  # stored [E, in, out]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    if not getattr(experts, "is_concatenated", True):  # rows gate0, up0, gate1, up1, ...
        gate_up = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)
    return gate_up, down


# --------------------------------------------------------------------------- module
def _block_subclass(block_cls: type) -> type:
    """``Int8<Block>(Int8MoE, <Block>)``: an Int8MoE that is also an instance of the block
    class (every method from Int8MoE first; the block's __init__ is never called). Kept in
    this module's namespace so that pickling finds it once it has been made."""
    name = f"Int8{block_cls.__name__}"
    cls = globals().get(name)
    if cls is None or block_cls not in cls.__mro__:
        cls = type(name, (Int8MoE, block_cls), {"__module__": __name__})
        globals()[name] = cls
    return cls


class Int8MoE(nn.Module):
    """A transformers MoE block with its routed experts in INT8 (module docstring).

    Args:
        block: a supported transformers MoE block (``SUPPORTED_BLOCKS``); it is not
            modified, and its float experts are not kept.
        backend: "triton", "cutlass" or "torch"; None = ``$TRITON_MOE_BACKEND`` at each
            call, else triton (see :mod:`triton_moe.backends`).
        **quant_options: passed to :func:`triton_moe.quantize_weights` (``block_n``,
            ``q_max``, ``super_group_size``, ``scale_rounding``, ``act_block_m``, ...).

    The quantized experts are buffers (``w13_q``, ``w13_qscale``, ``w13_fscale``, ``w2_q``,
    ``w2_qscale``, ``w2_fscale``): they follow ``.to(device)`` and are in the state dict;
    the F factors stay fp32 when the model is cast to another dtype.
    """

    def __init__(self, block: nn.Module, *, backend: str | None = None, **quant_options):
        super().__init__()
        kind = SUPPORTED_BLOCKS.get(type(block).__name__)
        if kind is None:
            raise TypeError(f"{type(block).__name__} is not a supported MoE block; supported: "
                            f"{', '.join(SUPPORTED_BLOCKS)}")
        if backend is not None:
            resolve_backend(backend)  # an unknown name fails here, not at the first call
        self.kind = kind
        self.backend = backend
        self.gate = block.gate
        self.shared_experts = getattr(block, "shared_experts", None)

        with torch.no_grad():
            w13, w2 = expert_weights(block.experts)
            weights = quantize_weights(w13.detach(), w2.detach(), **quant_options)
        for name in _WEIGHT_BUFFERS:
            self.register_buffer(name, getattr(weights, name))
        self.quant_config = weights.config
        num_experts, hidden = weights.num_experts, weights.hidden_size
        router_experts = self.gate.weight.shape[0]
        if router_experts != num_experts:
            raise ValueError(f"the router scores {router_experts} experts but the block "
                             f"holds {num_experts}")

        gate = self.gate
        self.top_k = int(getattr(block, "top_k", None) or gate.top_k)
        # transformers 4.x softmax blocks route with a plain nn.Linear gate and return
        # (hidden, router_logits); their 5.x routers return (logits, weights, ids) and the
        # block a tensor. DeepSeek-V3's router computes fp32 logits (4.x: not returned).
        self.returns_router_logits = kind != "deepseek_v3" and isinstance(gate, nn.Linear)
        self.gate_returns_logits = isinstance(gate, nn.Linear) or self._probe_gate(hidden)
        if not self.gate_returns_logits and kind != "deepseek_v3":
            raise TypeError(f"the router {type(gate).__name__} returns no logits")
        if kind == "deepseek_v3":
            # transformers 4.x names it n_group, 5.x num_group; None = one group.
            num_groups = getattr(gate, "n_group", getattr(gate, "num_group", None))
            topk_group = getattr(gate, "topk_group", None)
            self.routing = dict(
                scoring="sigmoid", renormalize=bool(gate.norm_topk_prob),
                num_expert_group=None if num_groups is None else int(num_groups),
                topk_group=None if topk_group is None else int(topk_group),
                routed_scaling_factor=float(gate.routed_scaling_factor))
        else:
            norm = getattr(block, "norm_topk_prob", getattr(gate, "norm_topk_prob", None))
            # Mixtral always renormalizes; Qwen3 when norm_topk_prob.
            self.routing = dict(scoring="softmax",
                                renormalize=True if kind == "mixtral" else bool(norm))
        if self.returns_router_logits:
            # transformers 4.x records output_router_logits from the blocks' outputs, found
            # by class (OutputRecorder(<block class>, index=1)): stay an instance of it.
            self.__class__ = _block_subclass(type(block))

    def _probe_gate(self, hidden: int) -> bool:
        """Whether the (non-Linear) router returns its logits first, as transformers 5.x
        routers do: one call on a zero token, at construction."""
        weight = self.gate.weight
        with torch.no_grad():
            out = self.gate(torch.zeros(1, hidden, dtype=weight.dtype, device=weight.device))
        return (isinstance(out, (tuple, list)) and isinstance(out[0], torch.Tensor)
                and out[0].is_floating_point() and out[0].shape[-1] == weight.shape[0])

    @property
    def weights(self) -> QuantizedMoEWeights:
        """The quantized experts as :func:`triton_moe.moe_forward` takes them."""
        return QuantizedMoEWeights(*(getattr(self, name) for name in _WEIGHT_BUFFERS),
                                   self.quant_config)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) casts every floating buffer; keep F in fp32 (move it only).
        saved = {name: getattr(self, name) for name in _FP32_BUFFERS}
        super()._apply(fn, recurse)
        for name, before in saved.items():
            after = self._buffers[name]
            if after.dtype != torch.float32:
                self._buffers[name] = before.to(after.device)
        return self

    def router_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[M, E] router logits of [M, K] hidden states, computed as the block does."""
        if isinstance(self.gate, nn.Linear):  # transformers 4.x softmax blocks
            return self.gate(hidden_states)
        if self.gate_returns_logits:  # transformers 5.x routers: (logits, weights, ids)
            return self.gate(hidden_states)[0]
        # transformers 4.x DeepSeek-V3 router returns (ids, weights): logits as it makes them.
        return F.linear(hidden_states.float(), self.gate.weight.float())

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1]).contiguous()
        router_logits = self.router_logits(x)
        routing = dict(self.routing)
        if routing["scoring"] == "sigmoid":
            routing["correction_bias"] = self.gate.e_score_correction_bias
        topk_weights, topk_ids = route(router_logits.contiguous(), self.top_k,
                                       backend=self.backend, **routing)
        out = moe_forward(x, self.weights, topk_weights, topk_ids,
                          backend=self.backend).reshape(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        if self.returns_router_logits:
            return out, router_logits
        return out

    def extra_repr(self) -> str:
        num_experts, two_n, hidden = self.w13_q.shape
        return (f"kind={self.kind}, experts={num_experts}, hidden={hidden}, "
                f"intermediate={two_n // 2}, top_k={self.top_k}, "
                f"routing={self.routing}, backend={self.backend}")


def replace_moe_blocks(model: nn.Module, *, backend: str | None = None,
                       **quant_options) -> int:
    """Replace every supported MoE block of ``model`` in place by an :class:`Int8MoE`.

    Each block's experts are quantized once (``quant_options`` go to
    :func:`triton_moe.quantize_weights`); the float experts are released. Returns the
    number of blocks replaced (0 when the model has none: check it).
    """
    targets = [(name, module) for name, module in model.named_modules()
               if is_supported_block(module)]
    for name, block in targets:
        if not name:
            raise TypeError("the model itself is an MoE block: wrap it with Int8MoE(block)")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8MoE(block, backend=backend, **quant_options))
    return len(targets)
