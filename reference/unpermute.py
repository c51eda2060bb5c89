"""Un-permute: weighted sum of each token's expert outputs (SPEC 7).

    y[t] = out_dtype( sum_{j = 0..top_k-1, pair_to_row[t*top_k + j] >= 0}
                      w[t, j] * float32(mm2_out[pair_to_row[t*top_k + j]]) )

accumulated in fp32 in order of ``j``, with one rounding per multiply and per add (no
fused multiply-add), so every backend can reproduce the bits.
"""
from __future__ import annotations

import torch

from reference.permute import INVALID_PAIR


def unpermute(mm2_out: torch.Tensor, topk_weights: torch.Tensor, pair_to_row: torch.Tensor,
              *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Combine ``mm2_out [P, K]`` rows back into tokens: returns ``[M, K]`` in mm2_out's dtype.

    ``topk_weights [M, top_k]`` (fp32), ``pair_to_row [P]`` int32 with -1 for dropped
    pairs (they add nothing, whatever their weight) and ``INVALID_PAIR`` (-2) for pairs
    with an out-of-range expert id (their token's output is NaN). ``out``, if given, receives the result.
    """
    num_tokens, top_k = topk_weights.shape
    hidden = mm2_out.shape[1]
    rows = pair_to_row.reshape(num_tokens, top_k).long()
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=mm2_out.device)
    for j in range(top_k):
        row = rows[:, j]
        kept = (row >= 0)[:, None]
        gathered = mm2_out[row.clamp(min=0)].float()
        # Separate multiply and add: two fp32 roundings, as the kernel does.
        term = topk_weights[:, j, None].float() * gathered
        acc = torch.where(kept, acc + term, acc)
        # A pair with an out-of-range expert id poisons its token (never silently dropped).
        acc = torch.where((row == INVALID_PAIR)[:, None], float("nan"), acc)
    if out is None:
        return acc.to(mm2_out.dtype)
    out.copy_(acc)
    return out
