"""GPU timing: CUDA events around every call, CUDA-graph replay where a backend allows it,
a per-stage breakdown through stage_callback, the device ceilings, and NVTX profiling.

Rules every measurement here follows:
- never time a first call (Triton and the CuTe DSL compile on first use): callers run the
  backend before timing, and `--warmup` more calls run untimed;
- one pair of events per call, read only after a device synchronize, so p10/p90 are per
  call and launch gaps of eager backends are counted (they are part of eager cost);
- graph replays are timed with the host queued ahead of the GPU (`time_replays`): an event
  pair around a replay otherwise measures the host's submission whenever the graph runs
  shorter than the host takes to launch it (a graph of one tiny kernel timed 13.8 us per
  replay that way on the H100 machine, session 9), not the GPU's time;
- inputs rotate among several copies (bench.runners.Inputs).
"""
from __future__ import annotations

import math
import statistics
from typing import Callable, Optional

import torch

from bench.runners import Runner


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(times_ms: list[float]) -> dict:
    return {"median_ms": statistics.median(times_ms), "p10_ms": percentile(times_ms, 10),
            "p90_ms": percentile(times_ms, 90)}


def l2_cache_bytes(device=None) -> int:
    props = torch.cuda.get_device_properties(device or torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 50 << 20)


def time_calls(call: Callable[[int], object], iters: int, copies: int) -> list[float]:
    """Milliseconds of each of `iters` calls call(i % copies), from events on the current
    stream, read after one synchronize at the end."""
    return _event_times(call, iters, copies, spin=0)[0]


# Host-ahead timing: a spin kernel of HOST_AHEAD_SPIN_CYCLES (about 2 ms at 2 GHz) holds the
# stream before every HOST_AHEAD_CHUNK calls, time for the host to enqueue them all (graph
# replays cost it ~15 us each); it lies outside every timed event pair.
HOST_AHEAD_CHUNK = 16
HOST_AHEAD_SPIN_CYCLES = 4_000_000


def time_replays(call: Callable[[int], object], iters: int,
                 copies: int) -> tuple[list[float], int]:
    """Milliseconds of each of `iters` calls call(i % copies) as the GPU runs them back to
    back: before every HOST_AHEAD_CHUNK calls the stream spins (``torch.cuda._sleep``)
    while the host enqueues the chunk's calls and events, so no event pair waits for the
    host. Returns the times and the number of chunks where the host did not get ahead (the
    spin had ended before the chunk was enqueued; the spin doubles for the next chunk)."""
    return _event_times(call, iters, copies, spin=HOST_AHEAD_SPIN_CYCLES)


def _event_times(call: Callable[[int], object], iters: int, copies: int,
                 spin: int) -> tuple[list[float], int]:
    """`time_calls` (``spin`` 0: one event pair per call as issued) and `time_replays`
    (a spin of ``spin`` cycles before every HOST_AHEAD_CHUNK calls): the times in ms, and
    the chunks whose spin ended before they were enqueued."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    chunk = HOST_AHEAD_CHUNK if spin else max(iters, 1)
    behind = 0
    torch.cuda.synchronize()
    for first in range(0, iters, chunk):
        if spin:
            torch.cuda._sleep(spin)
            spun = torch.cuda.Event()
            spun.record()
        for it in range(first, min(first + chunk, iters)):
            starts[it].record()
            call(it % copies)
            ends[it].record()
        if spin and spun.query():  # the GPU was idle before the host finished enqueuing
            behind += 1
            spin *= 2
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)], behind


def capture_graphs(run: Callable[[int], torch.Tensor], copies: int):
    """One CUDA graph per input copy, sharing a memory pool (they never run concurrently).

    Returns (graphs, static outputs, None) or (None, None, reason) when capture fails, e.g.
    because the backend reads a device value on the host."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream before capture, as torch asks
        for i in range(copies):
            run(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    pool = torch.cuda.graph_pool_handle()
    graphs, outputs = [], []
    try:
        for i in range(copies):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = run(i)
            graphs.append(graph)
            outputs.append(out)
    except Exception as exc:  # capture refused: fall back to eager, say why
        del graphs, outputs
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return None, None, _first_line(exc)
    torch.cuda.synchronize()
    return graphs, outputs, None


def _first_line(exc: BaseException, limit: int = 200) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def time_stages(runner: Runner, copies: int, iters: int) -> dict[str, float]:
    """Median milliseconds per stage over `iters` eager calls: an event is recorded at each
    stage_callback(name); a stage lasts until the next callback ("end" closes the last)."""
    if not runner.stages:
        return {}
    marks_per_call = []
    torch.cuda.synchronize()
    for it in range(iters):
        marks: list[tuple[str, torch.cuda.Event]] = []

        def callback(name: str, marks=marks) -> None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append((name, event))

        runner.run(it % copies, callback)
        marks_per_call.append(marks)
    torch.cuda.synchronize()
    per_stage: dict[str, list[float]] = {}
    for marks in marks_per_call:
        for (name, start), (_, end) in zip(marks, marks[1:]):
            per_stage.setdefault(name, []).append(start.elapsed_time(end))
    return {name: statistics.median(times) for name, times in per_stage.items()}


def benchmark_runner(runner: Runner, copies: int, warmup: int, iters: int,
                     use_graph: bool = True, host_ahead: bool = True) -> dict:
    """Time the whole forward (graph replay if capture works, else eager) and its stages.

    The caller has already run the backend once (compile + accuracy check). Returns the
    timing summary, whether a graph was used, why not, how graph replays were timed
    (``timing``: "host ahead" by `time_replays`, or "per call" by `time_calls` when
    ``host_ahead`` is False, as before session 9), the graph's output for copy 0 (to check
    it against the eager one) and the stage breakdown."""
    result: dict = {"graph": False, "graph_note": runner.graph_hint, "graph_output": None,
                    "timing": "per call"}
    graphs = None
    if use_graph and runner.graph_hint is None:
        graphs, outputs, reason = capture_graphs(lambda i: runner.run(i, None), copies)
        if graphs is None:
            result["graph_note"] = f"capture failed, eager: {reason}"
        else:
            result["graph"] = True
            graphs[0].replay()
            torch.cuda.synchronize()
            result["graph_output"] = outputs[0].clone()
    elif not use_graph:
        result["graph_note"] = "--no-graph"
    if graphs is not None:
        def call(i):
            graphs[i].replay()
    else:
        def call(i):
            runner.run(i, None)
    if graphs is not None and host_ahead:
        time_replays(call, max(1, warmup), copies)  # untimed warm-up in the timed mode
        times, behind = time_replays(call, iters, copies)
        result["timing"] = "host ahead"
        if behind:
            result["graph_note"] = (f"host fell behind the GPU in {behind} of "
                                    f"{-(-iters // HOST_AHEAD_CHUNK)} chunks")
    else:
        time_calls(call, max(1, warmup), copies)  # untimed warm-up in the timed mode
        times = time_calls(call, iters, copies)
    result.update(summarize(times))
    del graphs
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    result["stages"] = time_stages(runner, copies, min(iters, 20))
    return result


def measure_ceilings(iters: int = 20) -> dict[str, Optional[float]]:
    """Peaks measured now on this device: int8 GEMM TOP/s (torch._int_mm, 8192^3), bf16
    GEMM TFLOP/s (torch.mm, 8192^3), device-to-device copy GB/s (1 GiB, read + write)."""
    ceilings: dict[str, Optional[float]] = {"int8_tops": None, "bf16_tflops": None,
                                            "copy_gbps": None}
    size = 8192
    ops = 2 * size ** 3
    gen = torch.Generator(device="cuda").manual_seed(0)
    a8 = torch.randint(-128, 128, (size, size), device="cuda", dtype=torch.int8,
                       generator=gen)
    b8 = torch.randint(-128, 128, (size, size), device="cuda", dtype=torch.int8,
                       generator=gen)
    # B column-major first ("TN", the layout cuBLASLt int8 kernels prefer), then row-major
    for b_layout in (b8.t(), b8):
        try:
            ceilings["int8_tops"] = _peak(lambda i: torch._int_mm(a8, b_layout), iters,
                                          ops / 1e9)
            ceilings.pop("int8_note", None)
            break
        except Exception as exc:  # _int_mm missing or refusing this layout here
            ceilings["int8_note"] = _first_line(exc)
    del a8, b8
    a16 = torch.randn(size, size, device="cuda", dtype=torch.bfloat16, generator=gen)
    b16 = torch.randn(size, size, device="cuda", dtype=torch.bfloat16, generator=gen)
    ceilings["bf16_tflops"] = _peak(lambda i: torch.mm(a16, b16), iters, ops / 1e9)
    del a16, b16
    nbytes = 1 << 30
    src = torch.empty(nbytes, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    ceilings["copy_gbps"] = _peak(lambda i: dst.copy_(src), iters, 2 * nbytes / 1e6)
    del src, dst
    torch.cuda.empty_cache()
    return ceilings


def _peak(call, iters: int, work_per_ms: float) -> float:
    """work / median time; `work_per_ms` is the work in the unit wanted per millisecond."""
    time_calls(call, 10, 1)  # also lets the clocks ramp up
    return work_per_ms / statistics.median(time_calls(call, iters, 1))


def profile_once(runners: list[Runner]) -> None:
    """One eager forward per backend between torch.cuda.profiler.start()/stop(), inside an
    NVTX range per backend and one per stage (nsys: -c cudaProfilerApi)."""
    nvtx = torch.cuda.nvtx
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    try:
        for runner in runners:
            open_ranges: list[str] = []

            def callback(name: str, open_ranges=open_ranges) -> None:
                if open_ranges:
                    nvtx.range_pop()
                    open_ranges.pop()
                if name != "end":
                    nvtx.range_push(name)
                    open_ranges.append(name)

            nvtx.range_push(f"moe_forward[{runner.name}]")
            runner.run(0, callback if runner.stages else None)
            for _ in open_ranges:
                nvtx.range_pop()
            nvtx.range_pop()
        torch.cuda.synchronize()
    finally:
        torch.cuda.profiler.stop()
