"""Blockwise INT8 quantization with two-level (Q, F) scales: the PyTorch oracle (SPEC 4, 6).

A matrix ``X [R, C]`` is cut into blocks of ``block_rows`` rows (counted from row 0) by
``block_k`` columns. Each block gets a float scale ``s``; along a scale row, ``G``
consecutive K-blocks (a super group) share one fp32 factor ``F`` and each block keeps an
integer ``Q`` in ``[0, q_max]``, so the GEMM weights a whole int32 K-block dot with the
integer ``Q_A * Q_B`` and meets floats once per super group (SPEC 5). The exact formulas
(fp32, IEEE division, round half to even) are in docs/design.md, "Block scales and the
(Q, F) factorization"; the Triton kernels in ``triton_moe/quant.py`` reproduce these bits.

Every function takes ``x [..., R, C]`` with any leading batch dims (weights are
``[E, R, C]``), depends on torch only, and runs on CPU and CUDA.
"""
from __future__ import annotations

import torch

SCALE_EPS = 1e-12
INT8_ABS_MAX = 127
SCALE_ROUNDINGS = ("nearest", "consistent")

# Largest number of fp32 temporaries ``quantize_weight`` builds at once (2**27 values,
# 512 MiB each): experts are quantized in chunks so Mixtral-size weights fit on a GPU.
_WEIGHT_CHUNK_VALUES = 1 << 27


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def ieee_div(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """``x / divisor``, correctly rounded on every device.

    torch on CUDA divides by a Python scalar as a multiplication by its reciprocal, which
    is off by an ulp for many inputs (e.g. absmax / 127); dividing by a tensor is a true
    IEEE division there, as it is on the CPU and in the kernels (``tl.math.div_rn``).
    """
    return x / torch.full_like(x, divisor)


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties to even (``torch.round`` does exactly that)."""
    return torch.round(x)


def max_safe_super_group_size(q_max: int, block_k: int) -> int:
    """Largest G with ``G * q_max**2 * block_k * 127**2 < 2**31`` (SPEC 5); 0 if none.

    ``|q| <= 127`` and ``Q <= q_max``, so one K-block contributes at most
    ``q_max**2 * block_k * 127**2`` to the Q-weighted int32 super-group sum.
    """
    per_block = q_max * q_max * block_k * INT8_ABS_MAX * INT8_ABS_MAX
    return (2**31 - 1) // per_block


def num_scale_rows(num_pairs: int, num_experts: int, act_block_m: int) -> int:
    """Activation scale rows to allocate: ``ceil(P / act_block_m) + E`` (``P`` if 1).

    ``sum_e ceil(c_e / m) <= sum_e (c_e + m - 1) / m <= P / m + E`` for any counts
    ``c_e`` summing to at most ``P`` (SPEC 4.1), so the buffer is sized without a sync.
    """
    if act_block_m == 1:
        return num_pairs
    return _ceil_div(num_pairs, act_block_m) + num_experts


def _expand_rows(t: torch.Tensor, block_rows: int, num_rows: int) -> torch.Tensor:
    """Repeat each scale row ``block_rows`` times and cut at ``num_rows`` (dim -2)."""
    return t.repeat_interleave(block_rows, dim=-2)[..., :num_rows, :]


def _expand_cols(t: torch.Tensor, block_cols: int, num_cols: int) -> torch.Tensor:
    """Repeat each entry ``block_cols`` times along the last dim and cut at ``num_cols``."""
    return t.repeat_interleave(block_cols, dim=-1)[..., :num_cols]


def block_scales(x: torch.Tensor, block_rows: int, block_k: int) -> torch.Tensor:
    """``s = max(absmax(block) / 127, SCALE_EPS)`` in fp32 (SPEC 4.1).

    ``x [..., R, C]`` with ``C % block_k == 0``; returns ``[..., ceil(R / block_rows),
    C // block_k]``. The last block row holds only the rows that exist.
    """
    *batch, num_rows, num_cols = x.shape
    assert num_cols % block_k == 0, (num_cols, block_k)
    row_blocks = _ceil_div(num_rows, block_rows)
    absx = x.abs()  # the max is exact in the input dtype; convert the reduced values only
    pad = row_blocks * block_rows - num_rows
    if pad:  # zero rows never raise an absmax
        absx = torch.cat([absx, absx.new_zeros(*batch, pad, num_cols)], dim=-2)
    absmax = absx.reshape(*batch, row_blocks, block_rows, num_cols // block_k, block_k)
    absmax = absmax.amax(dim=(-3, -1)).float()
    return torch.clamp_min(ieee_div(absmax, INT8_ABS_MAX), SCALE_EPS)


def factorize_scales(s: torch.Tensor, *, q_max: int, super_group_size: int,
                     scale_rounding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split block scales ``s [..., KB]`` into ``(Q int32 [..., KB], F fp32 [..., SG])``.

    ``F = max_{b in g} s_b / q_max`` per super group of ``super_group_size`` blocks
    (``SG = ceil(KB / G)``, the last group may be short). "nearest" (reference design):
    ``Q = clamp(rint(s / F), 0, q_max)``; "consistent": ``Q = clamp(ceil(s / F), 1,
    q_max)``, so ``Q * F >= s`` up to an ulp (SPEC 4.2).
    """
    assert scale_rounding in SCALE_ROUNDINGS, scale_rounding
    s = s.float()
    num_blocks = s.shape[-1]
    num_groups = _ceil_div(num_blocks, super_group_size)
    pad = num_groups * super_group_size - num_blocks
    padded = torch.cat([s, s.new_zeros(*s.shape[:-1], pad)], dim=-1) if pad else s
    group_max = padded.reshape(*s.shape[:-1], num_groups, super_group_size).amax(dim=-1)
    fscale = ieee_div(group_max, q_max)
    ratio = s / _expand_cols(fscale, super_group_size, num_blocks)
    if scale_rounding == "nearest":
        qscale = torch.clamp(round_half_even(ratio), 0, q_max)
    else:
        qscale = torch.clamp(torch.ceil(ratio), 1, q_max)
    return qscale.to(torch.int32), fscale


def effective_scales(qscale: torch.Tensor, fscale: torch.Tensor,
                     super_group_size: int) -> torch.Tensor:
    """The scale the GEMM applies to each block: ``float32(Q) * F``, shaped like ``qscale``."""
    num_blocks = qscale.shape[-1]
    return qscale.float() * _expand_cols(fscale, super_group_size, num_blocks)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q = int8(rint(clamp(x / scale, -128, 127)))`` with ``scale`` broadcastable to x."""
    ratio = torch.clamp(x.float() / scale, -128, 127)
    return round_half_even(ratio).to(torch.int8)


def _element_scales(block_scale: torch.Tensor, block_rows: int, block_k: int,
                     num_rows: int, num_cols: int) -> torch.Tensor:
    return _expand_cols(_expand_rows(block_scale, block_rows, num_rows), block_k, num_cols)


def quantize_blockwise(x: torch.Tensor, *, block_rows: int, block_k: int, q_max: int,
                       super_group_size: int, scale_rounding: str,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., R, C]`` to ``(x_q int8 [..., R, C], qscale int32 [..., RB, KB],
    fscale fp32 [..., RB, SG])`` with ``RB = ceil(R / block_rows)``.

    "nearest" quantizes the int8 values with ``s`` itself (reference design: the GEMM
    then applies ``Q * F``, which may differ from ``s`` by up to ``F / 2``); "consistent"
    quantizes them with ``float32(Q) * F``, the scale the GEMM applies (SPEC 4.2).
    """
    num_rows, num_cols = x.shape[-2:]
    s = block_scales(x, block_rows, block_k)
    qscale, fscale = factorize_scales(s, q_max=q_max, super_group_size=super_group_size,
                                      scale_rounding=scale_rounding)
    scale = s if scale_rounding == "nearest" else effective_scales(qscale, fscale,
                                                                   super_group_size)
    x_q = quantize_int8(x, _element_scales(scale, block_rows, block_k, num_rows, num_cols))
    return x_q, qscale, fscale


def dequantize_blockwise(x_q: torch.Tensor, qscale: torch.Tensor, fscale: torch.Tensor, *,
                         block_rows: int, block_k: int, super_group_size: int) -> torch.Tensor:
    """``x_q * Q * F`` in fp32: the value the hybrid GEMM sees (SPEC 5)."""
    num_rows, num_cols = x_q.shape[-2:]
    scale = effective_scales(qscale, fscale, super_group_size)
    return x_q.float() * _element_scales(scale, block_rows, block_k, num_rows, num_cols)


def quantize_weight(w: torch.Tensor, *, block_n: int, block_k: int, q_max: int,
                    super_group_size: int, scale_rounding: str,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize expert weights ``w [E, R, C]`` (R output features, C reduction dim).

    Returns ``(w_q int8 [E, R, C], qscale int32 [E, R // block_n, C // block_k],
    fscale fp32 [E, R // block_n, SG])``. Experts are processed in chunks of at most
    ``_WEIGHT_CHUNK_VALUES`` values, so fp32 temporaries stay bounded.
    """
    num_experts, num_rows, num_cols = w.shape
    opts = dict(block_rows=block_n, block_k=block_k, q_max=q_max,
                super_group_size=super_group_size, scale_rounding=scale_rounding)
    num_row_blocks = _ceil_div(num_rows, block_n)
    num_blocks = num_cols // block_k
    num_groups = _ceil_div(num_blocks, super_group_size)
    w_q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    qscale = torch.empty(num_experts, num_row_blocks, num_blocks, dtype=torch.int32,
                         device=w.device)
    fscale = torch.empty(num_experts, num_row_blocks, num_groups, dtype=torch.float32,
                         device=w.device)
    chunk = max(1, _WEIGHT_CHUNK_VALUES // max(num_rows * num_cols, 1))
    for first in range(0, num_experts, chunk):
        part = slice(first, first + chunk)
        w_q[part], qscale[part], fscale[part] = quantize_blockwise(w[part], **opts)
    return w_q, qscale, fscale


def quantize_activations(x_perm: torch.Tensor, expert_offsets: torch.Tensor,
                         scale_row_offsets: torch.Tensor, *, act_block_m: int, block_k: int,
                         q_max: int, super_group_size: int, scale_rounding: str,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize permuted activation rows ``x_perm [P, C]`` per expert segment (SPEC 4.1).

    Expert ``e`` owns rows ``[expert_offsets[e], expert_offsets[e+1])``; its scale blocks
    count ``act_block_m`` rows from the segment start (a block never straddles two
    experts) and fill scale rows ``scale_row_offsets[e]`` onwards. Returns
    ``(x_q int8 [P, C], qscale int32 [S, KB], fscale fp32 [S, SG])`` with
    ``S = num_scale_rows(P, E, act_block_m)``; rows past ``expert_offsets[E]`` and unused
    scale rows are zero. Loops over experts on the host (this is the slow oracle).
    """
    num_pairs, num_cols = x_perm.shape
    num_experts = expert_offsets.numel() - 1
    num_blocks = num_cols // block_k
    num_groups = _ceil_div(num_blocks, super_group_size)
    num_srows = num_scale_rows(num_pairs, num_experts, act_block_m)
    device = x_perm.device
    x_q = torch.zeros(num_pairs, num_cols, dtype=torch.int8, device=device)
    qscale = torch.zeros(num_srows, num_blocks, dtype=torch.int32, device=device)
    fscale = torch.zeros(num_srows, num_groups, dtype=torch.float32, device=device)
    offsets = expert_offsets.tolist()
    srow_offsets = scale_row_offsets.tolist()
    for e in range(num_experts):
        start, end = offsets[e], offsets[e + 1]
        srow = srow_offsets[e]
        assert srow_offsets[e + 1] - srow == _ceil_div(end - start, act_block_m), \
            "scale_row_offsets do not match expert_offsets and act_block_m"
        if end == start:
            continue
        seg_q, seg_qscale, seg_fscale = quantize_blockwise(
            x_perm[start:end], block_rows=act_block_m, block_k=block_k, q_max=q_max,
            super_group_size=super_group_size, scale_rounding=scale_rounding)
        x_q[start:end] = seg_q
        qscale[srow:srow + seg_qscale.shape[0]] = seg_qscale
        fscale[srow:srow + seg_fscale.shape[0]] = seg_fscale
    return x_q, qscale, fscale


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in fp32 for GEMM1's output ``h [P, 2N]`` (SPEC 6).

    ``gate / (1 + exp(-gate)) * up`` with ``gate = h[:, :N].float()``, ``up =
    h[:, N:].float()``, every operation in fp32 except ``exp``, which is evaluated in
    fp64 and rounded to fp32. fp32 ``exp`` differs between libraries (torch CPU, numpy in
    the Triton interpreter, CUDA's ``ex2.approx``) in the last bit for many inputs;
    the fp64 value rounded to fp32 is the correctly rounded result except in vanishingly
    rare double-rounding cases, so every backend computes the same bits.
    """
    num_inter = h.shape[-1] // 2
    gate = h[..., :num_inter].float()
    up = h[..., num_inter:].float()
    exp_neg_gate = torch.exp(-gate.double()).float()
    return gate / (1 + exp_neg_gate) * up
