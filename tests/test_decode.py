"""The small-batch path (``triton_moe.decode``) against the general pipeline.

Both compute the same per-token quantization, the same exact integer K-block dots and
the same float steps in the same order, so under the interpreter they agree bit for bit
(NaN where NaN). Compiled, the decode kernels' super-group flush is an explicit FMA,
which the general GEMM's compiled code is expected to contract to as well; the GPU tier
checks the agreement there (and the reference within the forward's tolerance).
"""
import pytest
import torch

import triton_moe
from tests.aot import (
    compile_for_hopper,
    launch_specialization,
    register_usage,
    run_without_interpreter,
)
from triton_moe import decode, forward
from triton_moe.quant_per_token import quantize_rows

FORWARD_TOLERANCE = 2e-3  # tests/test_forward.py: relative L2 vs the reference emulation
# Fewer, larger programs: the interpreter's time grows with the program count (64 rows of
# 4 K-blocks in 3 stages still fit the GPU's shared memory).
FAST = dict(BLOCK_N=64, BLOCK_OUT=64)


def _problem(num_tokens, hidden, inter, num_experts, top_k, *, dtype=torch.bfloat16,
             device="cpu", seed=0, **quant):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.02
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) * 0.02
    x = (torch.randn(num_tokens, hidden, generator=gen) * 2).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    topk_weights, topk_ids = triton_moe.route(logits, top_k, backend="torch")
    weights = triton_moe.quantize_weights(w13.to(device), w2.to(device), **quant)
    return (x.to(device), weights, topk_weights.to(device),
            topk_ids.to(torch.int32).to(device))


def _general(x, weights, topk_weights, topk_ids, expert_map=None):
    return forward.moe_forward_triton(x, weights, topk_weights, topk_ids, act_block_m=1,
                                      expert_map=expert_map, decode=False)


def _assert_same(got, expected):
    """Bit for bit under the interpreter; on the GPU the same NaN pattern and a relative
    L2 difference far below the quantization error."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if got.device.type == "cpu":
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
        return
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    diff = (got[~nan].float() - expected[~nan].float()).norm()
    assert diff <= 1e-4 * expected[~nan].float().norm()


CASES = {
    # name: (M, K, N, E, top_k, quantization options)
    "bf16_topk3": (2, 256, 128, 6, 3, {}),
    "one_token_top1": (1, 256, 256, 4, 1, {}),
    "nearest_g256": (2, 256, 128, 4, 2, dict(scale_rounding="nearest", super_group_size=256,
                                             allow_int32_overflow=True)),
    "partial_super_group": (2, 384, 384, 4, 2, dict(super_group_size=2)),
    "block_n16": (2, 256, 128, 4, 2, dict(block_n=16)),
    "block_k64": (2, 192, 128, 4, 2, dict(block_k=64, block_n=32)),
    # K-blocks per loop step (``chunk_blocks``): one step padded to 8 with a partial last
    # super group (6 blocks, G = 4), 4 over two groups.
    "padded_step_partial_group": (2, 768, 512, 4, 2, {}),
    "chunk4_two_groups": (1, 1024, 256, 4, 2, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decode_matches_general_path(case, device):
    num_tokens, hidden, inter, num_experts, top_k, quant = CASES[case]
    x, weights, tw, ti = _problem(num_tokens, hidden, inter, num_experts, top_k,
                                  device=device, **quant)
    got = decode.moe_forward_decode(x, weights, tw, ti, config=FAST)
    _assert_same(got, _general(x, weights, tw, ti))


@pytest.mark.parametrize("chunk", [1, 2, 4, 8])
@pytest.mark.parametrize("super_group", [2, 4])
def test_decode_chunk_sizes(chunk, super_group, device):
    """Every K-blocks-per-step choice gives the general path's bits: steps inside a super
    group, steps of whole groups (flushed in order), one unpipelined step (gate/up: 8
    K-blocks, down: 4)."""
    x, weights, tw, ti = _problem(2, 1024, 512, 4, 2, device=device, seed=3,
                                  super_group_size=super_group)
    got = decode.moe_forward_decode(x, weights, tw, ti, config=dict(
        FAST, gate_up_chunk=chunk, down_chunk=chunk, gate_up_one_step=0, down_one_step=0))
    _assert_same(got, _general(x, weights, tw, ti))


@pytest.mark.parametrize("hidden, inter, super_group, one_step", [
    (768, 384, 4, 8),  # 6 and 3 K-blocks: one step padded to 8 and to 4, within G
    (384, 768, 2, 8),  # 3 blocks: one step of 4 (2 groups); 6 blocks, G = 2: steps of 2
    (768, 768, 4, 4),  # 6 blocks, one step of at most 4: steps of 2 (no padding)
])
def test_decode_padded_step(hidden, inter, super_group, one_step, device):
    """K-block counts that are not a power of two: one step padded past K (the padding
    masked, the partial last group flushed once) or, where the padding would leave a
    group empty or the step too long, steps that divide K. The general path's bits."""
    x, weights, tw, ti = _problem(2, hidden, inter, 4, 2, device=device, seed=5,
                                  super_group_size=super_group)
    config = dict(FAST, gate_up_chunk=4, down_chunk=4, gate_up_one_step=one_step,
                  down_one_step=one_step)
    got = decode.moe_forward_decode(x, weights, tw, ti, config=config)
    _assert_same(got, _general(x, weights, tw, ti))


@pytest.mark.parametrize("super_group", [2, 4])
def test_decode_nan_token_and_dropped_pair_one_step(super_group, device):
    """Both weight kernels in one step (one group or several per step), with a NaN token
    and a dropped pair: the general path's bits."""
    x, weights, tw, ti = _problem(3, 512, 512, 8, 2, device=device, seed=4,
                                  super_group_size=super_group)
    x[1, 7] = float("nan")
    expert_map = torch.arange(8, dtype=torch.int32, device=device)
    expert_map[int(ti[2, 0])] = -1
    got = decode.moe_forward_decode(x, weights, tw, ti, expert_map=expert_map, config=FAST)
    _assert_same(got, _general(x, weights, tw, ti, expert_map=expert_map))
    assert torch.isnan(got[1]).all() and not torch.isnan(got[[0, 2]]).any()


@pytest.mark.parametrize("hidden, super_group, rounding", [
    (512, 4, "consistent"),  # one super group: the step flushes once
    (1024, 4, "consistent"),  # two groups in the step, flushed in order
    (512, 2, "nearest"),  # the reference design's rounding
])
def test_decode_quantizes_x_in_gate_up(hidden, super_group, rounding, device, monkeypatch):
    """x quantized by every gate/up program (``_quantize_token``) instead of a launch of
    its own: one quantization launch (h's) instead of two, and the general path's bits,
    also for a NaN token; with the option off, two launches and the same bits."""
    x, weights, tw, ti = _problem(3, hidden, 256, 8, 2, device=device, seed=7,
                                  super_group_size=super_group, scale_rounding=rounding)
    x[1, 5] = float("nan")
    quantized = []

    def counting_quantize_rows(mode, src, *args, **kwargs):
        quantized.append(tuple(src.shape))
        return quantize_rows(mode, src, *args, **kwargs)

    monkeypatch.setattr(decode, "quantize_rows", counting_quantize_rows)
    got = decode.moe_forward_decode(x, weights, tw, ti,
                                    config=dict(FAST, quantize_x_in_gate_up=True))
    assert quantized == [(6, 256)]  # h only
    expected = _general(x, weights, tw, ti)
    _assert_same(got, expected)
    assert torch.isnan(got[1]).all() and not torch.isnan(got[[0, 2]]).any()
    quantized.clear()
    apart = decode.moe_forward_decode(x, weights, tw, ti,
                                      config=dict(FAST, quantize_x_in_gate_up=False))
    assert quantized == [(3, hidden), (6, 256)]
    _assert_same(apart, expected)


def test_chunk_blocks_never_straddles_a_super_group():
    assert decode.chunk_blocks(16, 4, 4) == 4
    assert decode.chunk_blocks(16, 4, 16) == 16  # four whole groups
    assert decode.chunk_blocks(6, 4, 4) == 2  # the partial last group has 2 blocks
    # All of K in one step padded to a power of two, the padding in the last group:
    assert decode.chunk_blocks(6, 4, 16) == 8  # groups of 4 and 2 (+ 2 padded) blocks
    assert decode.chunk_blocks(6, 8, 16) == 8  # one partial group
    assert decode.chunk_blocks(3, 2, 4) == 4  # groups of 2 and 1 (+ 1 padded)
    assert decode.chunk_blocks(6, 2, 16) == 2  # padded to 8: a fourth group left empty
    assert decode.chunk_blocks(5, 2, 8) == 1
    assert decode.chunk_blocks(6, 4, 2) == 2  # 8 > max_chunk
    assert decode.chunk_blocks(6, 4, 4, 8) == 8  # one step may be longer than a chunk
    assert decode.chunk_blocks(16, 4, 4, 8) == 4
    assert decode.chunk_blocks(2, 3, 4) == 2  # within one group of 3 (old rule: 1)
    assert decode.chunk_blocks(56, 4, 16) == 8  # DeepSeek-V3's 7168 / 128
    assert decode.chunk_blocks(12, 3, 16) == 1  # G = 3: no power of two fits
    assert decode.chunk_blocks(16, 256, 16) == 16
    assert decode.chunk_blocks(16, 4, 1) == 1


@pytest.mark.parametrize("scale_rounding", ["consistent", "nearest"])
def test_quantize_rows_mode_rows_matches_oracle(scale_rounding, device):
    """quant_per_token's "rows" mode (the decode path's quantization) against the oracle:
    every row is its own scale row, bit for bit (with a zero row; NaN rows: the forward
    tests)."""
    from reference.quant import quantize_activations
    from triton_moe.quant_per_token import quantize_rows

    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(5, 384, generator=gen) * 3).to(torch.bfloat16)
    x[3] = 0
    opts = dict(block_k=128, q_max=16, super_group_size=2, scale_rounding=scale_rounding)
    got = quantize_rows("rows", x.to(device), 5, 384, None, **opts)
    offsets = torch.tensor([0, 5], dtype=torch.int32)
    want = quantize_activations(x, offsets, offsets, act_block_m=1, **opts)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0)


@pytest.mark.parametrize("hidden", [256, 512])  # x quantized apart / in gate/up
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_dtypes(dtype, hidden, device):
    x, weights, tw, ti = _problem(2, hidden, 128, 4, 2, dtype=dtype, device=device, seed=1)
    got = decode.moe_forward_decode(x, weights, tw, ti, config=FAST)
    assert got.dtype == dtype
    _assert_same(got, _general(x, weights, tw, ti))


def test_decode_default_tiles_through_the_api(device):
    """The default config (several programs per pair and per token), chosen by the
    forward itself, against the reference emulation and the general path."""
    x, weights, tw, ti = _problem(2, 128, 128, 32, 2, device=device, seed=2)
    stages = []
    got = triton_moe.moe_forward(x, weights, tw, ti, backend="triton",
                                 stage_callback=stages.append)
    assert stages == ["decode_gate_up", "decode_down", "end"]
    _assert_same(got, _general(x, weights, tw, ti))
    ref = triton_moe.moe_forward(x, weights, tw, ti, backend="torch")
    rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < FORWARD_TOLERANCE


def test_decode_expert_map_and_invalid_ids(device):
    """Pairs dropped by ``expert_map`` add nothing; an out-of-range id makes only its
    token NaN, as in the general path."""
    x, weights, tw, _ = _problem(3, 256, 128, 4, 2, device=device, seed=3)
    expert_map = torch.tensor([-1, 0, -1, 1, 2, -1, 3, -1], dtype=torch.int32, device=device)
    ids = torch.tensor([[1, 3], [0, 2], [6, 9]], dtype=torch.int32, device=device)
    got = decode.moe_forward_decode(x, weights, tw, ids, expert_map=expert_map, config=FAST)
    expected = _general(x, weights, tw, ids, expert_map=expert_map)
    _assert_same(got, expected)
    assert torch.isnan(got[2]).all() and not torch.isnan(got[:2]).any()
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # both pairs dropped


def test_decode_nan_input_poisons_only_its_token(device):
    x, weights, tw, ti = _problem(3, 256, 128, 4, 2, device=device, seed=4)
    x[1, 5] = float("nan")
    got = decode.moe_forward_decode(x, weights, tw, ti, config=FAST)
    _assert_same(got, _general(x, weights, tw, ti))
    assert torch.isnan(got[1]).all() and not torch.isnan(got[[0, 2]]).any()


def test_decode_dispatch():
    """Which calls take the decode path: few pairs, no more pairs than experts, few weight
    bytes (host ints only)."""
    conf = decode.DECODE_CONFIG
    max_pairs, per_pair = conf["max_pairs"], conf["experts_per_pair"]
    mb = 2**20
    assert decode.decode_fits(8, 256, 3 * mb)  # 35B-A3B, one token
    assert decode.decode_fits(64, 256, 3 * mb)  # 35B-A3B, 8 tokens
    assert decode.decode_fits(max_pairs, max_pairs * per_pair, 3 * mb)
    assert not decode.decode_fits(max_pairs + 8, 10**6, 3 * mb)  # too many pairs
    assert decode.decode_fits(8, 8, 176 * mb)  # Mixtral, 4 tokens: one pair per expert
    assert not decode.decode_fits(16, 8, 176 * mb)  # 8 tokens: pairs share experts
    assert decode.decode_fits(32, 256, 44 * mb)  # DeepSeek-V3, 4 tokens: 1.4 GB
    assert not decode.decode_fits(64, 256, 44 * mb)  # 8 tokens: 2.8 GB of weights
    assert not decode.decode_fits(0, 256, 3 * mb)


def test_forward_takes_general_path_for_tile_scales_and_large_batches(device):
    x, weights, tw, ti = _problem(2, 128, 128, 4, 2, device=device, seed=5, act_block_m=64)
    stages = []
    triton_moe.moe_forward(x, weights, tw, ti, backend="triton", stage_callback=stages.append)
    assert stages[0] == "permute_quantize"
    with pytest.raises(ValueError, match="act_block_m=1"):
        forward.moe_forward_triton(x, weights, tw, ti, act_block_m=64, decode=True)


# ----------------------------------------------------------------------------- sm_90
def _aot_main():
    """Child-process entry: compile both kernels for sm_90, return PTX facts."""
    import triton.language as tl

    common = dict(HAS_EXPERT_MAP=False, TOP_K=8, BLOCK_K=128, SUPER_GROUP=4,
                  SCALE_BLOCK_N=64, GEMM_DTYPE=tl.bfloat16, GDC=True)
    ints = ("num_pairs num_experts num_global_experts stride_we stride_wn stride_wqe "
            "stride_wqn stride_wqk stride_wfe stride_wfn stride_wfg").split()
    pointers = dict(topk_ids_ptr="*i32", expert_map_ptr="*i32", w32_ptr="*i32",
                    w_qscale_ptr="*i32", w_fscale_ptr="*fp32")
    conf = decode.DECODE_CONFIG
    gate_up_signature = dict({n: "i32" for n in ints + ["inter", "stride_hm", "stride_xm"]},
                             x_q32_ptr="*i32", x_qs_ptr="*i32", x_fs_ptr="*fp32",
                             h_ptr="*fp32", x_ptr="*bf16", **pointers)

    def gate_up_kernel(num_blocks, quantize_x=False):
        steps = decode._steps(num_blocks, decode.chunk_blocks(num_blocks, 4,
                                                              conf["gate_up_chunk"]),
                              conf["gate_up_stages"])
        return compile_for_hopper(
            decode._gate_up_kernel, gate_up_signature,
            dict(common, NUM_BLOCKS=num_blocks, BLOCK_N=conf["BLOCK_N"],
                 **_quantize_x_constexprs(quantize_x), **steps),
            num_warps=conf["gate_up_warps"], num_stages=steps["NUM_STAGES"],
            launch_pdl=not quantize_x)  # quantizing x, gate/up is the first launch

    down_signature = dict({n: "i32" for n in ints + ["hidden", "stride_twm", "stride_twj",
                                                     "stride_om"]},
                          topk_weights_ptr="*fp32", h_q32_ptr="*i32", h_qs_ptr="*i32",
                          h_fs_ptr="*fp32", out_ptr="*bf16", **pointers)
    down_steps = decode._steps(4, decode.chunk_blocks(4, 4, conf["down_chunk"]),
                               conf["down_stages"])
    down = compile_for_hopper(
        decode._down_kernel, down_signature,
        dict(common, TOP_K_PAD=8, NUM_BLOCKS=4, BLOCK_OUT=conf["BLOCK_OUT"], **down_steps),
        num_warps=conf["down_warps"], num_stages=down_steps["NUM_STAGES"],
        enable_fp_fusion=False, launch_pdl=True)
    registers = _wave_registers(common, gate_up_signature, down_signature)
    # 35B-A3B: K = 2048 (16 blocks) for gate/up, 512 (4) for down: one step each.
    # DeepSeek-V3: K = 7168 (56 blocks), pipelined steps.
    kernels = (("gate_up", gate_up_kernel(16)), ("gate_up_pipelined", gate_up_kernel(56)),
               ("down", down), ("gate_up_quantize_x", gate_up_kernel(16, quantize_x=True)))
    # The quantization of h, launched with PDL between the two (tests/test_quant.py
    # compiles this kernel's other modes).
    from triton_moe import quant_per_token
    quant_conf = quant_per_token.per_token_config("rows", 4, 4, 128, num_rows=8)
    quant_warps = quant_conf.pop("num_warps")
    quant_h = compile_for_hopper(
        quant_per_token._quantize_rows_kernel,
        dict({n: "*i32" for n in ("sorted_pair_ids_ptr", "pair_to_row_ptr",
                                  "expert_offsets_ptr", "a_qscale_ptr")},
             src_ptr="*fp32", a_q_ptr="*i8", a_fscale_ptr="*fp32",
             **{n: "i32" for n in ("num_src_rows num_cols num_blocks stride_src_m "
                                   "stride_aqm stride_qsm stride_fsm").split()}),
        dict(MODE="rows", TOP_K=1, NUM_EXPERTS=0, BLOCK_K=128, SUPER_GROUP=4, Q_MAX=16,
             ROUNDING="consistent", GDC=True, **quant_conf),
        num_warps=quant_warps, launch_pdl=True)
    facts = {}
    quant_lines = quant_h.asm["ptx"].splitlines()
    facts["quant_h"] = [next((i for i, line in enumerate(quant_lines) if text in line), -1)
                        for text in ("griddepcontrol.launch_dependents",
                                     "griddepcontrol.wait", "ld.global")]
    for name, kernel in kernels:
        ptx = kernel.asm["ptx"]
        lines = ptx.splitlines()

        def first(text, lines=lines):
            return next((i for i, line in enumerate(lines) if text in line), len(lines))

        wait_line = first("griddepcontrol.wait")
        div_line = first("div.rn.f32")
        facts[name] = {"dp4a": "dp4a.s32.s32" in ptx, "fma": "fma.rn.f32" in ptx,
                       "fp64_exp": "fma.rn.f64" in ptx, "cp_async": "cp.async." in ptx,
                       "pdl": kernel.metadata.launch_pdl,
                       "launch_dependents": first("griddepcontrol.launch_dependents"),
                       "wait": first("griddepcontrol.wait"),
                       "first_cp_async": first("cp.async."),
                       "first_store": first("st.global"),
                       "loads_before_wait": sum("ld.global" in line
                                                for line in lines[:wait_line]),
                       "loads_after_wait": sum("ld.global" in line
                                               for line in lines[wait_line:]),
                       "loads_before_div": sum("ld.global" in line
                                               for line in lines[:div_line]),
                       "lines": len(lines)}
    facts["registers"] = registers
    return facts


def _quantize_x_constexprs(quantize_x: bool) -> dict:
    """The gate/up kernel's x-quantization constexprs (the default quantization)."""
    return dict(QUANTIZE_X=quantize_x, Q_MAX=16, ROUNDING="consistent")


def test_decode_kernels_compile_for_sm90():
    facts = run_without_interpreter("tests.test_decode", "_aot_main")
    quant_h = facts.pop("quant_h")
    _check_wave_register_budget(facts.pop("registers"))
    quantize_x = facts.pop("gate_up_quantize_x")
    for name, fact in facts.items():
        assert fact["dp4a"], name  # the int8 dots: 4 multiply-adds per instruction
        assert fact["fma"], name  # the explicit super-group flush
        # PDL: launched so, waits for the previous kernel before it writes anything.
        assert fact["pdl"], name
        assert fact["wait"] < fact["first_store"] < fact["lines"], fact
    # gate/up lets the next kernel start at once. In one step its weight loads come
    # before the wait (most loads; the token's after); pipelined steps load the token
    # ahead through cp.async, so they wait first. Down is the last kernel: it lets none
    # start early.
    for name in ("gate_up", "down"):
        assert facts[name]["loads_before_wait"] > facts[name]["loads_after_wait"], facts[name]
    pipelined = facts["gate_up_pipelined"]
    assert pipelined["cp_async"] and pipelined["wait"] < pipelined["first_cp_async"]
    assert facts["gate_up"]["launch_dependents"] < facts["gate_up"]["wait"]
    assert facts["down"]["launch_dependents"] == facts["down"]["lines"]
    assert 0 <= quant_h[0] < quant_h[1] < quant_h[2]  # h is read after the wait
    assert facts["gate_up"]["fp64_exp"]  # SiLU's exp is the oracle's fp64 one
    # Quantizing x, gate/up is the first launch (no PDL) and lets h's quantization start
    # at once; every one of its 16-byte weight loads (gate and up: BLOCK_N rows x 16
    # K-blocks of 128 bytes each, over 4 warps) is issued before the quantization's first
    # division.
    conf = decode.DECODE_CONFIG
    weight_loads = 2 * conf["BLOCK_N"] * 16 * 128 // (16 * 32 * conf["gate_up_warps"])
    assert not quantize_x["pdl"] and quantize_x["dp4a"] and quantize_x["fma"], quantize_x
    assert quantize_x["launch_dependents"] < quantize_x["first_store"], quantize_x
    assert quantize_x["loads_before_div"] >= weight_loads, quantize_x


def _allocated(usage: dict) -> int:
    """Registers an SM allocates to one program: per warp, rounded up to 256."""
    per_warp = -(-usage["registers"] * 32 // 256) * 256
    return per_warp * usage["threads"] // 32


def _wave_registers(common, gate_up_signature, down_signature):
    """Registers of the kernels as the wave rule launches them at the 35B-A3B shape (one
    token: K = 2048 for gate/up, 512 for down, E = 256, block_n 64), specialized as that
    launch is (aligned pointers, unit strides constant, strides divisible by 16 marked)."""
    conf = decode.DECODE_CONFIG
    hidden, inter, experts, top_k = 2048, 512, 256, 8
    gate_up_values = {"num_pairs": top_k, "num_experts": experts,
                      "num_global_experts": experts, "inter": inter,
                      "stride_we": 2 * inter * hidden // 4, "stride_wn": hidden // 4,
                      "stride_wqe": 16 * 16, "stride_wqn": 16, "stride_wqk": 1,
                      "stride_wfe": 16 * 4, "stride_wfn": 4, "stride_wfg": 1,
                      "stride_hm": inter, "stride_xm": hidden}
    down_values = {"num_pairs": top_k, "num_experts": experts,
                   "num_global_experts": experts, "hidden": hidden, "stride_twm": top_k,
                   "stride_twj": 1, "stride_we": hidden * inter // 4,
                   "stride_wn": inter // 4, "stride_wqe": 32 * 4, "stride_wqn": 4,
                   "stride_wqk": 1, "stride_wfe": 32, "stride_wfn": 1, "stride_wfg": 1,
                   "stride_om": hidden}

    def build(kernel, signature, values, constexprs, num_warps, **options):
        signature, unit, divisible = launch_specialization(signature, values)
        compiled = compile_for_hopper(kernel, signature, dict(constexprs, **unit),
                                      num_warps=num_warps, num_stages=1,
                                      divisible_by_16=divisible, launch_pdl=True, **options)
        return dict(register_usage(compiled), threads=32 * num_warps)

    gate_up_constexprs = dict(common, NUM_BLOCKS=16, BLOCK_N=conf["BLOCK_N"],
                              **decode._steps(16, 16, conf["gate_up_stages"]))
    one_wave = decode._wave_config(conf, 1, 1)
    return {
        "gate_up": build(decode._gate_up_kernel, gate_up_signature, gate_up_values,
                         dict(gate_up_constexprs, **_quantize_x_constexprs(
                             one_wave["quantize_x_in_gate_up"])), conf["gate_up_warps"]),
        "gate_up_quantize_x": build(decode._gate_up_kernel, gate_up_signature,
                                    gate_up_values,
                                    dict(gate_up_constexprs, **_quantize_x_constexprs(True)),
                                    conf["gate_up_warps"]),
        "down_one_wave": build(
            decode._down_kernel, down_signature, down_values,
            dict(common, TOP_K_PAD=8, NUM_BLOCKS=4, BLOCK_OUT=conf["BLOCK_OUT"],
                 **decode._steps(4, 4, conf["down_stages"])),
            one_wave["down_warps"], enable_fp_fusion=False),
        "down_wide": build(
            decode._down_kernel, down_signature, down_values,
            dict(common, TOP_K_PAD=8, NUM_BLOCKS=4,
                 BLOCK_OUT=conf["wide_down"]["BLOCK_OUT"],
                 **decode._steps(4, 4, conf["down_stages"])),
            conf["down_warps"], enable_fp_fusion=False),
    }


def _check_wave_register_budget(registers: dict):
    """What the wave rule assumes on sm_90 (65536 registers per SM): gate/up holds
    ``gate_up_resident`` programs per SM, also when it quantizes x, and in one wave (x
    quantized apart) one down program on the one-wave warps beside them; a wide down
    program fits an SM; nothing spills."""
    conf = decode.DECODE_CONFIG
    file_size = 65536
    for name, usage in registers.items():
        assert usage["spill_bytes"] == 0, (name, usage)
    gate_up, down = _allocated(registers["gate_up"]), _allocated(registers["down_one_wave"])
    assert conf["gate_up_resident"] * gate_up + down <= file_size, registers
    assert (conf["gate_up_resident"] + 1) * gate_up > file_size, registers  # else: more
    assert conf["gate_up_resident"] * _allocated(registers["gate_up_quantize_x"]) <= file_size
    assert _allocated(registers["down_wide"]) <= file_size  # one per SM


def test_wave_config():
    """The wave rule: one wave of gate/up at its resident count -> ``one_wave`` (x
    quantized by its own launch, down on fewer warps); more programs -> ``wide_down``
    where it applies; no SM count (CPU, interpreter) or the rule off -> the config as
    given."""
    conf = dict(decode.DECODE_CONFIG, gate_up_resident=2)
    assert conf["quantize_x_in_gate_up"] and not conf["one_wave"]["quantize_x_in_gate_up"]
    assert decode._wave_config(conf, 256, 132) == dict(conf, **conf["one_wave"])
    assert decode._wave_config(conf, 264, 132)["down_warps"] == conf["one_wave"]["down_warps"]
    assert decode._wave_config(conf, 265, 132) == conf
    assert decode._wave_config(conf, 256, None) == conf
    assert decode._wave_config(dict(conf, wave_rule=False), 256, 132) == conf | {
        "wave_rule": False}
    # A caller's own entries win over the rule's.
    fixed = decode._wave_config(dict(conf, down_warps=8), 256, 132, fixed={"down_warps"})
    assert fixed["down_warps"] == 8 and not fixed["quantize_x_in_gate_up"]
    # More than one gate/up wave: wider down tiles when down runs one step and their grid
    # (2 tokens x 2048 / 32 = 128 programs) has at most one program per SM.
    wide = dict(num_tokens=2, hidden=2048, down_one_step=True)
    assert decode._wave_config(conf, 512, 132, **wide) == dict(conf, **conf["wide_down"])
    assert decode._wave_config(conf, 512, 127, **wide) == conf
    assert decode._wave_config(conf, 512, 132, **dict(wide, down_one_step=False)) == conf
    assert decode._wave_config(conf, 512, 132, **dict(wide, num_tokens=3)) == conf
    assert decode._wave_config(conf, 256, 132, **wide) == dict(conf, **conf["one_wave"])
    assert decode._wave_config(dict(conf, BLOCK_OUT=16), 512, 132, fixed={"BLOCK_OUT"},
                               **wide)["BLOCK_OUT"] == 16


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 2])
@pytest.mark.parametrize("shape", ["35B-A3B", "qwen3-30b-a3b"])
def test_gpu_decode_real_sizes(num_tokens, shape):
    from bench.shapes import PRESETS

    spec = PRESETS[shape]
    x, weights, tw, ti = _problem(num_tokens, spec.hidden, spec.intermediate,
                                  spec.num_experts, spec.top_k, device="cuda", seed=6)
    got = decode.moe_forward_decode(x, weights, tw, ti)
    _assert_same(got, _general(x, weights, tw, ti))
    ref = triton_moe.moe_forward(x, weights, tw, ti, backend="torch")
    rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < FORWARD_TOLERANCE
