"""The benchmark product (`python -m bench`): arguments, records, the no-GPU demo end to end,
and the bf16 grouped-GEMM baseline against the fp32 truth.

CPU only except the last test (@gpu), which runs the real GPU path on a tiny shape.
"""
import contextlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench import baselines, driver, harness, report
from bench.cli import parse_args, quant_options
from bench.harness import percentile, summarize
from bench.runners import Runner, auto_copies
from bench.shapes import PRESETS, forward_ops
from reference.moe import moe_float

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------ arguments
def test_default_shape_depends_on_gpu():
    _, (workload,) = parse_args([], has_gpu=True)
    assert (workload.name, workload.num_tokens, workload.hidden, workload.intermediate,
            workload.num_experts, workload.top_k) == ("35B-A3B", 8192, 2048, 512, 256, 8)
    _, (demo,) = parse_args([], has_gpu=False)
    assert (demo.num_tokens, demo.hidden, demo.intermediate, demo.num_experts,
            demo.top_k) == (16, 256, 128, 8, 2)


@pytest.mark.parametrize("name, dims", [
    ("qwen3-30b-a3b", (2048, 768, 128, 8)),
    ("mixtral-8x7b", (4096, 14336, 8, 2)),
    ("deepseek-v3", (7168, 2048, 256, 8)),
    ("35b-a3b", (2048, 512, 256, 8)),  # names are case-insensitive
])
def test_presets(name, dims):
    _, (workload,) = parse_args(["--shape", name])
    assert (workload.hidden, workload.intermediate, workload.num_experts,
            workload.top_k) == dims
    assert workload.num_tokens == 8192


def test_deepseek_routing():
    _, (workload,) = parse_args(["--shape", "deepseek-v3"])
    assert workload.routing == {"scoring": "sigmoid", "renormalize": True,
                                "num_expert_group": 8, "topk_group": 4,
                                "routed_scaling_factor": 2.5}
    assert workload.correction_bias


def test_explicit_shape_overrides_preset():
    args, (workload,) = parse_args(["--num-tokens", "64", "--hidden", "512", "--intermediate",
                                    "256", "--num-experts", "16", "--top-k", "4"])
    assert (workload.name, workload.num_tokens, workload.hidden, workload.intermediate,
            workload.num_experts, workload.top_k) == ("custom", 64, 512, 256, 16, 4)
    _, (named,) = parse_args(["--shape", "mixtral-8x7b", "--num-experts", "4"])
    assert named.name == "mixtral-8x7b-custom" and named.num_experts == 4
    assert named.hidden == 4096


def test_token_sweep_and_several_shapes():
    _, workloads = parse_args(["--shape", "35B-A3B,qwen3-30b-a3b", "--tokens", "1,16,64"])
    assert [(w.name, w.num_tokens) for w in workloads] == [
        ("35B-A3B", 1), ("35B-A3B", 16), ("35B-A3B", 64),
        ("qwen3-30b-a3b", 1), ("qwen3-30b-a3b", 16), ("qwen3-30b-a3b", 64)]


def test_options_parse():
    args, _ = parse_args(["--backends", "triton,bf16", "--dtype", "fp16", "--block-n", "128",
                          "--block-k", "128", "--q-max", "8", "--super-group-size", "2",
                          "--scale-rounding", "nearest", "--act-block-m", "1", "--warmup",
                          "0", "--iters", "7", "--json", "--plot", "x.png", "--profile"])
    assert args.backends == ["triton", "bf16"]
    assert (args.dtype, args.block_n, args.q_max, args.super_group_size) == ("fp16", 128, 8, 2)
    assert (args.scale_rounding, args.act_block_m, args.warmup, args.iters) == (
        "nearest", 1, 0, 7)
    assert args.json == os.path.join("bench", "results", "latest.json")
    assert args.plot == "x.png" and args.profile
    args, _ = parse_args([])
    assert args.json is None and args.act_block_m == 1 and args.backends is None
    args, _ = parse_args(["--backends", "all"])
    assert set(args.backends) == {"triton", "cutlass", "torch", "bf16", "vllm", "sglang"}


@pytest.mark.parametrize("argv", [
    ["--tokens", "0"],
    ["--tokens", "1,x"],
    ["--tokens", ","],
    ["--num-tokens", "-3"],
    ["--num-tokens", "8", "--tokens", "1,2"],  # mutually exclusive
    ["--shape", "no-such-model"],
    ["--backends", "triton,nope"],
    ["--dtype", "int8"],
    ["--scale-rounding", "up"],
    ["--act-block-m", "0"],
    ["--act-block-m", "big"],
    ["--hidden", "200"],  # not a multiple of block_k 128
    ["--intermediate", "96"],
    ["--top-k", "300"],  # more than E = 256
    ["--shape", "deepseek-v3", "--num-experts", "12"],  # 12 experts in 8 groups
    ["--iters", "0"],
])
def test_bad_values_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_large_shape_refused_without_gpu(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--shape", "deepseek-v3"], has_gpu=False)
    assert exc.value.code == 2
    assert "no GPU" in capsys.readouterr().err


def test_help_lists_presets_and_backends(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in list(PRESETS) + ["--tokens", "--json", "--plot", "--profile", "grouped_mm",
                                 "vllm", "sglang", "cutlass"]:
        assert word in text


# ------------------------------------------------------------------------ records
def _fake_records():
    env = report.environment("fake GPU")
    ceilings = {"int8_tops": 1000.0, "bf16_tflops": 500.0, "copy_gbps": 3000.0}
    _, (workload,) = parse_args(["--num-tokens", "64"])
    records = []
    for backend, median, int8 in (("bf16", 2.0, False), ("triton", 0.5, True)):
        timing = {"median_ms": median, "p10_ms": 0.9 * median, "p90_ms": 1.2 * median,
                  "graph": True, "stages": {"gemm1": 0.2, "gemm2": 0.1} if int8 else {}}
        records.append(report.make_record(
            backend=backend, workload=workload, dtype="bf16", env=env, timing=timing,
            rel_err=0.01, rel_err_tokens=64, int8=int8, weight_bytes_per_expert=1e6,
            experts_hit=100.0, ceilings=ceilings, copies=4, warmup=1, iters=10,
            quant={"block_n": 64} if int8 else None))
    records.append(report.make_record(backend="torch", workload=workload, dtype="bf16",
                                      env=env, status="skipped", note="too slow"))
    report.add_speedups(records)
    return workload, records


def test_record_schema_and_metrics(tmp_path):
    workload, records = _fake_records()
    path = tmp_path / "out" / "r.json"
    report.write_json(records, str(path))
    loaded = json.loads(path.read_text())
    assert isinstance(loaded, list) and len(loaded) == 3
    for record in loaded:
        assert set(report.RECORD_FIELDS) <= set(record)
        assert isinstance(record["graph"], bool) and isinstance(record["stages"], dict)
        assert record["device"] == "fake GPU" and record["torch"] == torch.__version__
    baseline, triton, skipped = loaded
    ops = forward_ops(workload)
    assert ops == 2 * 64 * 8 * 2048 * 1024 + 2 * 64 * 8 * 512 * 2048
    assert triton["tops"] == pytest.approx(ops / 0.5e-3 / 1e12)
    assert triton["pct_peak_tops"] == pytest.approx(100 * triton["tops"] / 1000.0)
    assert baseline["pct_peak_tops"] == pytest.approx(100 * baseline["tops"] / 500.0)
    nbytes = 100 * 1e6 + 2 * 64 * 2048 * 2 + 64 * 8 * 8
    assert triton["gbps"] == pytest.approx(nbytes / 0.5e-3 / 1e9)
    assert triton["speedup_vs_bf16"] == pytest.approx(4.0)
    assert baseline["speedup_vs_bf16"] == pytest.approx(1.0)
    assert skipped["median_ms"] is None and skipped["speedup_vs_bf16"] is None
    assert skipped["status"] == "skipped"
    assert (triton["M"], triton["K"], triton["N"], triton["E"], triton["top_k"]) == (
        64, 2048, 512, 256, 8)


def test_tables_and_plot(tmp_path):
    _, records = _fake_records()
    table = report.results_table(records)
    for word in ("bf16", "triton", "torch", "rel_err", "4.00", "graph", "[1] too slow"):
        assert word in table
    assert "gemm1" in report.stages_table(records)
    assert "TOP/s" in report.ceilings_line(records[0]["ceilings"])
    pytest.importorskip("matplotlib")
    png = tmp_path / "plot.png"
    report.plot(records, str(png))
    assert png.stat().st_size > 1000


def test_oracle_diff():
    _, records = _fake_records()
    want = torch.randn(4, 8)
    outputs = {"torch": want, "triton": want.clone(), "bf16": want + 1}
    report.add_oracle_diffs(records, outputs)
    assert records[1]["rel_diff_vs_torch"] == 0.0
    assert records[0]["rel_diff_vs_torch"] is None  # unquantized: not an emulation


def test_statistics_and_copies():
    values = [float(v) for v in range(11)]
    assert percentile(values, 10) == pytest.approx(1.0)
    assert percentile(values, 90) == pytest.approx(9.0)
    assert summarize(values) == {"median_ms": 5.0, "p10_ms": 1.0, "p90_ms": 9.0}
    l2 = 50 << 20
    small = PRESETS["35B-A3B"].with_tokens(1)
    assert auto_copies(small, 2, l2) >= 8  # ~25 MB per call: several rotations needed
    assert auto_copies(PRESETS["35B-A3B"], 2, l2) == 2  # 512 MB of weights per call
    assert auto_copies(PRESETS["deepseek-v3"].with_tokens(65536), 2, l2) == 2


# ------------------------------------------------------------------------ baseline
def _random_routing(num_tokens, num_experts, top_k, gen, skip_expert=None):
    """Distinct experts per token; `skip_expert` receives no token (an empty group)."""
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if skip_expert is not None:
        scores[:, skip_expert] = -1.0
    topk_ids = scores.topk(top_k, dim=1).indices.to(torch.int32)
    topk_weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    return topk_weights / topk_weights.sum(1, keepdim=True), topk_ids


@pytest.mark.parametrize("use_grouped_mm", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_baseline_matches_moe_float(use_grouped_mm, dtype):
    if use_grouped_mm and baselines.probe_grouped_mm("cpu", dtype) is not None:
        pytest.skip(baselines.probe_grouped_mm("cpu", dtype))
    gen = torch.Generator().manual_seed(0)
    num_tokens, hidden, inter, num_experts, top_k = 24, 256, 128, 8, 2
    hidden_states = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden ** -0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) * inter ** -0.5).to(dtype)
    topk_weights, topk_ids = _random_routing(num_tokens, num_experts, top_k, gen, skip_expert=3)
    out = baselines.grouped_mm_moe(hidden_states, w13, w2, topk_weights, topk_ids,
                                   use_grouped_mm=use_grouped_mm)
    assert out.dtype == dtype and out.shape == (num_tokens, hidden)
    truth = moe_float(hidden_states, w13, w2, topk_weights, topk_ids)
    rel = float((out.double() - truth.double()).norm() / truth.double().norm())
    # fp32: summation order only. bf16: the GEMM outputs, SiLU*up, the routing weight and
    # the scatter-add each round to 8 bits (2**-9 relative), a few of them in a row
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel < tol


def test_probe_reports_missing_grouped_mm(monkeypatch):
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    assert "_grouped_mm" in baselines.probe_grouped_mm("cpu", torch.bfloat16)


def test_peer_unavailable_says_why():
    for name in baselines.PEER_MODULES:
        reason = baselines.peer_unavailable(name)
        assert reason is None or "not installed" in reason


# ------------------------------------------------------------------------ GPU flow on CPU
class _FakeEvent:
    """torch.cuda.Event stand-in: host wall clock."""

    def __init__(self, enable_timing=False):
        self.stamp = None

    def record(self, stream=None):
        self.stamp = time.perf_counter()

    def elapsed_time(self, other):
        return (other.stamp - self.stamp) * 1e3

    def query(self):
        return True  # the fake GPU is always done: the host never gets ahead of it


class _FakeGraph:
    def replay(self):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """Replace the torch.cuda calls the harness makes, so the GPU code path (events, graph
    capture and its fallback, stages, NVTX) runs on CPU. `fake_cuda["capture_fails"] = True`
    makes graph capture raise as a host sync inside capture does."""
    state = {"capture_fails": False, "nvtx": [], "spins": []}

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None, capture_error_mode="global", **kwargs):
        yield
        if state["capture_fails"]:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    class Props:
        L2_cache_size = 50 << 20

    class Stream:
        def wait_stream(self, other):
            pass

    cuda = torch.cuda
    for name, value in {
        "Event": _FakeEvent, "CUDAGraph": _FakeGraph, "graph": graph,
        "synchronize": lambda *a, **k: None, "empty_cache": lambda: None,
        "Stream": Stream, "stream": lambda s: contextlib.nullcontext(),
        "current_stream": lambda *a: Stream(),
        "graph_pool_handle": lambda: None, "get_device_name": lambda *a: "Fake GPU",
        "current_device": lambda: 0, "get_device_properties": lambda *a: Props(),
        "_sleep": lambda cycles: state["spins"].append(cycles),
    }.items():
        monkeypatch.setattr(cuda, name, value, raising=False)
    monkeypatch.setattr(cuda.profiler, "start", lambda: state["nvtx"].append("start"))
    monkeypatch.setattr(cuda.profiler, "stop", lambda: state["nvtx"].append("stop"))
    monkeypatch.setattr(cuda.nvtx, "range_push", lambda name: state["nvtx"].append(name))
    monkeypatch.setattr(cuda.nvtx, "range_pop", lambda: state["nvtx"].append("pop"))
    return state


def _staged_runner():
    def run(i, callback=None):
        for stage in report.STAGE_ORDER + ("end",):
            if callback is not None:
                callback(stage)
            time.sleep(1e-4)
        return torch.full((4, 8), float(i + 1))
    return Runner("fake", run, int8=True, weight_bytes_per_expert=1.0, stages=True)


@pytest.mark.parametrize("capture_fails", [False, True])
def test_benchmark_runner_graph_and_fallback(fake_cuda, capture_fails):
    fake_cuda["capture_fails"] = capture_fails
    result = harness.benchmark_runner(_staged_runner(), copies=3, warmup=1, iters=6)
    assert result["graph"] is not capture_fails
    if capture_fails:
        assert "capture failed" in result["graph_note"] and result["graph_output"] is None
    else:
        assert torch.equal(result["graph_output"], torch.full((4, 8), 1.0))  # copy 0
    assert 0 < result["p10_ms"] <= result["median_ms"] <= result["p90_ms"]
    assert set(result["stages"]) == set(report.STAGE_ORDER)
    assert all(ms > 0 for ms in result["stages"].values())


@pytest.mark.parametrize("host_ahead", [True, False])
def test_benchmark_runner_graph_timing_modes(fake_cuda, host_ahead):
    """Graph replays are timed with the host queued ahead (a spin before every chunk of
    calls, outside the timed pairs) unless ``host_ahead=False``; a chunk whose spin had
    ended before it was enqueued is reported, and the next spin is twice as long."""
    result = harness.benchmark_runner(_staged_runner(), copies=3, warmup=1,
                                      iters=2 * harness.HOST_AHEAD_CHUNK + 1,
                                      host_ahead=host_ahead)
    assert result["graph"]
    if host_ahead:
        assert result["timing"] == "host ahead"
        assert result["graph_note"] == "host fell behind the GPU in 3 of 3 chunks"
        base = harness.HOST_AHEAD_SPIN_CYCLES
        assert fake_cuda["spins"] == [base] + [base, 2 * base, 4 * base]  # warm-up, timed
    else:
        assert result["timing"] == "per call" and result["graph_note"] is None
        assert fake_cuda["spins"] == []
    assert 0 < result["p10_ms"] <= result["median_ms"] <= result["p90_ms"]


def test_profile_nvtx_ranges(fake_cuda):
    harness.profile_once([_staged_runner()])
    pushes = [e for e in fake_cuda["nvtx"] if e not in ("pop", "start", "stop")]
    assert fake_cuda["nvtx"][0] == "start" and fake_cuda["nvtx"][-1] == "stop"
    assert pushes == ["moe_forward[fake]"] + list(report.STAGE_ORDER)
    assert fake_cuda["nvtx"].count("pop") == len(pushes)  # balanced


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU tier: drives the GPU code path on CPU tensors, which needs "
                           "the Triton interpreter (the GPU tier runs the real path)")
def test_gpu_driver_flow_on_cpu(fake_cuda, monkeypatch, tmp_path, capsys):
    """driver.run_gpu end to end on CPU tensors with the fake timing layer: the baseline is
    graph-captured, the torch backend is not tried (it syncs), records and files come out."""
    ceilings = {"int8_tops": 900.0, "bf16_tflops": 700.0, "copy_gbps": 3000.0}
    monkeypatch.setattr(harness, "measure_ceilings", lambda: dict(ceilings))
    path, png = tmp_path / "r.json", tmp_path / "p.png"
    args, workloads = parse_args(["--shape", "demo", "--tokens", "8,16", "--backends",
                                  "torch,bf16", "--iters", "3", "--warmup", "1", "--rotate",
                                  "2", "--json", str(path), "--plot", str(png), "--profile"])
    assert driver.run_gpu(args, workloads, quant_options(args), torch.device("cpu")) == 0
    out = capsys.readouterr()
    assert "Fake GPU" in out.out and "[2/2] demo M=16 torch" in out.err
    records = json.loads(path.read_text())
    assert [(r["backend"], r["M"]) for r in records] == [
        ("bf16", 8), ("torch", 8), ("bf16", 16), ("torch", 16)]
    for record in records:
        assert record["status"] == "ok" and record["median_ms"] > 0
        assert record["rel_err"] < 0.1 and record["ceilings"] == ceilings
        assert record["speedup_vs_bf16"] > 0 and record["experts_hit"] >= 2
    baseline, oracle = records[0], records[1]
    assert baseline["graph"] and baseline["quant"] is None and baseline["stages"] == {}
    assert not oracle["graph"] and "syncs the host" in oracle["note"]
    assert oracle["rel_diff_vs_torch"] == 0.0 and oracle["quant"]["q_max"] == 16
    if _has_matplotlib():
        assert png.stat().st_size > 1000
    assert fake_cuda["nvtx"].count("start") == 2  # one profiled forward set per workload


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------------ end to end
def _run_bench(argv, env_extra, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
    return subprocess.run([sys.executable, "-m", "bench", *argv], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_no_gpu_demo_end_to_end(tmp_path):
    """`python -m bench` without a GPU: says so, prints a correctness table (no timings)
    for triton and torch on CPU under the interpreter, writes the JSON records."""
    path = tmp_path / "demo.json"
    proc = _run_bench(["--backends", "triton,torch,bf16", "--json", str(path)],
                      {"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No CUDA GPU" in proc.stdout
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in ("triton", "torch", "bf16")}
    assert set(rows) == {"triton", "torch", "bf16"}
    assert all(" ok" in row and " demo " in row for row in rows.values())
    assert "ms" not in proc.stdout.split("rel_err")[0].splitlines()[-1]  # no timing columns
    records = {r["backend"]: r for r in json.loads(path.read_text())}
    for name in ("triton", "torch", "bf16"):
        assert records[name]["status"] == "ok"
        assert records[name]["median_ms"] is None
        # int8 blockwise on random data lands near 1e-2; 0.1 means something is broken
        assert 0 <= records[name]["rel_err"] < 0.1
    assert records["torch"]["rel_diff_vs_torch"] == 0.0


@pytest.mark.gpu
def test_gpu_run_end_to_end(tmp_path):
    """The real GPU path on a tiny shape: timings, graph capture, stages, JSON, plot."""
    path, png = tmp_path / "gpu.json", tmp_path / "gpu.png"
    proc = _run_bench(["--shape", "demo", "--tokens", "16,64", "--backends", "triton,torch,bf16",
                       "--warmup", "2", "--iters", "10", "--json", str(path), "--plot",
                       str(png), "--profile"], {}, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads(path.read_text())
    assert len(records) == 6 and png.stat().st_size > 1000
    for record in records:
        assert record["status"] == "ok", record
        assert record["median_ms"] > 0 and record["p10_ms"] <= record["p90_ms"]
        assert record["rel_err"] < 0.1 and record["tops"] > 0 and record["gbps"] > 0
        assert record["device"] == torch.cuda.get_device_name()
        if record["backend"] in ("triton", "bf16"):
            assert record["graph"], record["note"]  # both are meant to be capturable
        if record["backend"] == "triton":
            assert set(record["stages"]) == set(report.STAGE_ORDER)
            assert record["speedup_vs_bf16"] > 0
    assert all(record["ceilings"]["bf16_tflops"] > 0 for record in records)


def test_reference_design_options_reach_quantize_weights():
    args, _ = parse_args(["--super-group-size", "256", "--scale-rounding", "nearest",
                          "--allow-int32-overflow"], has_gpu=False)
    options = quant_options(args)
    assert options["super_group_size"] == 256 and options["allow_int32_overflow"]
    assert options["scale_rounding"] == "nearest"
    args, _ = parse_args([], has_gpu=False)
    assert "allow_int32_overflow" not in quant_options(args)


def test_git_commit_of_an_exported_copy_is_not_the_outer_repository(tmp_path, monkeypatch):
    """A tree exported into another repository's directory (as sent to a GPU machine)
    must not report the outer repository's HEAD as its own commit; $GIT_COMMIT names it."""
    import subprocess

    from bench import report

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.setattr(report, "REPO_ROOT", str(tmp_path / "exported"))
    (tmp_path / "exported").mkdir()
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    assert report.git_commit() is None
    monkeypatch.setenv("GIT_COMMIT", "abc1234")
    assert report.git_commit() == "abc1234"


def test_no_decode_path_flag_sends_small_batches_through_the_general_path(monkeypatch):
    """--no-decode-path turns the small-batch path off for the run (so both can be
    compared with `python -m bench`) and restores the configuration afterwards."""
    from bench import cli
    from triton_moe import decode

    seen = []
    monkeypatch.setattr(cli, "gpu_present", lambda: False)
    monkeypatch.setattr(driver, "run_cpu", lambda *a: seen.append(
        (decode.DECODE_CONFIG["max_pairs"], decode.decode_fits(8, 256, 3 << 20))) or 0)
    before = dict(decode.DECODE_CONFIG)
    assert cli.main(["--no-decode-path"]) == 0
    assert cli.main([]) == 0
    assert seen == [(0, False), (before["max_pairs"], True)]
    assert decode.DECODE_CONFIG == before
