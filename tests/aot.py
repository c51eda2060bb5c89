"""Ahead-of-time compilation of Triton kernels for Hopper, on a machine without a GPU.

The interpreter accepts programs the GPU compiler rejects (and the other way round), so
each kernel family also has a test that compiles it for sm_90 here and reads the PTX:
the int8 GEMM must issue signed ``wgmma ... .s32.s8.s8``; divisions must be IEEE
(``div.rn.f32``); nothing may need libdevice functions the interpreter lacks.

Under ``TRITON_INTERPRET=1`` every ``@triton.jit`` function (Triton's own library too) is
an interpreter object that cannot be compiled, so tests compile in a child process
without it: ``run_without_interpreter("tests.test_x", "compile_all")`` imports the module
there, calls the function and returns its JSON-able result.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_for_hopper(kernel, signature: dict, constexprs: dict | None = None, *,
                       num_warps: int = 4, num_stages: int = 3, **options):
    """Compile ``kernel`` (a ``@triton.jit`` function, or an autotuned/heuristics wrapper)
    for sm_90 and return the compiled kernel; ``.asm["ptx"]`` holds the PTX.

    ``signature`` maps every argument name to a Triton type string ("*i8", "*fp32",
    "i32", "fp32", "constexpr"); constexpr arguments get their value in ``constexprs``.
    Extra ``options`` (e.g. ``enable_fp_fusion=False``) go to the compiler as a launch
    would pass them.
    """
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn  # unwrap Autotuner / Heuristics
    constexprs = dict(constexprs or {})
    signature = dict(signature)
    for name in constexprs:
        signature.setdefault(name, "constexpr")
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=HOPPER, options={
        "num_warps": num_warps, "num_stages": num_stages, **options})


def run_without_interpreter(module: str, function: str, timeout: float = 900):
    """Call ``module.function()`` in a child Python without TRITON_INTERPRET and return
    what it returns (it must be JSON-serializable). One process per call: batch the
    compiles of a test file into one function to pay the start-up once."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import json, {module} as m; "
            f"print('AOT-RESULT ' + json.dumps(m.{function}()))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling in a child process failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("AOT-RESULT ")][-1]
    return json.loads(line[len("AOT-RESULT "):])
