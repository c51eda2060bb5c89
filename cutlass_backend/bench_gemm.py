"""Time every CuTe DSL grouped-GEMM tile variant on the default workload, beside Triton.

    python -m cutlass_backend.bench_gemm [--json PATH] [--tiles a,b] [--shapes gemm1,...]
                                         [--iters 20] [--warmup 3]

Workload (SPEC 8): P = 65536 rows (M=8192, top-8) over E = 256 experts (multinomial
counts); GEMM1 Kin = 2048 -> Nout = 1024, GEMM2 Kin = 512 -> Nout = 2048; random quantized
inputs (design.md layouts), block_n = 64, block_k = 128, G = 4, bf16 out; act_block_m 128
(the "tile" scale mode of the 128-row tiles) and 1 (per-token scales: the "rows" mode).
Per shape: the Triton kernel (``triton_moe.gemm.grouped_gemm``, its default config), then
every name of ``cutlass_backend.gemm.tile_names()`` (``tile=``; the Hopper ``sm90_*``
tiles on sm_90 only). Per run: the first call
(includes the DSL / Triton compile), warm-up, the median of ``--iters`` eager calls timed
one by one with CUDA events (operands are 144-640 MB, far above the 50 MB L2, so every
call streams from HBM), and the per-call device time of a CUDA graph of 10 calls.

Checks, per run: every valid row against the Triton output (bound: one bf16 ulp plus
2**-16 * max|out| for fp32 summation-order differences), and the rows of the first 4
experts against ``reference.gemm`` (same bound); a failed check marks the row "FAIL" and
the exit status is 1. Also the host-side cost of one call (argument packing + launch).
"""
from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import math
import statistics
import sys
import time

import torch

import cutlass_backend

# name: (Kin, Nout, act_block_m); the per-token rows exercise the per-row-scale variant
SHAPES = {"gemm1": (2048, 1024, 128), "gemm2": (512, 2048, 128),
          "gemm1_per_token": (2048, 1024, 1), "gemm2_per_token": (512, 2048, 1)}
NUM_ROWS, NUM_EXPERTS = 65536, 256
DEVICE = "cuda"
REF_EXPERTS = 4          # experts checked against reference.gemm (a prefix of the rows)


def make_inputs(k_in, n_out, *, num_rows=NUM_ROWS, num_experts=NUM_EXPERTS, act_block_m=128,
                block_n=64, block_k=128, super_group_size=4, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    picks = torch.randint(0, num_experts, (num_rows,), device=DEVICE, generator=gen)
    counts = torch.bincount(picks, minlength=num_experts)
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=DEVICE)
    expert_offsets[1:] = counts.cumsum(0)
    scale_row_offsets = torch.zeros_like(expert_offsets)
    scale_row_offsets[1:] = ((counts + act_block_m - 1) // act_block_m).cumsum(0)
    num_k_blocks = k_in // block_k
    num_groups = -(-num_k_blocks // super_group_size)
    num_scale_rows = -(-num_rows // act_block_m) + num_experts

    def ints(lo, hi, shape, dtype):
        return torch.randint(lo, hi, shape, device=DEVICE, generator=gen, dtype=dtype)

    problem = {
        "a_q": ints(-128, 128, (num_rows, k_in), torch.int8),
        "a_qscale": ints(1, 17, (num_scale_rows, num_k_blocks), torch.int32),
        "a_fscale": torch.rand(num_scale_rows, num_groups, device=DEVICE, generator=gen) * 1e-3,
        "b_q": ints(-128, 128, (num_experts, n_out, k_in), torch.int8),
        "b_qscale": ints(1, 17, (num_experts, n_out // block_n, num_k_blocks), torch.int32),
        "b_fscale": torch.rand(num_experts, n_out // block_n, num_groups, device=DEVICE,
                            generator=gen) * 1e-3,
        "expert_offsets": expert_offsets, "scale_row_offsets": scale_row_offsets}
    params = {"act_block_m": act_block_m, "block_n": block_n, "block_k": block_k,
                  "super_group_size": super_group_size, "out_dtype": torch.bfloat16}
    return problem, params


def reference_prefix(problem, params, num_experts):
    """reference.gemm on the first ``num_experts`` experts: (rows, out [rows, Nout])."""
    from reference import gemm as ref_gemm

    offsets = problem["expert_offsets"][:num_experts + 1]
    scale_offsets = problem["scale_row_offsets"][:num_experts + 1]
    rows, scale_rows = int(offsets[-1]), int(scale_offsets[-1])
    sub = {"a_q": problem["a_q"][:rows], "a_qscale": problem["a_qscale"][:scale_rows],
               "a_fscale": problem["a_fscale"][:scale_rows], "b_q": problem["b_q"][:num_experts],
               "b_qscale": problem["b_qscale"][:num_experts],
               "b_fscale": problem["b_fscale"][:num_experts], "expert_offsets": offsets,
               "scale_row_offsets": scale_offsets}
    return rows, ref_gemm.grouped_gemm(**sub, **params)


def mismatches(out, expected):
    """(#elements off, max |out - expected|) under one bf16 ulp + 2**-16 * max|expected|."""
    out, expected = out.float(), expected.float()
    err = (out - expected).abs()
    bound = 2.0**-7 * torch.maximum(out.abs(), expected.abs()) \
        + 2.0**-16 * expected.abs().max()
    bad = (err > bound) | torch.isnan(out)
    return int(bad.sum()), float(err.max())


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


def triton_gemm():
    try:
        from triton_moe.gemm import grouped_gemm

        return grouped_gemm
    except Exception as exc:  # noqa: BLE001 -- report, don't fail
        print(f"triton GEMM not timed: {type(exc).__name__}: {exc}")
        return None


def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_one(call, args):
    """(output of the first call, first-call s, (median, min, max) eager ms, graph ms)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = call()
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start
    for _ in range(args.warmup):
        call()
    eager = time_calls(call, args.iters)
    try:
        graph_ms = time_graph(call)
    except Exception as exc:  # noqa: BLE001 -- report, time the rest
        print(f"  no CUDA-graph timing ({type(exc).__name__}: {exc})")
        graph_ms = float("nan")
    return out, first_call_s, eager, graph_ms


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiles", help="comma-separated tile names (default: all of "
                        "cutlass_backend.gemm.tile_names(): SM80 and, on Hopper, sm90_*)")
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma-separated, of {', '.join(SHAPES)}")
    args = parser.parse_args()

    import triton

    from cutlass_backend import gemm as cute_gemm
    from cutlass_backend import gemm_sm90

    hopper = torch.cuda.get_device_capability()[0] == 9
    tiles = args.tiles.split(",") if args.tiles else [
        t for t in cute_gemm.tile_names() if hopper or t not in gemm_sm90.SM90_TILE_CONFIGS]
    shapes = args.shapes.split(",")
    triton_fn = triton_gemm()
    t_start = time.perf_counter()
    rows, failures = [], 0
    for gemm_name in shapes:
        k_in, n_out, act_block_m = SHAPES[gemm_name]
        problem, params = make_inputs(k_in, n_out, act_block_m=act_block_m)
        valid_rows = int(problem["expert_offsets"][-1])
        ops = 2.0 * valid_rows * n_out * k_in
        ref_rows, ref = reference_prefix(problem, params, REF_EXPERTS)
        default_tile = cute_gemm.select_tile(NUM_ROWS, NUM_EXPERTS, params["block_n"])
        runs = [("triton", "-", functools.partial(triton_fn, **problem, **params))
                 ] if triton_fn else []
        runs += [("cutlass", tile, functools.partial(cutlass_backend.grouped_gemm, **problem,
                                                     **params, tile=tile)) for tile in tiles]
        triton_out, triton_ms = None, None
        for backend, tile, call in runs:
            label = f"{gemm_name}/{backend}/{tile}"
            try:
                out, first_call_s, (median_ms, min_ms, max_ms), graph_ms = run_one(call, args)
            except Exception as exc:  # noqa: BLE001 -- report, time the rest
                print(f"{label} failed: {type(exc).__name__}: {exc}", flush=True)
                failures += 1
                continue
            bad_ref, err_ref = mismatches(out[:ref_rows], ref)
            bad_tri, err_tri = (0, 0.0) if triton_out is None else \
                mismatches(out[:valid_rows], triton_out[:valid_rows])
            time_ms = median_ms if math.isnan(graph_ms) else graph_ms   # graph, if it ran
            if backend == "triton":
                triton_out, triton_ms = out, time_ms
            ok = bad_ref == 0 and bad_tri == 0
            failures += not ok
            row = {
                "gemm": gemm_name, "backend": backend, "tile": tile, "k_in": k_in,
                "n_out": n_out, "act_block_m": act_block_m, "rows": valid_rows,
                "experts": NUM_EXPERTS, "median_ms": median_ms, "min_ms": min_ms,
                "max_ms": max_ms, "graph_ms": graph_ms, "tops": ops / median_ms / 1e9,
                "graph_tops": ops / graph_ms / 1e9, "first_call_s": first_call_s,
                "vs_triton": time_ms / triton_ms if triton_ms else None,
                "default_tile": tile == default_tile, "ref_rows": ref_rows, "ref_bad": bad_ref,
                "ref_max_err": err_ref, "triton_bad": bad_tri, "triton_max_err": err_tri,
                "ok": ok}
            if backend == "cutlass" and tile in gemm_sm90.SM90_TILE_CONFIGS:
                row.update(config=gemm_sm90.SM90_TILE_CONFIGS[tile].describe(),
                           scale_mode="wgmma")
            elif backend == "cutlass":
                cfg = cute_gemm.TILE_CONFIGS[tile]
                row.update(config=cfg.describe(), scale_mode=cute_gemm.scale_mode_for(
                    tile, act_block_m, params["block_n"]))
            rows.append(row)
            print(f"{label}: graph {graph_ms:.4f} ms, eager {median_ms:.4f} ms, first call "
                  f"{first_call_s:.1f} s, {'ok' if ok else 'FAIL'} (ref {bad_ref} off, "
                  f"triton {bad_tri} off, max err {err_tri:.2e})  "
                  f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
            del out
        del problem, triton_out, ref
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

    print(f"\n{'gemm':16} {'backend/tile':28} {'mode':7} {'eager ms':>9} {'graph ms':>9} "
          f"{'TOP/s':>6} {'/triton':>7} {'1st s':>5} check")
    for row in rows:
        name = "triton" if row["backend"] == "triton" else row["tile"]
        if row.get("default_tile"):
            name += " *"
        ratio = f"{row['vs_triton']:7.2f}" if row["vs_triton"] else f"{'-':>7}"
        print(f"{row['gemm']:16} {name:28} {row.get('scale_mode', '-'):7} "
              f"{row['median_ms']:9.4f} {row['graph_ms']:9.4f} {row['graph_tops']:6.0f} "
              f"{ratio} {row['first_call_s']:5.1f} {'ok' if row['ok'] else 'FAIL'}")
    for gemm_name in shapes:
        best = min((r for r in rows if r["gemm"] == gemm_name and r["backend"] == "cutlass"
                    and r["ok"]), key=lambda r: r["graph_ms"], default=None)
        if best is not None:
            ratio = f", {best['vs_triton']:.2f}x triton" if best["vs_triton"] else ""
            print(f"best cutlass {gemm_name}: {best['tile']} ({best['config']}) "
                  f"{best['graph_ms']:.4f} ms{ratio}")
    print(f"(* = default tile; graph ms = per call in a CUDA graph of 10; /triton = graph "
          f"ms ratio, eager if no graph)\ncutlass host-side cost per call (tiny problem): "
          f"{host_us:.1f} us; "
          f"total {time.perf_counter() - t_start:.0f} s; {failures} failed")

    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__,
        "cutlass_dsl": version("nvidia-cutlass-dsl"), "cuda": torch.version.cuda,
        "workload": {"rows": NUM_ROWS, "experts": NUM_EXPERTS, "block_n": 64,
                      "block_k": 128, "super_group_size": 4, "out_dtype": "bfloat16"},
        "timing": (f"median_ms: median of {args.iters} eager calls, CUDA events around each "
                f"(launch gaps included), after {args.warmup} warm-up calls; graph_ms: "
                f"median of 5 replays of a CUDA graph of 10 calls, per call"),
        "host_us_per_call": host_us, "failures": failures, "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
