"""Run one kernel on tiny CPU inputs under the Triton interpreter (README: debugging).

    TRITON_INTERPRET=1 python -m pdb -c "b triton_moe/unpermute.py:LINE" -c c examples/debug_unpermute.py
"""
import torch
from triton_moe.unpermute import unpermute

mm2 = torch.randn(6, 256)                               # [P, K] expert outputs
topk_weights = torch.rand(3, 2)                         # [M, top_k]
pair_to_row = torch.tensor([0, 3, 1, 4, 2, 5], dtype=torch.int32)
print(unpermute(mm2, topk_weights, pair_to_row))
