"""Ahead-of-time compilation of Triton kernels for Hopper, on a machine without a GPU.

The interpreter accepts programs the GPU compiler rejects (and the other way round), so
each kernel family also has a test that compiles it for sm_90 here and reads the PTX:
the int8 GEMM must issue signed ``wgmma ... .s32.s8.s8``; nothing may call libdevice
functions the interpreter lacks.
"""
from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)


def compile_for_hopper(kernel, signature: dict, constexprs: dict | None = None, *,
                       num_warps: int = 4, num_stages: int = 3):
    """Compile ``kernel`` (a ``@triton.jit`` function, or an autotuned/heuristics wrapper)
    for sm_90 and return the compiled kernel; ``.asm["ptx"]`` holds the PTX.

    ``signature`` maps every argument name to a Triton type string ("*i8", "*fp32",
    "i32", "fp32", "constexpr"); constexpr arguments get their value in ``constexprs``.
    """
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn  # unwrap Autotuner / Heuristics
    constexprs = dict(constexprs or {})
    for name, value in constexprs.items():
        signature.setdefault(name, "constexpr")
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=HOPPER,
                          options={"num_warps": num_warps, "num_stages": num_stages})
