"""The accuracy report (`python -m bench.accuracy`, issue 6 item 4): the CLI, a tiny run's
JSON and markdown, and the single-GEMM yardstick's ordering at a reduced size. CPU only:
the whole-forward part runs the torch backend (the exact reference emulation)."""
import json

import pytest
import torch

from bench import accuracy
from bench.shapes import PRESETS


def test_cli_parses_defaults_and_options():
    parser = accuracy.build_parser()
    args = parser.parse_args([])
    assert args.shapes == list(accuracy.DEFAULT_SHAPES)
    assert (args.tokens, args.backend, args.device) == (accuracy.DEFAULT_TOKENS, "torch", None)
    assert args.gemm_shape == [2048, 256, 512]
    assert args.out_md.endswith("bench/results/accuracy.md")
    assert args.out_json.endswith("bench/results/accuracy.json")
    args = parser.parse_args(["--shapes", "demo", "35B-A3B", "--tokens", "32", "--seeds", "2",
                              "--device", "cpu", "--backend", "triton", "--out-md", "a.md",
                              "--out-json", "a.json", "--gemm-shape", "256", "128", "64"])
    assert args.shapes == ["demo", "35B-A3B"] and args.tokens == 32 and args.seeds == 2
    assert args.backend == "triton" and args.gemm_shape == [256, 128, 64]
    with pytest.raises(SystemExit):  # unknown shape preset
        parser.parse_args(["--shapes", "no-such-shape"])
    with pytest.raises(SystemExit):  # the cutlass backend has no place here
        parser.parse_args(["--backend", "cutlass"])


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exc:
        accuracy.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--backend" in out and "--out-json" in out and "35B-A3B" in out


def test_tiny_run_writes_json_and_markdown(tmp_path, capsys):
    md, js = tmp_path / "acc.md", tmp_path / "acc.json"
    argv = ["--shapes", "demo", "--tokens", "8", "--experts", "4", "--seeds", "1",
            "--gemm-seeds", "1",
            "--gemm-shape", "256", "128", "64", "--device", "cpu", "--backend", "torch",
            "--out-md", str(md), "--out-json", str(js), "--quiet"]
    assert accuracy.main(argv) == 0
    doc = json.loads(js.read_text())
    assert set(doc) >= {"meta", "gemm", "forward", "forward_per_seed", "goal", "meaning"}
    assert doc["meta"]["command"].startswith("python -m bench.accuracy --shapes demo")
    assert doc["meta"]["torch"] == torch.__version__ and doc["meta"]["device"] == "cpu"
    num_variants = len(accuracy.VARIANTS)
    cells = len(accuracy.DATASETS) * len(accuracy.ACT_SCALES) * num_variants
    assert len(doc["gemm"]) == cells
    assert len(doc["forward"]) == cells + len(accuracy.DATASETS)  # + the dtype floor rows
    for rec in doc["gemm"] + doc["forward"]:
        assert 0 < rec["rel_l2"] < 1, rec
    for rec in doc["forward"]:
        assert rec["shape"] == "demo" and rec["M"] == 8 and rec["backend"] == "torch"
        assert (rec["E"], rec["E_layer"]) == (4, PRESETS["demo"].num_experts)
        assert rec["max_abs"] > 0
        if rec["variant"] == "plain":
            assert rec["ratio_vs_plain"] == pytest.approx(1.0)
    verdicts = doc["goal"]["verdicts"]
    assert {v["dataset"] for v in verdicts} == set(accuracy.DATASETS)
    assert doc["goal"]["pass"] == all(v["pass"] for v in verdicts)
    text = md.read_text()
    assert text.startswith("# Accuracy")
    assert "## 1. One expert GEMM" in text and "## 2. The whole MoE forward" in text
    assert "| hybrid consistent, G=4 (default)" in text  # a GitHub-format table row
    assert "Overall: **" in text and doc["meaning"] in text
    assert text in capsys.readouterr().out + "\n"  # the report is also printed


def test_gemm_yardstick_order():
    """Issue 6's yardstick at a reduced size (K=1024: 8 K-blocks, 10 outlier channels):
    consistent rounding stays within a few % of plain float scales, the reference
    design's nearest rounding is far worse, most of all with outliers; per-token scales
    beat tiles on outliers."""
    records = accuracy.gemm_yardstick(hidden=1024, rows=128, cols=128, seeds=(0, 1))
    err = {(r["dataset"], r["act_scales"], r["variant"]): r["rel_l2"] for r in records}
    for dataset in accuracy.DATASETS:
        for scales in accuracy.ACT_SCALES:
            plain = err[(dataset, scales, "plain")]
            # consistent: Q*F >= s costs at most a factor (1 + 1/Q) of int8 step: a few %.
            assert plain <= err[(dataset, scales, "consistent-g4")] <= 1.10 * plain
            assert plain <= err[(dataset, scales, "consistent-g256")] <= 1.10 * plain
            assert err[(dataset, scales, "nearest-g256")] > 1.4 * plain
    assert err[("outliers", "tile", "nearest-g256")] > 1.5 * err[("outliers", "tile", "plain")]
    for variant in ("plain", "consistent-g4"):
        assert err[("outliers", "token", variant)] < 0.7 * err[("outliers", "tile", variant)]
    # the magnitudes issue 6 quotes: ~1.3% on Gaussian data with 128-row tiles
    assert 0.01 < err[("random", "tile", "plain")] < 0.016


def test_float64_exact_dots_gives_the_same_bits():
    """The float64 shortcut for the reference GEMM's integer dots changes no bit."""
    import triton_moe

    workload = PRESETS["demo"].with_tokens(12)
    w13, w2, _ = accuracy.make_layer(workload, seed=3, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(4)
    x = accuracy.make_activations(12, workload.hidden, gen)["outliers"].bfloat16()
    logits = torch.randn(12, workload.num_experts, generator=gen)
    topk_weights, topk_ids = triton_moe.route(logits, workload.top_k, backend="torch")
    for variant in ("nearest-g256", "consistent-g4"):
        weights = accuracy._hybrid_weights(w13, w2, accuracy.VARIANT_BY_NAME[variant])
        exact = triton_moe.moe_forward(x, weights, topk_weights, topk_ids, backend="torch")
        with accuracy.float64_exact_dots():
            fast = triton_moe.moe_forward(x, weights, topk_weights, topk_ids, backend="torch")
        assert torch.equal(exact, fast), variant


def test_goal_verdict():
    rows = []
    for dataset, plain, default in (("random", 0.020, 0.0215), ("outliers", 0.050, 0.056)):
        for variant, err in (("plain", plain), (accuracy.DEFAULT_VARIANT, default)):
            rows.append({"part": "forward", "shape": "s", "M": 1, "K": 1, "N": 1, "E": 1,
                         "E_layer": 1, "top_k": 1, "dtype": "bfloat16", "backend": "torch",
                         "device": "cpu",
                         "dataset": dataset, "variant": variant, "label": variant,
                         "act_scales": "tile", "act_block_m": 64, "seed": 0, "rel_l2": err,
                         "max_abs": 1.0, "truth_max_abs": 1.0})
    verdicts = {v["dataset"]: v for v in
                accuracy.goal_verdicts(accuracy.summarize_forward(rows))}
    assert verdicts["random"]["pass"] and verdicts["random"]["ratio_vs_plain"] == \
        pytest.approx(1.075)
    assert not verdicts["outliers"]["pass"]  # 1.12x > 1.10x


def test_one_super_group_cap_gives_the_same_bits():
    """G = 256 and G = (number of K-blocks) are both one super group: same output bits."""
    import triton_moe

    workload = PRESETS["demo"].with_tokens(12)  # K = 256, N = 128: at most 2 K-blocks
    assert accuracy.one_super_group_size(256, workload.hidden, workload.intermediate) == 2
    w13, w2, _ = accuracy.make_layer(workload, seed=5, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(6)
    x = accuracy.make_activations(12, workload.hidden, gen)["outliers"].bfloat16()
    logits = torch.randn(12, workload.num_experts, generator=gen)
    topk_weights, topk_ids = triton_moe.route(logits, workload.top_k, backend="torch")
    capped = accuracy._hybrid_weights(w13, w2, accuracy.VARIANT_BY_NAME["nearest-g256"])
    assert capped.config.super_group_size == 2
    full = triton_moe.quantize_weights(w13, w2, super_group_size=256,
                                       scale_rounding="nearest", allow_int32_overflow=True)
    for name in ("w13_q", "w13_qscale", "w13_fscale", "w2_q", "w2_qscale", "w2_fscale"):
        assert torch.equal(getattr(capped, name), getattr(full, name)), name
    assert torch.equal(
        triton_moe.moe_forward(x, capped, topk_weights, topk_ids, backend="torch"),
        triton_moe.moe_forward(x, full, topk_weights, topk_ids, backend="torch"))
