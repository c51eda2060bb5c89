"""Quantization configuration shared by every backend (SPEC sections 4, 5 and 8).

The defaults differ from the reference design in three places:

* ``super_group_size`` defaults to the largest G for which the Q-weighted int32 sum of a
  super group provably cannot wrap: ``G * q_max**2 * block_k * 127**2 < 2**31``
  (SPEC 5), i.e. G = 4 for q_max 16 and block_k 128. The reference design's G = 256
  relies on data being far from the worst case; it is reachable only with
  ``allow_int32_overflow=True``.
* ``scale_rounding`` defaults to ``"consistent"`` (Q = ceil(s / F), int8 values quantized
  with Q*F): nothing clips and no block is dropped. ``"nearest"`` is the reference design
  (Q = rint(s / F), int8 quantized with s), which loses accuracy (SPEC 4.2).
* ``act_block_m`` defaults to 1 (per-token activation scales, SPEC 4.1's "more accurate
  option") instead of the reference design's 128-row tiles (``"auto"``): 1.6x smaller
  error on the whole forward, and faster, because a token's int8 row no longer depends
  on its expert, so it is quantized once instead of top_k times (H200 numbers in
  bench/results/README.md).
"""
from __future__ import annotations

import dataclasses
from typing import Union

from reference.quant import max_safe_super_group_size

INT8_ABS_MAX = 127
SCALE_ROUNDINGS = ("nearest", "consistent")

# Reference design's switch between 128- and 64-row activation scale blocks (SPEC 4.1).
AUTO_ACT_BLOCK_M_THRESHOLD = 70

ActBlockM = Union[int, str]


def super_group_bound(super_group_size: int, q_max: int, block_k: int) -> int:
    """Largest |Q-weighted int32 sum| one super group can reach (SPEC 5)."""
    return super_group_size * q_max * q_max * block_k * INT8_ABS_MAX * INT8_ABS_MAX


def resolve_act_block_m(act_block_m: ActBlockM, num_pairs: int, num_experts: int) -> int:
    """Activation scale block rows; ``"auto"`` follows the reference design: 128 rows,
    or 64 when the average number of rows per expert is <= 70 (host-known, no sync)."""
    if act_block_m == "auto":
        avg_rows = num_pairs / max(num_experts, 1)
        return 64 if avg_rows <= AUTO_ACT_BLOCK_M_THRESHOLD else 128
    return int(act_block_m)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How weights and activations are quantized; see docs/design.md for the layouts.

    Attributes:
        block_k: K-block size along every reduction dim (K for GEMM1, N for GEMM2).
        block_n: weight scale block rows (output features per weight scale).
        q_max: Q factors are int32 in [0, q_max].
        super_group_size: K-blocks per fp32 factor F.
        scale_rounding: "consistent" (default) or "nearest" (reference design).
        act_block_m: activation scale block rows: 1 (default: per-token scales), "auto"
            (the reference design's 128, or 64 for <= 70 rows per expert on average), or
            any int >= 1.
        allow_int32_overflow: accept a super_group_size whose worst case can wrap int32.
    """

    block_k: int = 128
    block_n: int = 64
    q_max: int = 16
    super_group_size: int = 4
    scale_rounding: str = "consistent"
    act_block_m: ActBlockM = 1
    allow_int32_overflow: bool = False

    @classmethod
    def create(cls, *, block_k: int = 128, block_n: int = 64, q_max: int = 16,
               super_group_size: int | None = None, scale_rounding: str = "consistent",
               act_block_m: ActBlockM = 1,
               allow_int32_overflow: bool = False) -> "QuantConfig":
        """Build and validate a config; ``super_group_size=None`` picks the largest safe G."""
        for name, value in (("block_k", block_k), ("block_n", block_n), ("q_max", q_max)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if block_k < 32 or block_k & (block_k - 1):
            raise ValueError(f"block_k must be a power of two >= 32 (a whole number of int8 "
                             f"MMA K-steps, and a Triton block shape), got {block_k}")
        if block_n % 16:
            raise ValueError(f"block_n must be a multiple of 16, got {block_n}")
        if scale_rounding not in SCALE_ROUNDINGS:
            raise ValueError(f"scale_rounding must be one of {SCALE_ROUNDINGS}, got {scale_rounding!r}")
        if act_block_m != "auto" and (not isinstance(act_block_m, int)
                                      or isinstance(act_block_m, bool) or act_block_m < 1):
            raise ValueError(f"act_block_m must be 'auto' or an int >= 1, got {act_block_m!r}")
        safe = max_safe_super_group_size(q_max, block_k)
        if super_group_size is None:
            if safe < 1:
                raise ValueError(
                    f"no super_group_size is int32-safe for q_max={q_max}, block_k={block_k}: "
                    f"one K-block can reach {super_group_bound(1, q_max, block_k)} > 2**31-1; "
                    "lower q_max or block_k")
            super_group_size = safe
        if not isinstance(super_group_size, int) or isinstance(super_group_size, bool) \
                or super_group_size < 1:
            raise ValueError(f"super_group_size must be an int >= 1, got {super_group_size!r}")
        if super_group_size > safe and not allow_int32_overflow:
            raise ValueError(
                f"super_group_size={super_group_size} can wrap the int32 accumulator: its worst "
                f"case {super_group_bound(super_group_size, q_max, block_k)} exceeds 2**31-1 "
                f"(SPEC 5); the largest safe value for q_max={q_max}, block_k={block_k} is "
                f"{safe}. Pass allow_int32_overflow=True to accept it knowingly (the reference "
                "design's G=256 does).")
        return cls(block_k=block_k, block_n=block_n, q_max=q_max,
                   super_group_size=super_group_size, scale_rounding=scale_rounding,
                   act_block_m=act_block_m, allow_int32_overflow=allow_int32_overflow)

    def num_super_groups(self, reduction_dim: int) -> int:
        kb = reduction_dim // self.block_k
        return -(-kb // self.super_group_size)
