"""Results: one record (a flat dict, JSON-ready) per backend x workload, the terminal
tables, the JSON file and the plot."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from typing import Optional

from bench.shapes import Workload, forward_bytes, forward_ops

# every record has at least these keys (tests/test_bench.py checks them)
RECORD_FIELDS = (
    "backend", "shape", "M", "K", "N", "E", "top_k", "dtype", "status", "note",
    "median_ms", "p10_ms", "p90_ms", "tops", "gbps", "pct_peak_tops", "pct_peak_gbps",
    "rel_err", "rel_err_tokens", "rel_diff_vs_torch", "speedup_vs_bf16", "graph", "stages",
    "routing", "quant",
    "ops", "bytes", "experts_hit", "copies", "warmup", "iters", "ceilings",
    "device", "torch", "triton", "commit", "timestamp",
)
STAGE_ORDER = ("permute_quantize", "gemm1", "silu_quantize", "gemm2", "unpermute")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def environment(device_name: str) -> dict:
    """Fields shared by every record of a run."""
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton missing: the torch backend still runs
        triton_version = None
    return {"device": device_name, "torch": torch.__version__, "triton": triton_version,
            "commit": git_commit(), "python": platform.python_version(),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def git_commit() -> Optional[str]:
    """$GIT_COMMIT if set, else HEAD of the repository this code lives in (with "-dirty"
    for uncommitted changes to tracked files), else None. A checkout nested in another
    repository's tree without its own .git (an exported copy) has no commit of its own:
    git would answer for the outer repository, so that answer is not taken."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        if top.returncode != 0 or os.path.realpath(top.stdout.strip()) != os.path.realpath(REPO_ROOT):
            return None
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10)
        if head.returncode == 0 and head.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
            return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _mode(record: dict) -> str:
    """"graph" (replays timed with the host queued ahead), "graph/call" (replays timed one
    event pair per call, host submission included: ``--host-bound-timing``) or "eager"."""
    if not record["graph"]:
        return "eager"
    return "graph/call" if record.get("timing") == "per call" else "graph"


def make_record(*, backend: str, workload: Workload, dtype: str, env: dict,
                status: str = "ok", note: str = "", timing: Optional[dict] = None,
                rel_err: Optional[float] = None, rel_err_tokens: Optional[int] = None,
                int8: bool = True, weight_bytes_per_expert: Optional[float] = None,
                experts_hit: Optional[float] = None, act_bytes: int = 2,
                ceilings: Optional[dict] = None, quant: Optional[dict] = None,
                copies: Optional[int] = None, warmup: Optional[int] = None,
                iters: Optional[int] = None) -> dict:
    """One result row. `timing` is bench.harness.benchmark_runner's dict (or None: no
    timing, e.g. on CPU or for a skipped backend). speedup_vs_bf16 is filled in later by
    `add_speedups`, once the baseline of the same workload is known."""
    timing = timing or {}
    ceilings = ceilings or {}
    ops = forward_ops(workload)
    nbytes = None
    if weight_bytes_per_expert is not None and experts_hit is not None:
        nbytes = forward_bytes(workload, experts_hit, weight_bytes_per_expert, act_bytes)
    median = timing.get("median_ms")
    tops = ops / median / 1e9 if median else None
    gbps = nbytes / median / 1e6 if median and nbytes else None
    peak_tops = ceilings.get("int8_tops" if int8 else "bf16_tflops")
    peak_gbps = ceilings.get("copy_gbps")
    record = {
        "backend": backend, "shape": workload.name, "M": workload.num_tokens,
        "K": workload.hidden, "N": workload.intermediate, "E": workload.num_experts,
        "top_k": workload.top_k, "dtype": dtype, "status": status, "note": note,
        "median_ms": median, "p10_ms": timing.get("p10_ms"), "p90_ms": timing.get("p90_ms"),
        "tops": tops, "gbps": gbps,
        "pct_peak_tops": 100 * tops / peak_tops if tops and peak_tops else None,
        "pct_peak_gbps": 100 * gbps / peak_gbps if gbps and peak_gbps else None,
        "rel_err": rel_err, "rel_err_tokens": rel_err_tokens, "rel_diff_vs_torch": None,
        "speedup_vs_bf16": None,
        "graph": bool(timing.get("graph", False)), "timing": timing.get("timing"),
        "stages": dict(timing.get("stages", {})),
        "routing": {k: v for k, v in workload.routing.items()},
        "quant": dict(quant) if quant is not None else None,
        "ops": ops, "bytes": nbytes, "experts_hit": experts_hit, "copies": copies,
        "warmup": warmup, "iters": iters, "ceilings": dict(ceilings),
    }
    record.update(env)
    return record


def add_speedups(records: list[dict], baseline: str = "bf16") -> None:
    """speedup_vs_bf16 = baseline median / backend median, per (shape, M, K, N, E, top_k)."""
    def key(r):
        return (r["shape"], r["M"], r["K"], r["N"], r["E"], r["top_k"], r["dtype"])
    base = {key(r): r["median_ms"] for r in records
            if r["backend"] == baseline and r["median_ms"]}
    for record in records:
        ref = base.get(key(record))
        if ref and record["median_ms"]:
            record["speedup_vs_bf16"] = ref / record["median_ms"]


def add_oracle_diffs(records: list[dict], outputs: dict, oracle: str = "torch") -> None:
    """rel_diff_vs_torch = ||out - out_torch|| / ||out_torch|| for the INT8 backends of one
    workload, when the torch backend (the exact emulation of SPEC 3-7) ran: 0 means the
    backend reproduces the oracle's arithmetic bit for bit."""
    if oracle not in outputs:
        return
    want = outputs[oracle].double()
    for record in records:
        got = outputs.get(record["backend"])
        if got is not None and record["quant"] is not None:
            diff = (got.double() - want).norm() / want.norm().clamp_min(1e-300)
            record["rel_diff_vs_torch"] = float(diff)


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def results_table(records: list[dict], timed: bool = True) -> str:
    """The main table. Error is always printed next to time: speed means nothing without it."""
    from tabulate import tabulate
    with_oracle = any(r.get("rel_diff_vs_torch") is not None for r in records)
    notes: dict[str, int] = {}
    rows = []
    for r in records:
        row = [r["backend"], r["shape"], r["M"]]
        if timed:
            spread = (f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}"
                      if r["p10_ms"] is not None else "-")
            row += [_fmt(r["median_ms"], ".3f"), spread,
                    _mode(r) if r["median_ms"] else "-",
                    _fmt(r["tops"], ".1f"), _fmt(r["pct_peak_tops"], ".0f"),
                    _fmt(r["gbps"], ".0f"), _fmt(r["pct_peak_gbps"], ".0f"),
                    _fmt(r["speedup_vs_bf16"], ".2f")]
        row += [_fmt(r["rel_err"], ".2e")]
        if with_oracle:
            row += [_fmt(r.get("rel_diff_vs_torch"), ".1e")]
        row += [r["status"], _footnote(notes, r["note"])]
        rows.append(row)
    headers = ["backend", "shape", "M"]
    if timed:
        headers += ["ms", "p10-p90", "mode", "TOP/s", "%peak", "GB/s", "%bw", "vs bf16"]
    headers += ["rel_err"] + (["diff vs torch"] if with_oracle else []) + ["status", "note"]
    table = tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)
    return "\n".join([table] + [f"[{n}] {text}" for text, n in notes.items()])


def _footnote(notes: dict[str, int], text: str) -> str:
    """Notes are long (graph fallbacks, skip reasons): the table shows [n], listed below."""
    if not text:
        return ""
    return f"[{notes.setdefault(text, len(notes) + 1)}]"


def stages_table(records: list[dict]) -> str:
    """Per-stage eager milliseconds of the backends that report stages ("" if none)."""
    from tabulate import tabulate
    with_stages = [r for r in records if r.get("stages")]
    if not with_stages:
        return ""
    names = list(STAGE_ORDER)
    for r in with_stages:
        names += [n for n in r["stages"] if n not in names]
    rows = [[r["backend"], r["shape"], r["M"]] + [_fmt(r["stages"].get(n), ".3f") for n in names]
            + [_fmt(sum(r["stages"].values()), ".3f")] for r in with_stages]
    return tabulate(rows, headers=["backend", "shape", "M"] + names + ["sum (eager)"],
                    tablefmt="simple", disable_numparse=True)


def ceilings_line(ceilings: dict) -> str:
    return ("ceilings measured now: int8 GEMM {} TOP/s (torch._int_mm), bf16 GEMM {} TFLOP/s "
            "(torch.mm), copy {} GB/s (device to device)").format(
                _fmt(ceilings.get("int8_tops"), ".0f", "n/a"),
                _fmt(ceilings.get("bf16_tflops"), ".0f", "n/a"),
                _fmt(ceilings.get("copy_gbps"), ".0f", "n/a"))


def write_json(records: list[dict], path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(records, handle, indent=1, default=_json_default)
        handle.write("\n")


def _json_default(value):
    if hasattr(value, "tolist"):  # a tensor or numpy value that slipped in
        return value.tolist()
    return str(value)


def plot(records: list[dict], path: str) -> None:
    """Time and speedup vs tokens, one row of two panels per shape, one line per backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in records if r["median_ms"]]
    shapes = list(dict.fromkeys(r["shape"] for r in timed))
    if not shapes:
        print(f"no timed records: {path} not written", file=sys.stderr)
        return
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 4 * len(shapes)), squeeze=False)
    for row, shape in enumerate(shapes):
        ax_time, ax_speed = axes[row]
        of_shape = [r for r in timed if r["shape"] == shape]
        for backend in dict.fromkeys(r["backend"] for r in of_shape):
            points = sorted((r["M"], r["median_ms"], r["speedup_vs_bf16"])
                            for r in of_shape if r["backend"] == backend)
            tokens = [p[0] for p in points]
            ax_time.plot(tokens, [p[1] for p in points], marker="o", label=backend)
            speed = [(p[0], p[2]) for p in points if p[2] is not None]
            if speed:
                ax_speed.plot([s[0] for s in speed], [s[1] for s in speed], marker="o",
                              label=backend)
        ax_time.set(xscale="log", yscale="log", xlabel="tokens (M)", ylabel="median ms",
                    title=f"{shape}: forward time")
        ax_speed.set(xscale="log", xlabel="tokens (M)", ylabel="x vs bf16 grouped",
                     title=f"{shape}: speedup vs bf16 grouped_mm")
        ax_speed.axhline(1.0, color="grey", linewidth=0.8)
        for ax in (ax_time, ax_speed):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    device = timed[0]["device"] if timed else ""
    fig.suptitle(f"INT8 hybrid MoE forward on {device}")
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
