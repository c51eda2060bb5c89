"""Plain PyTorch oracle of the INT8 hybrid MoE (SPEC.md; layouts in docs/design.md).

One module per stage, mirroring ``triton_moe/``: ``routing``, ``permute``, ``quant``,
``gemm``, ``unpermute``, and ``moe`` for the whole layer (``moe_forward``: the exact
emulation, also the ``torch`` backend; ``moe_float``: the fp32 truth). Slow, obviously
correct, CPU and CUDA; depends on torch only.
"""
