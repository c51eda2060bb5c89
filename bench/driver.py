"""The two runs `python -m bench` can make: the GPU benchmark and the no-GPU correctness demo.

Both go workload by workload: weights (kept across a token sweep), inputs, the fp32 truth,
then every selected backend on those same tensors, one record each.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from bench import report, runners
from bench.runners import (BASELINE, LIBRARY_BACKENDS, PEERS, RUN_ORDER, DTYPES, Layer,
                           make_inputs, make_layer, make_runner, reference_output,
                           relative_error)
from bench.shapes import Workload, forward_ops

TORCH_MAX_ITERS = 20  # timed calls of the slow torch backend, whatever --iters says


def library_status(device: str) -> dict[str, Optional[str]]:
    """{library backend: None if it runs on `device`, else why not}, from
    triton_moe.available_backends(); if that raises, backend by backend, so one broken
    backend does not hide the others."""
    try:
        import triton_moe
    except Exception as exc:
        reason = f"triton_moe does not import: {_describe(exc)}"
        return {name: reason for name in LIBRARY_BACKENDS}
    try:
        return dict(triton_moe.available_backends(device))
    except Exception:
        from triton_moe.backends import unavailable_reason
    status = {}
    for name in LIBRARY_BACKENDS:
        try:
            status[name] = unavailable_reason(name, device)
        except Exception as exc:
            status[name] = f"availability check failed: {_describe(exc)}"
    return status


def select_backends(requested: Optional[list[str]], has_gpu: bool,
                    device: Optional[str] = None) -> tuple[list[str], dict[str, str]]:
    """(backends to run, in run order; {backend: why it is skipped}).

    Without --backends every available backend runs and the unavailable ones are listed
    once; a backend named in --backends but unavailable gets a "skipped" record."""
    status = library_status(device or ("cuda" if has_gpu else "cpu"))
    reasons: dict[str, str] = {}
    for name in LIBRARY_BACKENDS:
        why = status.get(name, "not reported by triton_moe.available_backends()")
        if why:
            reasons[name] = why
    for name in PEERS:
        why = "needs a CUDA GPU" if not has_gpu else runners.baselines.peer_unavailable(name)
        if why:
            reasons[name] = why
    if not has_gpu:
        reasons.setdefault("cutlass", "needs a CUDA GPU")
    if requested is None:
        selected = [name for name in RUN_ORDER if name not in reasons]
        if reasons:
            print("unavailable here: " + "; ".join(
                f"{name} ({reasons[name]})" for name in RUN_ORDER if name in reasons),
                flush=True)
    else:
        selected = [name for name in RUN_ORDER if name in requested]
    return selected, reasons


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_cpu(args: argparse.Namespace, workloads: list[Workload], quant: dict) -> int:
    """Correctness table on CPU under the Triton interpreter: no timings."""
    print("No CUDA GPU available (or TRITON_INTERPRET=1): running on CPU under the Triton "
          "interpreter. Correctness only, no timings.", flush=True)
    torch.set_float32_matmul_precision("highest")
    selected, reasons = select_backends(args.backends, has_gpu=False)
    env = report.environment("cpu (Triton interpreter)")
    dtype = DTYPES[args.dtype]
    records = []
    for index, workload in enumerate(workloads, 1):
        print(f"[{index}/{len(workloads)}] {workload.describe()} {args.dtype}", flush=True)
        layer = make_layer(workload, dtype, "cpu", quant, seed=args.seed)
        inputs = make_inputs(workload, layer, copies=1, device="cpu", seed=args.seed + 1)
        truth = reference_output(layer, inputs.hidden[0], inputs.topk_weights[0],
                                 inputs.topk_ids[0])
        outputs: dict[str, torch.Tensor] = {}
        first = len(records)
        for name in selected:
            common = dict(backend=name, workload=workload, dtype=args.dtype, env=env,
                          rel_err_tokens=workload.num_tokens, act_bytes=dtype.itemsize,
                          experts_hit=inputs.experts_hit,
                          quant=quant if name in LIBRARY_BACKENDS else None)
            if name in reasons:
                records.append(report.make_record(status="skipped", note=reasons[name],
                                                  **common))
                continue
            try:
                runner = make_runner(name, layer, inputs)
                out = runner.run(0, None)
                rel_err = relative_error(out, truth)
                outputs[name] = out
                records.append(report.make_record(
                    rel_err=rel_err, note=runner.note, int8=runner.int8,
                    weight_bytes_per_expert=runner.weight_bytes_per_expert, **common))
            except Exception as exc:
                records.append(report.make_record(status="error", note=_describe(exc),
                                                  **common))
            _progress(f"  {name}: rel_err {_fmt_err(records[-1]['rel_err'])} "
                      f"{records[-1]['status']}")
        report.add_oracle_diffs(records[first:], outputs)
    print()
    print(report.results_table(records, timed=False), flush=True)
    _write_outputs(args, records, timed=False)
    return 1 if any(r["status"] == "error" for r in records) else 0


def run_gpu(args: argparse.Namespace, workloads: list[Workload], quant: dict,
            device: Optional[torch.device] = None) -> int:
    """The benchmark. `device` defaults to the current CUDA device (tests pass CPU with a
    fake torch.cuda timing layer)."""
    from bench import harness
    torch.set_float32_matmul_precision("highest")  # the fp32 truth must not use TF32
    device = device or torch.device("cuda", torch.cuda.current_device())
    device_name = torch.cuda.get_device_name(device)
    env = report.environment(device_name)
    print(f"device: {device_name} | torch {env['torch']} | triton {env['triton']} | "
          f"commit {env['commit']}", flush=True)
    selected, reasons = select_backends(args.backends, has_gpu=True, device=device.type)
    ceilings = harness.measure_ceilings()
    print(report.ceilings_line(ceilings), flush=True)
    dtype = DTYPES[args.dtype]
    l2_bytes = harness.l2_cache_bytes(device)
    records: list[dict] = []
    layer: Optional[Layer] = None
    for index, workload in enumerate(workloads, 1):
        key = runners.layer_key(workload, dtype)
        if layer is None or runners.layer_key(layer.workload, dtype) != key:
            layer = None  # free the previous layer's weights first
            torch.cuda.empty_cache()
            try:
                layer = make_layer(workload, dtype, device, quant, seed=args.seed)
            except torch.OutOfMemoryError as exc:
                _progress(f"{workload.describe()}: weights do not fit: {_describe(exc)}")
                records += [report.make_record(backend=name, workload=workload,
                                               dtype=args.dtype, env=env, status="error",
                                               note="weights do not fit in GPU memory",
                                               ceilings=ceilings) for name in selected]
                torch.cuda.empty_cache()
                continue
        copies = args.rotate or runners.auto_copies(workload, dtype.itemsize, l2_bytes)
        case = f"[{index}/{len(workloads)}] {workload.name} M={workload.num_tokens}"
        rows = min(workload.num_tokens, args.check_tokens)
        try:
            inputs = make_inputs(workload, layer, copies, device, seed=args.seed + 1)
            truth = reference_output(layer, inputs.hidden[0][:rows],
                                     inputs.topk_weights[0][:rows], inputs.topk_ids[0][:rows])
        except Exception as exc:  # e.g. out of memory: report it, go on with the next case
            inputs = truth = None
            torch.cuda.empty_cache()
            note = f"inputs or fp32 truth failed: {_describe(exc)}"
            for name in selected:
                records.append(report.make_record(backend=name, workload=workload,
                                                  dtype=args.dtype, env=env, status="error",
                                                  note=note, ceilings=ceilings))
            _progress(f"{case}: {note}")
            continue
        timed_runners = []
        outputs: dict[str, torch.Tensor] = {}
        first = len(records)
        for name in selected:
            common = dict(backend=name, workload=workload, dtype=args.dtype, env=env,
                          rel_err_tokens=rows, act_bytes=dtype.itemsize,
                          experts_hit=inputs.experts_hit, ceilings=ceilings, copies=copies,
                          warmup=args.warmup, iters=args.iters,
                          quant=quant if name in LIBRARY_BACKENDS else None)
            skip = reasons.get(name)
            if (skip is None and name == "torch" and args.backends is None
                    and forward_ops(workload) > args.torch_max_ops):
                skip = (f"reference path skipped: {forward_ops(workload):.1e} ops > "
                        f"--torch-max-ops {args.torch_max_ops:.0e} (name it in --backends "
                        f"to force)")
            if skip:
                records.append(report.make_record(status="skipped", note=skip, **common))
                _progress(f"{case} {name}: skipped ({skip})")
                continue
            if name == "torch" and args.iters > TORCH_MAX_ITERS:
                common["iters"] = TORCH_MAX_ITERS  # the oracle is slow; its time matters less
            record, runner, out = _run_one_gpu(name, layer, inputs, truth, args, common)
            records.append(record)
            if out is not None:
                outputs[name] = out
            if runner is not None:
                timed_runners.append(runner)
            _progress(f"{case} {name}: {_fmt_ms(record)} rel_err {_fmt_err(record['rel_err'])}"
                      f" {record['status'] if record['status'] != 'ok' else ''}")
        report.add_oracle_diffs(records[first:], outputs)
        if args.profile and timed_runners:
            harness.profile_once(timed_runners)
            _progress(f"{case}: profiled one forward of {', '.join(r.name for r in timed_runners)}")
        del timed_runners, inputs, truth, outputs
        torch.cuda.empty_cache()
    report.add_speedups(records, BASELINE)
    print()
    print(report.ceilings_line(ceilings))
    print(report.results_table(records, timed=True))
    stages = report.stages_table(records)
    if stages:
        print("\nper-stage eager ms (stage_callback + CUDA events):")
        print(stages)
    sys.stdout.flush()
    _write_outputs(args, records, timed=True)
    return 1 if any(r["status"] == "error" for r in records) else 0


def _run_one_gpu(name, layer, inputs, truth, args, common):
    """First call (compile, accuracy), then timing.

    Returns (record, runner or None, the eager output's first rows or None)."""
    from bench import harness
    try:
        runner = make_runner(name, layer, inputs)  # int8 backends quantize here, once
    except ImportError as exc:  # a peer that is installed but does not import
        return report.make_record(status="skipped", note=_describe(exc), **common), None, None
    except Exception as exc:
        torch.cuda.empty_cache()
        return report.make_record(status="error", note=_describe(exc), **common), None, None
    note = runner.note
    out = None
    try:
        out = runner.run(0, None)[:truth.shape[0]].clone()  # the first call compiles: untimed
        torch.cuda.synchronize()
        rel_err = relative_error(out, truth)
        timing = harness.benchmark_runner(runner, inputs.copies, args.warmup,
                                          common["iters"], use_graph=not args.no_graph,
                                          host_ahead=not args.host_bound_timing)
        graph_out = timing.pop("graph_output", None)
        if graph_out is not None:
            graph_err = relative_error(graph_out, truth)
            if abs(graph_err - rel_err) > 0.05 * rel_err + 1e-6:
                note = _join(note, f"graph replay error {graph_err:.2e} != eager {rel_err:.2e}")
            rel_err = max(rel_err, graph_err)
            del graph_out
        note = _join(note, timing.get("graph_note"))
        record = report.make_record(status="ok", note=note, timing=timing, rel_err=rel_err,
                                    int8=runner.int8,
                                    weight_bytes_per_expert=runner.weight_bytes_per_expert,
                                    **common)
        return record, runner, out
    except Exception as exc:  # one backend failing must not stop the others
        del out
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return report.make_record(status="error", note=_join(note, _describe(exc)),
                                  **common), None, None


def _write_outputs(args, records: list[dict], timed: bool) -> None:
    if args.json:
        report.write_json(records, args.json)
        print(f"wrote {len(records)} records to {args.json}")
    if args.plot:
        if not timed:
            print("--plot: no timings without a GPU, nothing to plot")
        else:
            report.plot(records, args.plot)
            print(f"wrote {args.plot}")


def _describe(exc: BaseException, limit: int = 240) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _join(*parts) -> str:
    return "; ".join(p for p in parts if p)


def _fmt_ms(record: dict) -> str:
    if record["median_ms"] is None:
        return "-"
    mode = "graph" if record["graph"] else "eager"
    return f"{record['median_ms']:.3f} ms ({mode})"


def _fmt_err(value) -> str:
    return "-" if value is None else f"{value:.2e}"
