"""`python -m bench`: compare the MoE backends on one or more workloads.

On a GPU: for each workload (shape x tokens) every selected backend runs on the same
inputs; the report gives time (median, p10-p90; CUDA-graph replay where the backend allows
it), achieved TOP/s and GB/s against ceilings measured in the same run, speedup against the
bf16 grouped-GEMM baseline, the per-stage breakdown, and the relative L2 error against the
fp32 truth (reference.moe.moe_float).

Without a GPU (or with TRITON_INTERPRET=1): a correctness table for a small shape, run on
CPU under the Triton interpreter; no timings.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence

from bench import shapes as shapes_mod
from bench.shapes import PRESETS, Workload

BACKEND_HELP = """backends (--backends):
  triton    triton_moe.moe_forward, INT8 hybrid blockwise, Triton kernels
  cutlass   the same forward with the CuTe DSL grouped GEMM (needs nvidia-cutlass-dsl + GPU)
  torch     the same forward in plain PyTorch (the reference path; slow: skipped above
            --torch-max-ops unless named here)
  bf16      unquantized MoE in --dtype on torch._grouped_mm (argsort, two grouped GEMMs,
            SiLU*up, scatter-add); a per-expert loop where _grouped_mm is unusable. All
            speedups are against it.
  vllm      vLLM's fused_experts, unquantized (when vllm is importable)
  sglang    SGLang's fused_experts, unquantized (when sglang is importable)
"""


DESCRIPTION = """\
Benchmark the INT8 hybrid-blockwise MoE forward (backends triton, cutlass, torch) against
an unquantized bf16 grouped-GEMM MoE (torch._grouped_mm) and, when importable, vLLM and
SGLang, all on the same inputs. Each row reports time (median, p10-p90; CUDA-graph replay
where capture works), TOP/s and GB/s against ceilings measured in the same run, speedup vs
bf16, a per-stage breakdown, and the relative L2 error vs the fp32 truth.

Without a GPU (or with TRITON_INTERPRET=1) it runs a small shape on CPU under the Triton
interpreter instead: a correctness table, no timings."""


def _preset_lines() -> str:
    lines = ["shape presets (--shape):"]
    for name, w in PRESETS.items():
        routing = w.routing.get("scoring", "softmax")
        if "num_expert_group" in w.routing:
            routing += (f", {w.routing['num_expert_group']} groups, top {w.routing['topk_group']}"
                        f" groups, scaling {w.routing['routed_scaling_factor']}")
        lines.append(f"  {name:14s} M={w.num_tokens} K={w.hidden} N={w.intermediate} "
                     f"E={w.num_experts} top_k={w.top_k} ({routing})")
    return "\n".join(lines)


EPILOG = f"""{_preset_lines()}

{BACKEND_HELP}
examples:
  python -m bench                                   # default shape, every available backend
  python -m bench --shape deepseek-v3 --tokens 1,16,64,256,1024,4096,8192,16384 \\
      --plot bench/results/deepseek.png --json bench/results/deepseek.json
  python -m bench --num-tokens 4096 --hidden 4096 --intermediate 1024 --num-experts 64 \\
      --top-k 6 --backends triton,bf16
  nsys profile -c cudaProfilerApi -t cuda,nvtx python -m bench --profile --iters 10

Timing: the timed region is moe_forward after routing (topk given), the same for every
backend. Inputs are rotated among --rotate copies with independent routings so L2 (50 MB
on H100) does not hold the previous call's activations or expert weights. ops = 2*P*K*2N +
2*P*N*K (P = M*top_k); bytes = weights of the experts hit + activations in and out.
"""


def _checked_number(text: str, cast, accept, expected: str):
    """argparse type: ``cast(text)`` if it parses and ``accept(value)``, else an error."""
    try:
        value = cast(text)
    except ValueError:
        value = None
    if value is None or not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _checked_number(text, int, lambda v: v >= 1, "a positive integer")


def _nonnegative_int(text: str) -> int:
    return _checked_number(text, int, lambda v: v >= 0, "an integer >= 0")


def _positive_float(text: str) -> float:
    return _checked_number(text, float, lambda v: v > 0, "a positive number")


def _token_list(text: str) -> list[int]:
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of token counts")
    return [_positive_int(item.strip()) for item in items]


def _shape_list(text: str) -> list[str]:
    names = [item.strip() for item in text.split(",") if item.strip()]
    lowered = {name.lower(): name for name in PRESETS}
    resolved = []
    for name in names:
        if name.lower() not in lowered:
            raise argparse.ArgumentTypeError(
                f"unknown shape {name!r}; presets: {', '.join(PRESETS)}")
        resolved.append(lowered[name.lower()])
    if not resolved:
        raise argparse.ArgumentTypeError("expected one or more shape presets")
    return resolved


def _backend_list(text: str) -> list[str]:
    from bench.runners import ALL_BACKENDS
    names = [item.strip().lower() for item in text.split(",") if item.strip()]
    if names == ["all"]:
        return list(ALL_BACKENDS)
    unknown = [name for name in names if name not in ALL_BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown backend(s) {', '.join(unknown) or '(none)'}; choose from "
            f"{', '.join(ALL_BACKENDS)} or 'all'")
    return list(dict.fromkeys(names))


def _act_block_m(text: str):
    if text == "auto":
        return "auto"
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=DESCRIPTION,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_argument_group("workload")
    shape.add_argument("--shape", type=_shape_list, default=None, metavar="NAME[,NAME...]",
                       help="shape preset(s), comma-separated (default: 35B-A3B on a GPU, "
                            "demo without one); see the list below")
    tokens = shape.add_mutually_exclusive_group()
    tokens.add_argument("--num-tokens", "-M", type=_positive_int, default=None, metavar="M",
                        help="tokens per batch (default: the preset's, 8192)")
    tokens.add_argument("--tokens", type=_token_list, default=None, metavar="M1,M2,...",
                        help="sweep over token counts, e.g. 1,16,64,256,1024,4096,8192,16384")
    shape.add_argument("--hidden", "-K", type=_positive_int, default=None, metavar="K",
                       help="hidden size (overrides the preset)")
    shape.add_argument("--intermediate", "-N", type=_positive_int, default=None, metavar="N",
                       help="per-expert intermediate size (overrides the preset)")
    shape.add_argument("--num-experts", "-E", type=_positive_int, default=None, metavar="E",
                       help="number of experts (overrides the preset)")
    shape.add_argument("--top-k", type=_positive_int, default=None, metavar="k",
                       help="experts per token (overrides the preset)")
    shape.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                       help="activation (and unquantized weight) dtype (default bf16)")
    shape.add_argument("--seed", type=_nonnegative_int, default=0,
                       help="seed of the random weights, hidden states and router logits")

    run = parser.add_argument_group("backends and timing")
    run.add_argument("--backends", type=_backend_list, default=None, metavar="B[,B...]",
                     help="backends to run, comma-separated, or 'all' (default: every "
                          "available one); see the list below")
    run.add_argument("--warmup", type=_nonnegative_int, default=10,
                     help="untimed calls before timing, after the first (compiling) call "
                          "(default 10)")
    run.add_argument("--iters", type=_positive_int, default=100,
                     help="timed calls per backend and workload (default 100)")
    run.add_argument("--rotate", type=_positive_int, default=None, metavar="COPIES",
                     help="input copies rotated between calls (default: enough to move 4x "
                          "the L2 size per rotation, 2..16)")
    run.add_argument("--no-decode-path", action="store_true",
                     help="send small batches through the general pipeline too (triton "
                          "backend), to compare it with the small-batch path "
                          "(triton_moe.decode)")
    run.add_argument("--no-graph", action="store_true",
                     help="time eager calls only (default: CUDA-graph replay where capture "
                          "works, else eager; the record says which)")
    run.add_argument("--host-bound-timing", action="store_true",
                     help="time graph replays with one event pair per call as issued, as "
                          "before session 9: a replay shorter than the host's launch cost "
                          "(~15 us) then measures the host (default: the host is queued "
                          "ahead, so the events time the GPU's back-to-back replays)")
    run.add_argument("--check-tokens", type=_positive_int, default=4096, metavar="M",
                     help="tokens (the first M of the batch) compared with the fp32 truth "
                          "(default 4096)")
    run.add_argument("--torch-max-ops", type=_positive_float, default=1e12, metavar="OPS",
                     help="skip the slow torch backend (with a note) above this many ops per "
                          "forward unless --backends names it (default 1e12)")

    quant = parser.add_argument_group("quantization (triton_moe.quantize_weights)")
    quant.add_argument("--block-n", type=_positive_int, default=64,
                       help="weight scale block rows (default 64)")
    quant.add_argument("--block-k", type=_positive_int, default=128,
                       help="K-block size along every reduction dim (default 128)")
    quant.add_argument("--q-max", type=_positive_int, default=16,
                       help="largest integer scale Q (default 16)")
    quant.add_argument("--super-group-size", type=_positive_int, default=None, metavar="G",
                       help="K-blocks per float scale F (default: the library's, the largest "
                            "overflow-safe G)")
    quant.add_argument("--allow-int32-overflow", action="store_true",
                       help="accept a --super-group-size whose worst case can wrap the int32 "
                            "accumulator (the reference design: --super-group-size 256 "
                            "--scale-rounding nearest)")
    quant.add_argument("--scale-rounding", choices=("consistent", "nearest"),
                       default="consistent",
                       help="Q = ceil(s/F) with matching int8 values (consistent, default) "
                            "or rint(s/F) as the reference design (nearest)")
    quant.add_argument("--act-block-m", type=_act_block_m, default=1, metavar="auto|R",
                       help="activation scale block rows: 1 = per-token scales (default), "
                            "auto (the reference design: 128, or 64 for small batches), "
                            "or any R >= 1")

    out = parser.add_argument_group("output")
    out.add_argument("--json", nargs="?", const=os.path.join("bench", "results", "latest.json"),
                     default=None, metavar="PATH",
                     help="write the records as a JSON list (PATH defaults to "
                          "bench/results/latest.json; nothing is written without --json)")
    out.add_argument("--plot", default=None, metavar="FILE.png",
                     help="plot time and speedup vs tokens (matplotlib)")
    out.add_argument("--profile", action="store_true",
                     help="after timing, run one forward per backend between "
                          "torch.cuda.profiler.start()/stop() with NVTX ranges per stage "
                          "(for nsys -c cudaProfilerApi or ncu --profile-from-start off)")
    return parser


def quant_options(args: argparse.Namespace) -> dict:
    options = {"block_n": args.block_n, "block_k": args.block_k, "q_max": args.q_max,
               "scale_rounding": args.scale_rounding, "act_block_m": args.act_block_m}
    if args.super_group_size is not None:
        options["super_group_size"] = args.super_group_size
    if args.allow_int32_overflow:
        options["allow_int32_overflow"] = True
    return options


def resolve_workloads(args: argparse.Namespace, has_gpu: bool) -> list[Workload]:
    """Presets x token counts, with explicit dimensions overriding the preset's."""
    names = args.shape or [shapes_mod.DEFAULT_GPU_SHAPE if has_gpu else
                           shapes_mod.DEFAULT_CPU_SHAPE]
    overrides = {field: value for field, value in (
        ("hidden", args.hidden), ("intermediate", args.intermediate),
        ("num_experts", args.num_experts), ("top_k", args.top_k)) if value is not None}
    workloads = []
    for name in names:
        base = PRESETS[name]
        if overrides:
            base = dataclasses.replace(base, name="custom" if args.shape is None
                                       else f"{name}-custom", **overrides)
        token_counts = args.tokens or [args.num_tokens or base.num_tokens]
        workloads += [base.with_tokens(m) for m in token_counts]
    return workloads


def check_workload(workload: Workload, args: argparse.Namespace) -> Optional[str]:
    """The layout requirements of docs/design.md, as a message, or None."""
    K, N, E, k = workload.hidden, workload.intermediate, workload.num_experts, workload.top_k
    problems = []
    for dim, value in (("hidden K", K), ("intermediate N", N)):
        if value % args.block_k:
            problems.append(f"{dim}={value} is not a multiple of --block-k {args.block_k}")
        if value % args.block_n:
            problems.append(f"{dim}={value} is not a multiple of --block-n {args.block_n}")
    if k > E:
        problems.append(f"top-k {k} > experts {E}")
    groups = workload.routing.get("num_expert_group")
    if groups:
        if E % groups:
            problems.append(f"experts {E} do not split into {groups} routing groups")
        elif k > (E // groups) * workload.routing.get("topk_group", groups):
            problems.append(f"top-k {k} > experts in the {workload.routing['topk_group']} "
                            f"kept groups")
    return f"{workload.describe()}: " + "; ".join(problems) if problems else None


def parse_args(argv: Optional[Sequence[str]] = None, has_gpu: bool = True):
    """Parse and validate; returns (args, workloads). Bad values exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    workloads = resolve_workloads(args, has_gpu)
    for workload in workloads:
        problem = check_workload(workload, args)
        if problem:
            parser.error(problem)
    if not has_gpu:
        big = [w for w in workloads if shapes_mod.forward_ops(w) > shapes_mod.CPU_MAX_OPS]
        if big:
            parser.error(f"no GPU: {big[0].describe()} is too large for the Triton "
                         f"interpreter on CPU (> {shapes_mod.CPU_MAX_OPS:.0e} ops); "
                         f"run it on a GPU, or use --shape demo")
    return args, workloads


def gpu_present() -> bool:
    """A CUDA device usable for compiled Triton (the interpreter switched on counts as none)."""
    from triton_moe.backends import triton_interpreter_enabled

    if triton_interpreter_enabled():
        return False
    import torch
    return torch.cuda.is_available()


def main(argv: Optional[Sequence[str]] = None) -> int:
    has_gpu = gpu_present()
    args, workloads = parse_args(argv, has_gpu)
    from bench import driver
    from triton_moe import decode
    saved = dict(decode.DECODE_CONFIG)
    if args.no_decode_path:
        decode.DECODE_CONFIG["max_pairs"] = 0  # decode_fits: never
    try:
        if has_gpu:
            return driver.run_gpu(args, workloads, quant_options(args))
        return driver.run_cpu(args, workloads, quant_options(args))
    finally:
        decode.DECODE_CONFIG.update(saved)


if __name__ == "__main__":
    sys.exit(main())
