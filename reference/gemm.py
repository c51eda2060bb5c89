"""Hybrid grouped GEMM oracle (SPEC 5; layouts and order: docs/design.md "Hybrid grouped GEMM").

For expert ``e``, permuted row ``r`` in ``[o_e, o_{e+1})`` and output column ``n``:

    S_g       = sum_{b in g} Q_A[ra(r), b] * Q_B[e, rb(n), b] * dot(A[r, block b], B[e, n, block b])
    acc       = 0.0 (fp32)
    for g in 0..SG-1:  acc = acc + (F_A[ra(r), g] * F_B[e, rb(n), g]) * float32(S_g)
    out[r, n] = out_dtype(acc + bias[e, n])

with ``ra(r) = scale_row_offsets[e] + (r - o_e) // act_block_m`` and ``rb(n) = n // block_n``.

The integer part is computed exactly: in int64 on CPU, in float64 on CUDA (CUDA has no
integer matmul; every partial sum here is an integer far below 2**53, so float64 is exact).
The fp32 part follows design.md's order operation by operation, so a kernel that keeps
the same order matches it bit for bit (up to FMA contraction on the GPU).

Slow and obviously correct: a Python loop over experts, host syncs included. Rows
``>= expert_offsets[E]`` are zero here (kernels leave them unwritten).
"""
from __future__ import annotations

import torch

INT32_MAX = 2**31 - 1


def _exact_dtype(device: torch.device) -> torch.dtype:
    return torch.int64 if device.type == "cpu" else torch.float64


def _expert_segments(expert_offsets: torch.Tensor, scale_row_offsets: torch.Tensor):
    """(expert, first row, end row, first scale row) of every non-empty expert."""
    offsets = expert_offsets.tolist()
    scale_rows = scale_row_offsets.tolist()
    for expert in range(len(offsets) - 1):
        if offsets[expert + 1] > offsets[expert]:
            yield expert, offsets[expert], offsets[expert + 1], scale_rows[expert]


def _weighted_block_dots(a_q, a_qscale, b_q, b_qscale, expert, row_start, row_end,
                         scale_row_start, *, act_block_m, block_n, block_k):
    """Exact Q_A * Q_B * dot_int per K-block for one expert's rows: [rows, Nout, KB]
    (int64 on CPU, float64 on CUDA), plus the scale rows ra(r) used."""
    exact = _exact_dtype(a_q.device)
    rows = row_end - row_start
    n_out, k_in = b_q.shape[1], b_q.shape[2]
    num_k_blocks = k_in // block_k
    a_blocks = a_q[row_start:row_end].to(exact).reshape(rows, num_k_blocks, block_k)
    b_blocks = b_q[expert].to(exact).reshape(n_out, num_k_blocks, block_k)
    # [KB, rows, BK] @ [KB, BK, Nout] -> [KB, rows, Nout]: one exact dot per K-block.
    dots = torch.bmm(a_blocks.transpose(0, 1), b_blocks.permute(1, 2, 0)).permute(1, 2, 0)
    scale_rows = scale_row_start + torch.arange(rows, device=a_q.device) // act_block_m
    q_a = a_qscale[scale_rows].to(exact)                                     # [rows, KB]
    q_b = b_qscale[expert][torch.arange(n_out, device=a_q.device) // block_n].to(exact)
    return dots * q_a[:, None, :] * q_b[None, :, :], scale_rows              # [rows, Nout, KB]


def _split_super_groups(weighted: torch.Tensor, super_group_size: int) -> torch.Tensor:
    """[rows, Nout, KB] -> [rows, Nout, SG, G], the last group zero-padded."""
    rows, n_out, num_k_blocks = weighted.shape
    num_groups = -(-num_k_blocks // super_group_size)
    pad = num_groups * super_group_size - num_k_blocks
    weighted = torch.nn.functional.pad(weighted, (0, pad))
    return weighted.reshape(rows, n_out, num_groups, super_group_size)


def super_group_partials(a_q: torch.Tensor, a_qscale: torch.Tensor, b_q: torch.Tensor,
                         b_qscale: torch.Tensor, expert_offsets: torch.Tensor,
                         scale_row_offsets: torch.Tensor, *, act_block_m: int, block_n: int,
                         block_k: int, super_group_size: int) -> torch.Tensor:
    """The exact integer super-group sums S_g as int64 ``[P, Nout, SG]`` (rows >= R are 0)."""
    num_rows, n_out = a_q.shape[0], b_q.shape[1]
    num_groups = -(-(b_q.shape[2] // block_k) // super_group_size)
    partials = torch.zeros(num_rows, n_out, num_groups, dtype=torch.int64, device=a_q.device)
    for expert, start, end, scale_start in _expert_segments(expert_offsets, scale_row_offsets):
        weighted, _ = _weighted_block_dots(a_q, a_qscale, b_q, b_qscale, expert, start, end,
                                           scale_start, act_block_m=act_block_m,
                                           block_n=block_n, block_k=block_k)
        sums = _split_super_groups(weighted, super_group_size).sum(dim=3)
        partials[start:end] = sums.to(torch.int64)
    return partials


def max_running_partial(a_q: torch.Tensor, a_qscale: torch.Tensor, b_q: torch.Tensor,
                        b_qscale: torch.Tensor, expert_offsets: torch.Tensor,
                        scale_row_offsets: torch.Tensor, *, act_block_m: int, block_n: int,
                        block_k: int, super_group_size: int) -> int:
    """Largest |running sum| of the Q-weighted block accumulation, taken after every K-block
    of every super group, over all valid rows and columns (what an int32 accumulator holds)."""
    largest = 0
    for expert, start, end, scale_start in _expert_segments(expert_offsets, scale_row_offsets):
        weighted, _ = _weighted_block_dots(a_q, a_qscale, b_q, b_qscale, expert, start, end,
                                           scale_start, act_block_m=act_block_m,
                                           block_n=block_n, block_k=block_k)
        running = _split_super_groups(weighted, super_group_size).cumsum(dim=3)
        largest = max(largest, int(running.abs().max().item()))
    return largest


def int32_would_wrap(a_q: torch.Tensor, a_qscale: torch.Tensor, b_q: torch.Tensor,
                     b_qscale: torch.Tensor, expert_offsets: torch.Tensor,
                     scale_row_offsets: torch.Tensor, *, act_block_m: int, block_n: int,
                     block_k: int, super_group_size: int) -> bool:
    """True if an int32 super-group accumulator would exceed 2**31 - 1 on this data (SPEC 5)."""
    return max_running_partial(a_q, a_qscale, b_q, b_qscale, expert_offsets, scale_row_offsets,
                               act_block_m=act_block_m, block_n=block_n, block_k=block_k,
                               super_group_size=super_group_size) > INT32_MAX


def grouped_gemm(a_q: torch.Tensor, a_qscale: torch.Tensor, a_fscale: torch.Tensor,
                 b_q: torch.Tensor, b_qscale: torch.Tensor, b_fscale: torch.Tensor,
                 expert_offsets: torch.Tensor, scale_row_offsets: torch.Tensor, *,
                 act_block_m: int, block_n: int, block_k: int, super_group_size: int,
                 out_dtype: torch.dtype, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Hybrid grouped GEMM (SPEC 5), exact integer sums, design.md's fp32 order.

    Args:
        a_q: int8 [P, Kin] permuted activation rows; a_qscale int32 [S, KB]; a_fscale fp32 [S, SG].
        b_q: int8 [E, Nout, Kin]; b_qscale int32 [E, Nout // block_n, KB];
            b_fscale fp32 [E, Nout // block_n, SG].
        expert_offsets, scale_row_offsets: int32 [E + 1] (design.md "Permutation").
        bias: optional fp32 [E, Nout].
        out: optional [P, Nout] of out_dtype to write into (rows >= R are zeroed).
    Returns:
        [P, Nout] in out_dtype; rows >= expert_offsets[E] are zero.
    """
    num_rows, n_out = a_q.shape[0], b_q.shape[1]
    if out is None:
        out = torch.empty(num_rows, n_out, dtype=out_dtype, device=a_q.device)
    out.zero_()
    cols = torch.arange(n_out, device=a_q.device)
    for expert, start, end, scale_start in _expert_segments(expert_offsets, scale_row_offsets):
        weighted, scale_rows = _weighted_block_dots(
            a_q, a_qscale, b_q, b_qscale, expert, start, end, scale_start,
            act_block_m=act_block_m, block_n=block_n, block_k=block_k)
        sums = _split_super_groups(weighted, super_group_size).sum(dim=3)   # [rows, Nout, SG]
        f_a = a_fscale[scale_rows].float()                                  # [rows, SG]
        f_b = b_fscale[expert][cols // block_n].float()                     # [Nout, SG]
        acc = torch.zeros(end - start, n_out, dtype=torch.float32, device=a_q.device)
        for group in range(sums.shape[2]):
            # One fp32 op at a time, in design.md's order: (F_A * F_B) * float32(S_g), then add.
            scale = f_a[:, group, None] * f_b[None, :, group]
            acc = acc + scale * sums[:, :, group].to(torch.float32)
        if bias is not None:
            acc = acc + bias[expert].float()[None, :]
        out[start:end] = acc.to(out_dtype)
    return out
