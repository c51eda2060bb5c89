"""The accuracy report (`python -m bench.accuracy`, issue 6 item 4): the CLI, a tiny run's
JSON and markdown, and the single-GEMM yardstick's ordering at a reduced size. CPU only:
the whole-forward part runs the torch backend (the exact reference emulation)."""
import json
import re

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
    for rec in doc["gemm"] + doc["forward"]:  # "(default)" only on the per-token G=4 rows
        default = (rec["variant"], rec["act_scales"]) == ("consistent-g4", "token")
        assert rec["label"].endswith("(default)") == default, rec
    verdicts = doc["goal"]["verdicts"]
    assert {(v["dataset"], v["act_scales"]) for v in verdicts} == {
        (d, a) for d in accuracy.DATASETS for a in accuracy.ACT_SCALES}
    assert doc["goal"]["pass"] == all(v["pass"] for v in verdicts if v["act_scales"] == "token")
    assert doc["goal"]["pass_reference_tiles"] == all(
        v["pass"] for v in verdicts if v["act_scales"] == "tile")
    text = md.read_text()
    assert text.startswith("# Accuracy")
    assert "## 1. One expert GEMM" in text and "## 2. The whole MoE forward" in text
    # GitHub-format table rows: the default is the per-token row, the tile row is unmarked
    assert re.search(r"\| hybrid consistent, G=4 \(default\) +\| per token ", text)
    assert re.search(r"\| hybrid consistent, G=4 +\| tile \(64 rows\) ", text)
    assert "**default**" in accuracy.gemm_table(doc["gemm"])
    assert "Overall: **" in text and "64-row tiles: **" in text and doc["meaning"] in text
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


def _summary(errors: dict) -> list[dict]:
    """summarize_forward of synthetic one-seed records: errors maps (shape, dataset,
    variant, act scales) to the relative L2 error."""
    rows = []
    for (shape, dataset, variant, act_scales), err in errors.items():
        rows.append({"part": "forward", "shape": shape, "M": 256, "K": 1, "N": 1, "E": 16,
                     "E_layer": 1, "top_k": 8, "dtype": "bfloat16", "backend": "torch",
                     "device": "cpu", "dataset": dataset, "variant": variant,
                     "label": accuracy.row_label(variant, act_scales),
                     "act_scales": act_scales,
                     "act_block_m": accuracy.act_block_rows(act_scales, 128), "seed": 0,
                     "rel_l2": err, "max_abs": 1.0, "truth_max_abs": 1.0})
    return accuracy.summarize_forward(rows)


def _errors(default_token, default_tile, shape="s"):
    """Plain blockwise errs 2% / 5% (random / outliers) with per-token scales and 4% / 10%
    with tiles; consistent G = 4 errs default_token / default_tile (random, outliers)
    times that, nearest G = 256 twice that."""
    plain = {("random", "token"): 0.02, ("outliers", "token"): 0.05,
             ("random", "tile"): 0.04, ("outliers", "tile"): 0.10}
    ratios = {"token": default_token, "tile": default_tile}
    errors = {}
    for (dataset, act_scales), err in plain.items():
        ratio = ratios[act_scales][accuracy.DATASETS.index(dataset)]
        errors[(shape, dataset, "plain", act_scales)] = err
        errors[(shape, dataset, accuracy.DEFAULT_VARIANT, act_scales)] = ratio * err
        errors[(shape, dataset, "nearest-g256", act_scales)] = 2 * err
    return errors


def test_default_is_the_librarys():
    """The report's default is the library's: consistent, G = 4, per-token scales."""
    import inspect

    import triton_moe
    from triton_moe.config import QuantConfig

    config = QuantConfig()
    assert (config.scale_rounding, config.super_group_size, config.act_block_m) == (
        accuracy.VARIANT_BY_NAME[accuracy.DEFAULT_VARIANT].scale_rounding,
        accuracy.VARIANT_BY_NAME[accuracy.DEFAULT_VARIANT].super_group_size,
        accuracy.act_block_rows(accuracy.DEFAULT_ACT_SCALES, 128))
    params = inspect.signature(triton_moe.quantize_weights).parameters
    assert params["act_block_m"].default == config.act_block_m
    assert accuracy.row_label("consistent-g4", "token") == "hybrid consistent, G=4 (default)"
    assert accuracy.row_label("consistent-g4", "tile") == "hybrid consistent, G=4"
    assert accuracy.row_label("plain", "token") == "plain blockwise, fp32 scales"


def test_goal_verdict():
    """The goal is judged on the default (per-token scales) against plain blockwise with
    per-token scales; the 128-row-tile comparison is reported beside it, not in "pass"."""
    errors = _errors(default_token=(1.075, 1.12), default_tile=(1.02, 1.03))
    verdicts = accuracy.goal_verdicts(_summary(errors))
    by_key = {(v["dataset"], v["act_scales"]): v for v in verdicts}
    assert set(by_key) == {(d, a) for d in accuracy.DATASETS for a in accuracy.ACT_SCALES}
    token = by_key[("random", "token")]
    assert token["pass"] and token["default"] and token["ratio_vs_plain"] == pytest.approx(1.075)
    assert token["rel_l2"] == pytest.approx(0.0215)
    assert not by_key[("outliers", "token")]["pass"]  # 1.12x > 1.10x
    assert by_key[("outliers", "tile")]["pass"] and not by_key[("outliers", "tile")]["default"]
    assert by_key[("outliers", "tile")]["act_block_m"] == 128
    assert not accuracy.goal_met(verdicts)  # the default fails on outliers
    assert accuracy.goal_met(verdicts, "tile")
    # and the other way round: tiles failing does not fail the default's goal
    verdicts = accuracy.goal_verdicts(_summary(_errors((1.03, 1.02), (1.2, 1.02))))
    assert accuracy.goal_met(verdicts) and not accuracy.goal_met(verdicts, "tile")
    assert not accuracy.goal_met([])


def test_meaning_paragraph_describes_the_default():
    errors = _errors(default_token=(1.03, 1.04), default_tile=(1.02, 1.03))
    errors.update(_errors((1.035, 1.02), (1.025, 1.01), shape="t"))
    summary = _summary(errors)
    verdicts = accuracy.goal_verdicts(summary)
    text = accuracy.meaning_paragraph([], summary, verdicts)
    assert text.startswith(
        "The default configuration (\"consistent\" scale rounding, G = 4, per-token "
        "activation scales) is within 4% of plain blockwise INT8 with fp32 block scales and "
        "the same per-token activation scales: on the whole MoE forward (K, N and top_k of s "
        "and t, 128 rows per expert, bfloat16) its relative L2 error against the fp32 "
        "forward with unquantized weights is 2.06%-2.07% on Gaussian activations and "
        "5.10%-5.20% with 1% of the channels x30, 1.02x-1.04x plain blockwise's: issue 6's "
        "accuracy goal (within 1.10x on both data sets) is met.")
    assert ("With the reference design's activation tiles (`act_block_m=\"auto\"`, 128 rows "
            "here), the setting issue 6 stated its goal for, consistent G = 4 errs "
            "4.08%-4.10% on Gaussian activations and 10.10%-10.30% with 1% of the channels "
            "x30, 1.01x-1.03x plain blockwise's with the same tiles (goal met there): "
            "per-token scales cut the error 2.0x on Gaussian and 2.0x on outlier "
            "activations.") in text
    assert ("errs 2.00x as much as plain blockwise with per-token scales (2.00x with the "
            "reference design's tiles)") in text
    assert "(default)" not in text and "tile-wise activation scales)" not in text
    # a default outside 1.10x is reported as such, whatever the tiles do
    failing = _summary(_errors(default_token=(1.2, 1.0), default_tile=(1.0, 1.0)))
    text = accuracy.meaning_paragraph([], failing, accuracy.goal_verdicts(failing))
    assert "per-token activation scales) is within 20% of" in text
    assert "is NOT met." in text and "(goal met there)" in text


def test_meaning_paragraph_yardstick_sentence():
    records = accuracy.gemm_yardstick(hidden=256, rows=128, cols=64, seeds=(0,))
    err = {(r["dataset"], r["act_scales"], r["variant"]): r["rel_l2"] for r in records}
    text = accuracy.meaning_paragraph(records, [], [])

    def pct(dataset, scales, variant):
        return f"{100 * err[(dataset, scales, variant)]:.2f}%"

    assert text.startswith("Issue 6's single-GEMM yardstick (Gaussian / outlier activations, "
                           "128 x 128 activation tiles as in the issue;")
    assert (f"consistent G = 4 {pct('random', 'tile', 'consistent-g4')} / "
            f"{pct('outliers', 'tile', 'consistent-g4')} (1.35% / 5.80%); with per-token "
            "scales, the default's, consistent G = 4 gives "
            f"{pct('random', 'token', 'consistent-g4')} / "
            f"{pct('outliers', 'token', 'consistent-g4')} (- / 2.5%) and plain "
            f"{pct('random', 'token', 'plain')} / {pct('outliers', 'token', 'plain')} "
            "(- / 2.4%).") in text


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
