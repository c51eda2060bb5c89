"""Time the CuTe DSL grouped GEMM on the default workload (SPEC 8), beside the Triton one.

    python -m cutlass_backend.bench_gemm [--json PATH] [--iters 20]

GEMM1: P = 65536 rows (M=8192, top-8) over E = 256 experts, Kin = 2048 -> Nout = 1024;
GEMM2: Kin = 512 -> Nout = 2048. Random quantized inputs (design.md layouts),
act_block_m = 128 (and 1: per-token scales), block_n = 64, G = 4, bf16 out. Per backend:
the first call (compile), then warm-up, then the median of ``--iters`` calls timed one by
one with CUDA events
(operands are 640 MB / 144 MB, far above the 50 MB L2, so every call streams from HBM).
The same calls are also replayed from a CUDA graph (device time without launch gaps).
Also the host-side cost of one call (Python argument packing + launch) on a tiny problem.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import time

import torch

import cutlass_backend

# name: (Kin, Nout, act_block_m); the per-token row exercises the per-row-scale variant
SHAPES = {"gemm1": (2048, 1024, 128), "gemm2": (512, 2048, 128),
          "gemm1_per_token": (2048, 1024, 1)}
NUM_ROWS, NUM_EXPERTS = 65536, 256


def make_inputs(k_in, n_out, *, num_rows=NUM_ROWS, num_experts=NUM_EXPERTS, act_block_m=128,
                block_n=64, block_k=128, super_group_size=4, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    picks = torch.randint(0, num_experts, (num_rows,), device="cuda", generator=gen)
    counts = torch.bincount(picks, minlength=num_experts)
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device="cuda")
    expert_offsets[1:] = counts.cumsum(0)
    scale_row_offsets = torch.zeros_like(expert_offsets)
    scale_row_offsets[1:] = ((counts + act_block_m - 1) // act_block_m).cumsum(0)
    num_k_blocks = k_in // block_k
    num_groups = -(-num_k_blocks // super_group_size)
    num_scale_rows = -(-num_rows // act_block_m) + num_experts

    def ints(lo, hi, shape, dtype):
        return torch.randint(lo, hi, shape, device="cuda", generator=gen, dtype=dtype)

    problem = dict(
        a_q=ints(-128, 128, (num_rows, k_in), torch.int8),
        a_qscale=ints(1, 17, (num_scale_rows, num_k_blocks), torch.int32),
        a_fscale=torch.rand(num_scale_rows, num_groups, device="cuda", generator=gen) * 1e-3,
        b_q=ints(-128, 128, (num_experts, n_out, k_in), torch.int8),
        b_qscale=ints(1, 17, (num_experts, n_out // block_n, num_k_blocks), torch.int32),
        b_fscale=torch.rand(num_experts, n_out // block_n, num_groups, device="cuda",
                            generator=gen) * 1e-3,
        expert_offsets=expert_offsets, scale_row_offsets=scale_row_offsets)
    params = dict(act_block_m=act_block_m, block_n=block_n, block_k=block_k,
                  super_group_size=super_group_size, out_dtype=torch.bfloat16)
    return problem, params


def time_calls(fn, iters):
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times), max(times)


def time_graph(fn, reps=10, iters=5):
    """Device time per call: median over ``iters`` replays of a CUDA graph of ``reps``
    calls (no host launch gaps, unlike ``time_calls``)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    del graph
    return statistics.median(times)


def backends():
    found = {"cutlass": cutlass_backend.grouped_gemm}
    try:
        from triton_moe.gemm import grouped_gemm as triton_gemm

        found["triton"] = triton_gemm
    except Exception as exc:  # the Triton GEMM is another helper's; report, don't fail
        print(f"triton GEMM not timed: {type(exc).__name__}: {exc}")
    return found


def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    import triton

    rows = []
    for gemm_name, (k_in, n_out, act_block_m) in SHAPES.items():
        problem, params = make_inputs(k_in, n_out, act_block_m=act_block_m)
        valid_rows = int(problem["expert_offsets"][-1])
        ops = 2.0 * valid_rows * n_out * k_in
        outputs = {}
        for backend, fn in backends().items():
            call = lambda: fn(**problem, **params)   # noqa: E731
            try:
                torch.cuda.synchronize()
                start = time.perf_counter()
                outputs[backend] = call()
                torch.cuda.synchronize()
                first_call_s = time.perf_counter() - start
                for _ in range(args.warmup):
                    call()
                median_ms, min_ms, max_ms = time_calls(call, args.iters)
            except Exception as exc:
                print(f"{gemm_name}/{backend} failed: {type(exc).__name__}: {exc}")
                continue
            try:
                graph_ms = time_graph(call)
            except Exception as exc:
                print(f"{gemm_name}/{backend}: no CUDA-graph timing ({type(exc).__name__}: {exc})")
                graph_ms = float("nan")
            rows.append(dict(gemm=gemm_name, backend=backend, k_in=k_in, n_out=n_out,
                             act_block_m=act_block_m, rows=valid_rows, experts=NUM_EXPERTS,
                             median_ms=median_ms, min_ms=min_ms, max_ms=max_ms,
                             graph_ms=graph_ms, tops=ops / median_ms / 1e9,
                             graph_tops=ops / graph_ms / 1e9, first_call_s=first_call_s))
        if "cutlass" in outputs and "triton" in outputs:
            diff = (outputs["cutlass"][:valid_rows].float()
                    - outputs["triton"][:valid_rows].float()).abs()
            scale = outputs["triton"][:valid_rows].float().abs().max().item()
            print(f"{gemm_name}: max |cutlass - triton| = {diff.max().item():.3e} "
                  f"(max |out| {scale:.3e})")
        del problem, outputs
        torch.cuda.empty_cache()

    # host cost of one call: tiny problem, no sync between calls
    problem, params = make_inputs(256, 64, num_rows=64, num_experts=2)
    cutlass_backend.grouped_gemm(**problem, **params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(200):
        cutlass_backend.grouped_gemm(**problem, **params)
    host_us = (time.perf_counter() - start) / 200 * 1e6
    torch.cuda.synchronize()

    print(f"\n{'gemm':16} {'backend':8} {'Kin':>5} {'Nout':>5} {'abm':>4} {'eager ms':>9} "
          f"{'graph ms':>9} {'graph TOPS':>10} {'first call s':>12}")
    for row in rows:
        print(f"{row['gemm']:16} {row['backend']:8} {row['k_in']:5d} {row['n_out']:5d} "
              f"{row['act_block_m']:4d} {row['median_ms']:9.4f} {row['graph_ms']:9.4f} "
              f"{row['graph_tops']:10.1f} {row['first_call_s']:12.1f}")
    print(f"cutlass host-side cost per call (tiny problem): {host_us:.1f} us")

    result = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        cutlass_dsl=version("nvidia-cutlass-dsl"), cuda=torch.version.cuda,
        workload=dict(rows=NUM_ROWS, experts=NUM_EXPERTS, block_n=64,
                      block_k=128, super_group_size=4, out_dtype="bfloat16"),
        timing=(f"median_ms: median of {args.iters} eager calls, CUDA events around each "
                f"(launch gaps included), after {args.warmup} warm-up calls; graph_ms: "
                f"median of 5 replays of a CUDA graph of 10 calls, per call"),
        host_us_per_call=host_us, results=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
