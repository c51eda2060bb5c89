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
                       num_warps: int = 4, num_stages: int = 3,
                       divisible_by_16: tuple = (), **options):
    """Compile ``kernel`` (a ``@triton.jit`` function, or an autotuned/heuristics wrapper)
    for sm_90 and return the compiled kernel; ``.asm["ptx"]`` holds the PTX.

    ``signature`` maps every argument name to a Triton type string ("*i8", "*fp32",
    "i32", "fp32", "constexpr"); constexpr arguments get their value in ``constexprs``.
    Extra ``options`` (e.g. ``enable_fp_fusion=False``) go to the compiler as a launch
    would pass them. ``divisible_by_16`` names the arguments a launch would specialize as
    multiples of 16 (aligned pointers, such ints): register counts and vector widths
    depend on it (``launch_specialization``).
    """
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn  # unwrap Autotuner / Heuristics
    constexprs = dict(constexprs or {})
    signature = dict(signature)
    for name in constexprs:
        signature.setdefault(name, "constexpr")
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name in divisible_by_16}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=HOPPER, options={
        "num_warps": num_warps, "num_stages": num_stages, **options})


def launch_specialization(signature: dict, values: dict) -> tuple[dict, dict, tuple]:
    """(signature, constexprs, divisible_by_16) as a launch specializes its arguments:
    pointers aligned, an int argument equal to 1 a constant, one divisible by 16 marked so
    (``values``: the int arguments' values in the launch to mimic)."""
    signature, constexprs = dict(signature), {}
    divisible = [name for name, kind in signature.items() if kind.startswith("*")]
    for name, value in values.items():
        if value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif value % 16 == 0:
            divisible.append(name)
    return signature, constexprs, tuple(divisible)


def register_usage(kernel) -> dict:
    """Registers per thread and spill bytes (stack + local) of a kernel compiled by
    ``compile_for_hopper``, read from its cubin with the cuobjdump Triton ships."""
    import re
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    fields = {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)}
    return {"registers": fields["REG"], "spill_bytes": fields["STACK"] + fields["LOCAL"]}


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
