"""Blockwise INT8 quantization with (Q, F) scales (SPEC 4, 6): properties of the oracle,
and the Triton kernels against it.

Everything the kernels write is compared bit for bit with ``reference.quant``: int8
values, Q (int32) and F (fp32), on the rows ``< expert_offsets[E]`` and scale rows
``< scale_row_offsets[E]`` (the kernels leave the rest unwritten). That includes the
SiLU-gated kernel: both sides evaluate ``exp`` in fp64 and round it to fp32
(``reference.quant.silu_mul`` says why), and every other operation is a single IEEE fp32
operation, so there is no tolerance to state.
"""
import math

import pytest
import torch

from reference import permute as ref_permute
from reference import quant as ref
from tests.aot import compile_for_hopper, run_without_interpreter
from triton_moe import quant as tri
from triton_moe import quant_per_token as tri_pt

Q_MAX = 16
BLOCK_K = 128
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _opts(act_block_m, super_group_size, scale_rounding):
    return dict(act_block_m=act_block_m, block_k=BLOCK_K, q_max=Q_MAX,
                super_group_size=super_group_size, scale_rounding=scale_rounding)


def _segments(counts, act_block_m, device, dtype=torch.int32):
    """``expert_offsets`` and ``scale_row_offsets`` for per-expert row counts, built by
    hand (exclusive prefix sums, docs/design.md "Permutation")."""
    counts = torch.tensor(counts, dtype=torch.int64)
    scale_rows = (counts + act_block_m - 1) // act_block_m
    expert_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    scale_row_offsets = torch.cat([counts.new_zeros(1), scale_rows.cumsum(0)])
    return expert_offsets.to(device, dtype), scale_row_offsets.to(device, dtype)


def _random(shape, dtype, device, seed, outliers=False):
    """Normal data; with ``outliers``, 1% of the channels (at least one) scaled by 30."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if outliers:
        channels = torch.randperm(shape[-1], generator=gen)[:max(1, shape[-1] // 100)]
        x[..., channels] *= 30
    return x.to(dtype).to(device)


def _assert_same(got, want, expert_offsets, scale_row_offsets):
    """Bit-exact on the rows and scale rows the kernels own."""
    num_rows = int(expert_offsets[-1])
    num_srows = int(scale_row_offsets[-1])
    (a_q, a_qscale, a_fscale), (w_q, w_qscale, w_fscale) = got, want
    assert a_q.shape == w_q.shape and a_q.dtype == torch.int8
    assert a_qscale.shape == w_qscale.shape and a_qscale.dtype == torch.int32
    assert a_fscale.shape == w_fscale.shape and a_fscale.dtype == torch.float32
    assert torch.equal(a_q[:num_rows].cpu(), w_q[:num_rows].cpu())
    assert torch.equal(a_qscale[:num_srows].cpu(), w_qscale[:num_srows].cpu())
    assert torch.equal(a_fscale[:num_srows].cpu(), w_fscale[:num_srows].cpu())


# ----------------------------------------------------------------------------- the oracle
def test_block_scales_by_hand():
    x = torch.zeros(5, 2 * BLOCK_K)
    x[0, 3], x[1, 130] = -2.5, 7.0
    x[4, 0] = 1.0  # alone in a ragged last row block
    s = ref.block_scales(x, 2, BLOCK_K)
    assert s.shape == (3, 2) and s.dtype == torch.float32
    expect = torch.tensor([[2.5 / 127, 7.0 / 127],
                           [ref.SCALE_EPS, ref.SCALE_EPS],  # all-zero blocks: the eps floor
                           [1.0 / 127, ref.SCALE_EPS]], dtype=torch.float32)
    assert torch.equal(s, expect)


@pytest.mark.parametrize("super_group_size", [1, 3, 4, 256])
@pytest.mark.parametrize("scale_rounding", ref.SCALE_ROUNDINGS)
def test_factorize_scales_ranges(super_group_size, scale_rounding):
    gen = torch.Generator().manual_seed(1)
    num_blocks = 10  # G = 3, 4 leave a short last super group
    s = torch.rand(7, num_blocks, generator=gen) ** 4 + ref.SCALE_EPS
    qscale, fscale = ref.factorize_scales(s, q_max=Q_MAX, super_group_size=super_group_size,
                                          scale_rounding=scale_rounding)
    num_groups = math.ceil(num_blocks / super_group_size)
    assert qscale.dtype == torch.int32 and qscale.shape == s.shape
    assert fscale.dtype == torch.float32 and fscale.shape == (7, num_groups)
    lowest = 0 if scale_rounding == "nearest" else 1
    assert int(qscale.min()) >= lowest and int(qscale.max()) <= Q_MAX
    for g in range(num_groups):
        group = slice(g * super_group_size, (g + 1) * super_group_size)
        assert torch.equal(fscale[:, g], s[:, group].amax(dim=1) / Q_MAX)
        assert (qscale[:, group].amax(dim=1) == Q_MAX).all()  # the group's largest block
    effective = ref.effective_scales(qscale, fscale, super_group_size)
    step = fscale.repeat_interleave(super_group_size, 1)[:, :num_blocks]  # F of each block
    if scale_rounding == "consistent":
        assert (effective >= s * (1 - 2**-22)).all()  # Q*F >= s, up to the ulp of s / F
        assert (effective - s <= step * (1 + 2**-20)).all()
    else:
        assert ((effective - s).abs() <= step / 2 * (1 + 2**-20)).all()  # SPEC 4.2


@pytest.mark.parametrize("act_block_m", [1, 3, 64])
def test_dequantization_error_bounds(act_block_m):
    """consistent: |x - q*Q*F| <= Q*F/2 and the clamp never acts; nearest: the int8 values
    are within half a step of x / s (the GEMM then applies Q*F, not s)."""
    x = _random((67, 3 * BLOCK_K), torch.float32, "cpu", seed=2, outliers=True)
    opts = dict(block_rows=act_block_m, block_k=BLOCK_K, q_max=Q_MAX, super_group_size=2)
    s = ref.block_scales(x, act_block_m, BLOCK_K)

    def per_element(block_scale):
        rows = block_scale.repeat_interleave(act_block_m, 0)[:x.shape[0]]
        return rows.repeat_interleave(BLOCK_K, 1)

    x_q, qscale, fscale = ref.quantize_blockwise(x, scale_rounding="consistent", **opts)
    step = per_element(ref.effective_scales(qscale, fscale, 2))
    deq = ref.dequantize_blockwise(x_q, qscale, fscale, block_rows=act_block_m,
                                   block_k=BLOCK_K, super_group_size=2)
    assert ((x - deq).abs() <= step / 2 + 2**-22 * x.abs()).all()
    assert int(torch.round(x / step).abs().max()) <= 127  # nothing clipped

    x_q, qscale, fscale = ref.quantize_blockwise(x, scale_rounding="nearest", **opts)
    scale = per_element(s)
    assert ((x - x_q.float() * scale).abs() <= scale / 2 + 2**-22 * x.abs()).all()
    assert int(x_q.abs().max()) == 127  # the absmax element of a block maps to +-127


def test_nearest_drops_a_small_block_consistent_keeps_it():
    """Block 1 has s < F/2 = s_0 / 32, so nearest gives it Q = 0 and the GEMM sees zeros
    (SPEC 4.2); consistent gives Q = 1 and keeps it within half a step."""
    x = _random((4, 2 * BLOCK_K), torch.float32, "cpu", seed=3)
    x[:, :BLOCK_K] *= 100 / x[:, :BLOCK_K].abs().max()
    x[:, BLOCK_K:] *= 1 / x[:, BLOCK_K:].abs().max()
    opts = dict(block_rows=4, block_k=BLOCK_K, q_max=Q_MAX, super_group_size=2)
    for rounding, q_block1 in (("nearest", 0), ("consistent", 1)):
        x_q, qscale, fscale = ref.quantize_blockwise(x, scale_rounding=rounding, **opts)
        assert qscale.tolist() == [[Q_MAX, q_block1]]
        deq = ref.dequantize_blockwise(x_q, qscale, fscale, block_rows=4, block_k=BLOCK_K,
                                       super_group_size=2)
        if rounding == "nearest":
            assert int(x_q[:, BLOCK_K:].abs().max()) == 127  # quantized with s ...
            assert torch.equal(deq[:, BLOCK_K:], torch.zeros(4, BLOCK_K))  # ... then dropped
        else:
            err = (deq[:, BLOCK_K:] - x[:, BLOCK_K:]).abs().max()
            assert float(err) <= float(fscale[0, 0]) / 2 * (1 + 2**-20)


@pytest.mark.parametrize("q_max, block_k, expected", [(16, 128, 4), (16, 64, 8), (8, 128, 16),
                                                      (127, 128, 0), (1, 32, 4160)])
def test_max_safe_super_group_size(q_max, block_k, expected):
    safe = ref.max_safe_super_group_size(q_max, block_k)
    assert safe == expected
    per_block = q_max**2 * block_k * 127**2  # worst |Q_A Q_B dot| of one K-block (SPEC 5)
    assert safe * per_block < 2**31 <= (safe + 1) * per_block


def test_num_scale_rows_bounds_any_routing():
    gen = torch.Generator().manual_seed(4)
    for act_block_m in (1, 48, 64, 128):
        for num_experts in (1, 3, 8):
            num_pairs = int(torch.randint(0, 300, (1,), generator=gen))
            for _ in range(20):
                ids = torch.randint(0, num_experts, (num_pairs,), generator=gen)
                counts = torch.bincount(ids, minlength=num_experts)
                used = int(((counts + act_block_m - 1) // act_block_m).sum())
                assert used <= ref.num_scale_rows(num_pairs, num_experts, act_block_m)
    assert ref.num_scale_rows(37, 8, 1) == 37
    assert ref.num_scale_rows(200, 8, 64) == 4 + 8


def test_quantize_weight_matches_blockwise_per_expert(monkeypatch):
    monkeypatch.setattr(ref, "_WEIGHT_CHUNK_VALUES", 2 * 128 * 256)  # 2 experts per chunk
    w = _random((5, 128, 2 * BLOCK_K), torch.bfloat16, "cpu", seed=5)
    opts = dict(block_k=BLOCK_K, q_max=Q_MAX, super_group_size=1, scale_rounding="consistent")
    w_q, qscale, fscale = ref.quantize_weight(w, block_n=64, **opts)
    assert w_q.shape == w.shape and qscale.shape == (5, 2, 2) and fscale.shape == (5, 2, 2)
    for e in range(5):
        one = ref.quantize_blockwise(w[e], block_rows=64, **opts)
        assert torch.equal(w_q[e], one[0]) and torch.equal(qscale[e], one[1])
        assert torch.equal(fscale[e], one[2])


def test_reference_activation_blocks_restart_at_each_expert():
    counts, act_block_m = [5, 0, 9, 3], 4
    x = _random((20, 2 * BLOCK_K), torch.float32, "cpu", seed=6)  # rows 17.. are unused
    expert_offsets, scale_row_offsets = _segments(counts, act_block_m, "cpu")
    opts = _opts(act_block_m, 256, "nearest")
    x_q, qscale, fscale = ref.quantize_activations(x, expert_offsets, scale_row_offsets,
                                                   **opts)
    assert qscale.shape == (ref.num_scale_rows(20, 4, act_block_m), 2)
    blockwise = dict(block_rows=act_block_m, block_k=BLOCK_K, q_max=Q_MAX,
                     super_group_size=256, scale_rounding="nearest")
    for start, end, srow in ((0, 5, 0), (5, 14, 2), (14, 17, 5)):
        seg_q, seg_qscale, seg_fscale = ref.quantize_blockwise(x[start:end], **blockwise)
        assert torch.equal(x_q[start:end], seg_q)
        assert torch.equal(qscale[srow:srow + len(seg_qscale)], seg_qscale)
        assert torch.equal(fscale[srow:srow + len(seg_fscale)], seg_fscale)
    assert not x_q[17:].any() and not qscale[6:].any() and not fscale[6:].any()


def test_silu_mul_formula():
    h = _random((8, 2 * BLOCK_K), torch.float32, "cpu", seed=7) * 4
    got = ref.silu_mul(h)
    gate, up = h[:, :BLOCK_K], h[:, BLOCK_K:]
    # torch's fp32 silu rounds differently in the last bits: a few ulps.
    torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, atol=1e-6, rtol=1e-6)
    assert torch.equal(ref.silu_mul(h.bfloat16()), ref.silu_mul(h.bfloat16().float()))


# ----------------------------------------------------------------------------- the kernels
def _run_plain(x, expert_offsets, scale_row_offsets, opts):
    got = tri.quantize_activations(x, expert_offsets, scale_row_offsets, **opts)
    want = ref.quantize_activations(x, expert_offsets, scale_row_offsets, **opts)
    return got, want


def _run_silu(h, expert_offsets, scale_row_offsets, opts):
    got = tri.silu_mul_quantize(h, expert_offsets, scale_row_offsets, **opts)
    want = ref.quantize_activations(ref.silu_mul(h), expert_offsets, scale_row_offsets,
                                    **opts)
    return got, want


# (act_block_m, super_group_size, K, expert row counts): per-token scales, a
# non-power-of-two block, 64/128-row tiles; G = 1 (one F per block), 2 with a short last
# super group (K = 384), 4 and 256 (one F per row); empty experts, ragged block ends.
KERNEL_CASES = {
    "m1-G256": (1, 256, 256, [3, 0, 6, 2]),
    "m1-G1": (1, 1, 256, [2, 5, 0]),
    "m48-G2-ragged-group": (48, 2, 384, [50, 0, 13, 49]),
    "m64-G4": (64, 4, 256, [0, 70, 1, 64, 0]),
    "m128-G1": (128, 1, 256, [130, 0, 7]),
    "m128-G256": (128, 256, 512, [12, 140]),
    "m1-G24-two-k-tiles": (1, 24, 3072, [3, 0, 4]),  # 24 blocks: a 16-block tile + a ragged one
}
DTYPE_CYCLE = ["bf16", "fp32", "fp16"]


@pytest.mark.parametrize("scale_rounding", ref.SCALE_ROUNDINGS)
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_quantize_activations_kernel(case, scale_rounding, device):
    act_block_m, group, hidden, counts = KERNEL_CASES[case]
    index = list(KERNEL_CASES).index(case)
    dtype = DTYPES[DTYPE_CYCLE[index % 3]]
    num_pairs = sum(counts) + 3  # trailing rows past expert_offsets[E] are never read
    x = _random((num_pairs, hidden), dtype, device, seed=10 + index)
    segments = _segments(counts, act_block_m, device)
    got, want = _run_plain(x, *segments, _opts(act_block_m, group, scale_rounding))
    _assert_same(got, want, *segments)


@pytest.mark.parametrize("scale_rounding", ref.SCALE_ROUNDINGS)
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_silu_mul_quantize_kernel(case, scale_rounding, device):
    act_block_m, group, inter, counts = KERNEL_CASES[case]
    index = list(KERNEL_CASES).index(case)
    dtype = DTYPES[DTYPE_CYCLE[(index + 1) % 3]]
    num_pairs = sum(counts) + 2
    h = _random((num_pairs, 2 * inter), dtype, device, seed=20 + index) * 3
    segments = _segments(counts, act_block_m, device)
    got, want = _run_silu(h, *segments, _opts(act_block_m, group, scale_rounding))
    _assert_same(got, want, *segments)


def _routing(num_tokens, top_k, num_experts, seed, dropped=0):
    """Random top-k choices, their stable sort by expert (docs/design.md "Permutation"),
    with ``dropped`` pairs routed off the device (no row). Returns (sorted_pair_ids,
    per-expert counts)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    expert = scores.topk(top_k, dim=1).indices.reshape(-1)
    expert[torch.randperm(expert.numel(), generator=gen)[:dropped]] = num_experts
    order = torch.sort(expert, stable=True).indices
    num_rows = expert.numel() - dropped
    sorted_pair_ids = torch.where(torch.arange(expert.numel()) < num_rows, order, -1)
    counts = torch.bincount(expert, minlength=num_experts + 1)[:num_experts]
    return sorted_pair_ids.to(torch.int32), counts.tolist()


# (act_block_m, super_group_size, K, tokens, top_k, experts, dropped pairs)
GATHER_CASES = {
    "m1-G2": (1, 2, 256, 8, 2, 4, 0),
    "m48-G1-dropped": (48, 1, 256, 40, 2, 3, 5),
    "m64-G4": (64, 4, 384, 30, 4, 8, 0),
    "m128-G256": (128, 256, 256, 48, 3, 4, 0),
}


@pytest.mark.parametrize("scale_rounding", ref.SCALE_ROUNDINGS)
@pytest.mark.parametrize("case", list(GATHER_CASES))
def test_permute_quantize_kernel(case, scale_rounding, device):
    act_block_m, group, hidden, num_tokens, top_k, num_experts, dropped = GATHER_CASES[case]
    index = list(GATHER_CASES).index(case)
    dtype = DTYPES[DTYPE_CYCLE[(index + 2) % 3]]
    sorted_pair_ids, counts = _routing(num_tokens, top_k, num_experts, 30 + index, dropped)
    hidden_states = _random((num_tokens, hidden), dtype, device, seed=40 + index)
    segments = _segments(counts, act_block_m, device)
    opts = _opts(act_block_m, group, scale_rounding)
    got = tri.permute_quantize(hidden_states, sorted_pair_ids.to(device), *segments,
                               top_k=top_k, **opts)
    x_perm = hidden_states[sorted_pair_ids.long().clamp(min=0).to(device) // top_k]
    want = ref.quantize_activations(x_perm, *segments, **opts)
    _assert_same(got, want, *segments)


# Per-token scales (quant_per_token): GEMM1's input quantizes each token once and stores
# it at the token's top_k rows. (tokens, K, top_k, E, G, dtype, rounding, expert_map)
SCATTER_CASES = {
    "bf16-G4": (37, 512, 3, 5, 4, "bf16", "consistent", None),
    "fp16-G32-two-k-tiles": (11, 4096, 2, 3, 32, "fp16", "nearest", None),
    "fp32-G3-top1": (9, 384, 1, 2, 3, "fp32", "consistent", None),
    "expert-map-drops-and-bad-ids": (21, 256, 4, 3, 2, "bf16", "nearest", [2, -1, 0, 1, -1]),
}


@pytest.mark.parametrize("case", list(SCATTER_CASES))
def test_quantize_scatter_matches_gather(case, device):
    num_tokens, hidden, top_k, num_experts, group, dtype, rounding, emap = SCATTER_CASES[case]
    seed = 90 + list(SCATTER_CASES).index(case)
    gen = torch.Generator().manual_seed(seed)
    num_global = num_experts if emap is None else len(emap)
    topk_ids = torch.stack([torch.randperm(num_global, generator=gen)[:top_k]
                            for _ in range(num_tokens)]).to(torch.int32)
    expert_map = None
    if emap is not None:
        expert_map = torch.tensor(emap, dtype=torch.int32)
        topk_ids[0, 0] = num_global + 3  # out of range: the pair gets no row
    perm = ref_permute.permute(topk_ids, num_experts, expert_map=expert_map, act_block_m=1)
    hidden_states = _random((num_tokens, hidden), DTYPES[dtype], device, seed, outliers=True)
    opts = _opts(1, group, rounding)
    got = tri_pt.quantize_scatter(hidden_states, perm.pair_to_row.to(device),
                                  perm.expert_offsets.to(device), top_k=top_k,
                                  **{k: v for k, v in opts.items() if k != "act_block_m"})
    x_perm = hidden_states[perm.sorted_pair_ids.long().clamp(min=0).to(device) // top_k]
    want = ref.quantize_activations(x_perm, perm.expert_offsets, perm.scale_row_offsets,
                                    **opts)
    _assert_same(got, want, perm.expert_offsets, perm.scale_row_offsets)


def test_per_token_nan_poisons_only_its_rows(device):
    """A NaN in one token makes F NaN in that token's rows only (as torch's amax does in
    the oracle); the other tokens' rows keep the oracle's bits."""
    num_tokens, hidden, top_k, num_experts = 6, 512, 2, 3
    topk_ids = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0], [2, 1]], dtype=torch.int32)
    perm = ref_permute.permute(topk_ids, num_experts, act_block_m=1)
    hidden_states = _random((num_tokens, hidden), torch.bfloat16, device, 99)
    hidden_states[4, 300] = float("nan")  # K-block 2: super group 1 with G = 2
    opts = _opts(1, 2, "consistent")
    a_q, a_qscale, a_fscale = tri_pt.quantize_scatter(
        hidden_states, perm.pair_to_row.to(device), perm.expert_offsets.to(device),
        top_k=top_k, **{k: v for k, v in opts.items() if k != "act_block_m"})
    x_perm = hidden_states[perm.sorted_pair_ids.long().to(device) // top_k]
    _, _, w_fscale = ref.quantize_activations(x_perm, perm.expert_offsets,
                                              perm.scale_row_offsets, **opts)
    bad_rows = perm.pair_to_row.reshape(num_tokens, top_k)[4].long().tolist()
    good = [r for r in range(num_tokens * top_k) if r not in bad_rows]
    assert torch.isnan(a_fscale[bad_rows, 1].cpu()).all()
    assert torch.isnan(w_fscale[bad_rows, 1]).all()
    assert torch.equal(a_fscale[bad_rows, 0].cpu(), w_fscale[bad_rows, 0].cpu())
    assert torch.equal(a_fscale[good].cpu(), w_fscale[good].cpu())
    w_q, _, _ = ref.quantize_activations(x_perm, perm.expert_offsets, perm.scale_row_offsets,
                                         **opts)
    assert torch.equal(a_q[good].cpu(), w_q[good].cpu())


# Segment shapes every launcher must handle: all rows on one expert (first or last), no
# rows at all (P = 0), empty experts around the used ones, offsets given as int64.
EDGE_CASES = {
    "one-expert-first": ([37, 0, 0], torch.int32),
    "one-expert-last": ([0, 0, 37], torch.int32),
    "no-pairs": ([0, 0, 0], torch.int32),
    "int64-offsets": ([0, 9, 0, 20, 0], torch.int64),
}


@pytest.mark.parametrize("launcher", ["plain", "gather", "silu"])
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_kernels_segment_edge_cases(case, launcher, device):
    counts, offset_dtype = EDGE_CASES[case]
    num_rows = sum(counts)
    segments = _segments(counts, 16, device, offset_dtype)
    opts = _opts(16, 2, "consistent")
    seed = 50 + list(EDGE_CASES).index(case)
    if launcher == "plain":
        x = _random((num_rows, 2 * BLOCK_K), torch.bfloat16, device, seed)
        got, want = _run_plain(x, *segments, opts)
    elif launcher == "silu":
        h = _random((num_rows, 4 * BLOCK_K), torch.bfloat16, device, seed)
        got, want = _run_silu(h, *segments, opts)
    else:
        hidden_states = _random((max(num_rows, 1), 2 * BLOCK_K), torch.float16, device, seed)
        gen = torch.Generator().manual_seed(seed)
        sorted_pair_ids = torch.randperm(num_rows, generator=gen).to(torch.int32).to(device)
        got = tri.permute_quantize(hidden_states, sorted_pair_ids, *segments, top_k=1,
                                   **opts)
        want = ref.quantize_activations(hidden_states[sorted_pair_ids.long()], *segments,
                                        **opts)
    assert got[1].shape[0] == ref.num_scale_rows(num_rows, len(counts), 16)
    _assert_same(got, want, *segments)


@pytest.mark.parametrize("scale_rounding", ref.SCALE_ROUNDINGS)
def test_kernels_round_ties_to_even(scale_rounding, device):
    """Exact ties, where half-to-even and half-up differ: block 0 has s = 16 and values
    16 * (k + 1/2); block 1 has s = 2.5, so s / F = 2.5 (F = 1), and values 2.5 * (k + 1/2)."""
    gen = torch.Generator().manual_seed(8)
    halves = torch.randint(-127, 127, (4, 2 * BLOCK_K), generator=gen).float() + 0.5
    x = torch.cat([16 * halves[:, :BLOCK_K], 2.5 * halves[:, BLOCK_K:]], dim=1)
    x[0, 0], x[1, BLOCK_K] = 16 * 127, -2.5 * 127
    segments = _segments([4], 4, device)
    got, want = _run_plain(x.to(device), *segments, _opts(4, 2, scale_rounding))
    _assert_same(got, want, *segments)
    a_q, a_qscale, a_fscale = got[0].cpu(), got[1][:1].cpu(), got[2][:1].cpu()  # 1 used
    assert a_fscale.tolist() == [[1.0]]
    if scale_rounding == "nearest":
        assert a_qscale.tolist() == [[16, 2]]  # rint(2.5) = 2
        expected = torch.round(halves)  # half to even: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2
        expected[0, 0], expected[1, BLOCK_K] = 127, -127
        assert torch.equal(a_q.float(), expected)
    else:
        assert a_qscale.tolist() == [[16, 3]]  # ceil(2.5) = 3


def _near_tie_rows(num_rows, num_blocks, tie_rows, seed):
    """``x [num_rows, num_blocks * BLOCK_K]`` fp32 whose every K-block has absmax
    ``A = 190.02458`` (in row 0), so s = RN(A / 127) everywhere and F = s / 16, Q = 16:
    both roundings quantize with s. Rows ``tie_rows`` hold the values within 3 ulps of
    (k + 1/2) * s where x * RN(1/s) and x / s round to different integers; every other
    one only those where x * RN(1/s) is not itself a half-integer (they need the near-tie
    margin). The other rows are random. Returns (x, s)."""
    absmax = torch.tensor(190.02458190917969, dtype=torch.float32)
    s = ref.ieee_div(absmax, 127)
    half_integers = torch.arange(-127, 127, dtype=torch.float32) + 0.5
    bits = (half_integers * s).view(torch.int32)
    near = torch.cat([(bits + d).view(torch.float32) for d in range(-3, 4)])
    fast = torch.round(torch.clamp(near * (torch.ones(()) / s), -128, 127))
    ties = near[fast != torch.round(torch.clamp(near / s, -128, 127))]
    product = near * (torch.ones(()) / s)
    off_half = (fast != torch.round(torch.clamp(near / s, -128, 127))) \
        & (product != torch.floor(product) + 0.5)
    assert len(ties) >= 16 and off_half.any()
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(num_rows, num_blocks * BLOCK_K, generator=gen) * 2 - 1) * absmax
    x[0, ::BLOCK_K] = absmax
    width = num_blocks * BLOCK_K - 1
    for i, row in enumerate(tie_rows):  # every other one: the off-half ones alone
        values = ties if i % 2 == 0 else near[off_half]
        x[row, 1:] = values.roll(i * 7).repeat(-(-width // len(values)))[:width]
    return x, s


# (rows, K-blocks, rows with near ties, max_tile_values): one tile; 70 one-row tiles in
# two K-tiles, past the 62 tiles the near-tie bitmask tells apart.
NEAR_TIE_CASES = {"one-tile": (8, 1, [0, 3, 7], None),
                  "many-tiles": (70, 2, [5, 61, 62, 66], BLOCK_K)}


@pytest.mark.parametrize("scale_rounding", ref.SCALE_ROUNDINGS)
@pytest.mark.parametrize("case", list(NEAR_TIE_CASES))
def test_kernels_near_tie_quotients(case, scale_rounding, device, monkeypatch):
    """Values where x * RN(1/s) and x / s round to different integers: the kernels'
    IEEE-division rewrite of those row tiles (``triton_moe.quant``, pass 4) must catch
    every one, in any row tile."""
    num_rows, num_blocks, tie_rows, max_tile_values = NEAR_TIE_CASES[case]
    if max_tile_values:
        monkeypatch.setitem(tri.ACT_QUANT_CONFIG, "max_tile_values",
                            {mode: max_tile_values for mode in tri.MODES})
    x, s = _near_tie_rows(num_rows, num_blocks, tie_rows, seed=9)
    fast = torch.round(torch.clamp(x * (torch.ones(()) / s), -128, 127))
    exact = torch.round(torch.clamp(x / s, -128, 127))
    differ = (fast != exact).any(dim=1).nonzero().flatten().tolist()
    assert set(differ) == set(tie_rows)  # the data does need the rewrite, in these rows
    segments = _segments([num_rows], num_rows, device)
    got, want = _run_plain(x.to(device), *segments,
                           _opts(num_rows, num_blocks, scale_rounding))
    _assert_same(got, want, *segments)
    assert torch.equal(want[0].float().cpu(), exact)  # and the oracle is the IEEE quotient's


def test_silu_extreme_rows(device, monkeypatch):
    """SiLU rows with values at the edges: gate -85 (exp(85) near the fp32 limit) with a
    huge up holding a block's absmax, equal largest values, a block of values below
    2**-100 (denormal products), in several row tiles of 2 rows, the last (kept) one too."""
    monkeypatch.setitem(tri.ACT_QUANT_CONFIG, "max_tile_values",
                        {mode: 4 * BLOCK_K for mode in tri.MODES})
    assert tri.act_quant_config("silu", 8, 2, 2, BLOCK_K)["BLOCK_ROWS"] == 2
    inter, rows = 2 * BLOCK_K, 8
    h = _random((rows, 2 * inter), torch.float32, "cpu", seed=75)
    gate, up = h[:, :inter], h[:, inter:]
    gate[1, 3], up[1, 3] = -85.0, 5e36   # row tile 0, block 0: the absmax (a = -103)
    gate[1, 90], up[1, 90] = -85.0, 1e37
    gate[2, BLOCK_K + 5], up[2, BLOCK_K + 5] = 6.0, 9.0  # tile 1, block 1: equal maxima
    gate[2, BLOCK_K + 70], up[2, BLOCK_K + 70] = 6.0, -9.0
    gate[5, :BLOCK_K], up[5, :BLOCK_K] = 1e-20, 1e-21  # tile 2, block 0: all tiny
    gate[7, BLOCK_K + 10], up[7, BLOCK_K + 10] = -85.0, 2e35  # the last row tile
    h = h.to(torch.bfloat16).to(device)
    segments = _segments([rows], rows, device)
    for rounding in ref.SCALE_ROUNDINGS:
        got, want = _run_silu(h, *segments, _opts(rows, 2, rounding))
        _assert_same(got, want, *segments)


def test_no_pairs_per_token_launches_nothing(device, monkeypatch):
    monkeypatch.setattr(tri, "_quantize_act_kernel", None)  # a launch would raise
    segments = _segments([0, 0], 1, device)
    opts = _opts(1, 4, "consistent")
    a_q, a_qscale, a_fscale = tri.quantize_activations(
        torch.empty(0, 2 * BLOCK_K, device=device), *segments, **opts)
    assert a_q.shape == (0, 2 * BLOCK_K) and a_qscale.shape == (0, 2)
    assert a_fscale.shape == (0, 1)
    a_q, _, _ = tri.silu_mul_quantize(torch.empty(0, 4 * BLOCK_K, device=device), *segments,
                                      **opts)
    assert a_q.shape == (0, 2 * BLOCK_K)


# Outlier gates reach -90: exp(-gate) overflows fp32 to inf (numpy warns in the
# interpreter) and silu gives -0, on both sides.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("launcher", ["plain", "silu"])
@pytest.mark.parametrize("scale_rounding", ref.SCALE_ROUNDINGS)
def test_kernels_outlier_channels(launcher, scale_rounding, device):
    """1% of the channels x30: most blocks are small next to their super group's max, so
    "nearest" drops or coarsens them; the kernels must still match bit for bit."""
    counts, act_block_m = [20, 0, 45], 16
    segments = _segments(counts, act_block_m, device)
    opts = _opts(act_block_m, 4, scale_rounding)
    if launcher == "plain":
        x = _random((sum(counts), 4 * BLOCK_K), torch.bfloat16, device, 60, outliers=True)
        got, want = _run_plain(x, *segments, opts)
    else:
        h = _random((sum(counts), 8 * BLOCK_K), torch.bfloat16, device, 61, outliers=True)
        got, want = _run_silu(h, *segments, opts)
    _assert_same(got, want, *segments)


@pytest.mark.parametrize("launcher", ["plain", "silu"])
def test_kernels_with_small_tiles(launcher, device, monkeypatch):
    """Tiles smaller than a super group and a scale block: the kernel walks several tiles
    of K-blocks (one-hot moves between tile and group vectors) and several row chunks."""
    monkeypatch.setitem(tri.ACT_QUANT_CONFIG, "max_tile_values",
                        {mode: 4 * BLOCK_K for mode in tri.MODES})
    config = tri.act_quant_config(launcher, 3, 6, 256, BLOCK_K)
    assert config["TILE_BLOCKS"] == 4 < config["GROUP_PAD"] == 8 and config["BLOCK_ROWS"] == 1
    counts, act_block_m = [4, 3], 3
    segments = _segments(counts, act_block_m, device)
    opts = _opts(act_block_m, 256, "nearest")  # one super group of 6 blocks: 2 tiles
    if launcher == "plain":
        x = _random((sum(counts), 6 * BLOCK_K), torch.float32, device, 70, outliers=True)
        got, want = _run_plain(x, *segments, opts)
    else:
        h = _random((sum(counts), 12 * BLOCK_K), torch.float32, device, 71, outliers=True)
        got, want = _run_silu(h, *segments, opts)
    _assert_same(got, want, *segments)


# ----------------------------------------------------------------------------- sm_90 compile
# mode -> (source pointer type, rounding, act_block_m, K-blocks, G, config overrides);
# act_block_m 1 compiles quant_per_token's kernel (the launchers' choice).
AOT_CASES = {
    "plain-nearest-m128-G4": ("plain", "*bf16", "nearest", 128, 16, 4, {}),
    "plain-consistent-m1-G256": ("plain", "*fp32", "consistent", 1, 16, 256, {}),
    "plain-multi-tile": ("plain", "*bf16", "nearest", 64, 16, 16,
                         {"TILE_BLOCKS": 4, "BLOCK_ROWS": 4}),
    "plain-m1-multi-tile": ("plain", "*bf16", "nearest", 1, 32, 32, {}),
    "gather-nearest-m1-G4": ("gather", "*fp16", "nearest", 1, 16, 4, {}),
    "gather-consistent-m64-G4": ("gather", "*bf16", "consistent", 64, 16, 4, {}),
    "scatter-consistent-m1-G4": ("scatter", "*bf16", "consistent", 1, 16, 4, {}),
    "scatter-nearest-m1-multi-tile": ("scatter", "*fp32", "nearest", 1, 56, 256, {}),
    "silu-nearest-m1-G4": ("silu", "*bf16", "nearest", 1, 4, 4, {}),
    "silu-consistent-m1-G256": ("silu", "*fp16", "consistent", 1, 4, 256, {}),
    "silu-table-m1-G4": ("silu", "*bf16", "consistent", 1, 4, 4, {"SILU_TABLE": True}),
    "silu-nearest-m128-G4": ("silu", "*bf16", "nearest", 128, 4, 4, {}),
    "silu-multi-tile": ("silu", "*bf16", "consistent", 64, 8, 256,
                        {"TILE_BLOCKS": 4, "BLOCK_ROWS": 2}),
}


def _compile_case(mode, src_type, rounding, act_block_m, num_blocks, group, overrides):
    if act_block_m == 1:
        return _compile_per_token_case(mode, src_type, rounding, num_blocks, group,
                                       overrides.get("SILU_TABLE", False))
    config = tri.act_quant_config(mode, act_block_m, num_blocks, group, BLOCK_K)
    config.update(overrides)
    num_warps = config.pop("num_warps")
    signature = {"src_ptr": src_type, "sorted_pair_ids_ptr": "*i32",
                 "expert_offsets_ptr": "*i32", "scale_row_offsets_ptr": "*i32",
                 "a_q_ptr": "*i8", "a_qscale_ptr": "*i32", "a_fscale_ptr": "*fp32",
                 "num_cols": "i32", "num_blocks": "i32", "stride_src_m": "i32",
                 "stride_aqm": "i32", "stride_qsm": "i32", "stride_fsm": "i32"}
    constexprs = dict(MODE=mode, TOP_K=8, NUM_EXPERTS=256, E_PAD=256,
                      ACT_BLOCK_M=act_block_m, BLOCK_K=BLOCK_K, SUPER_GROUP=group,
                      Q_MAX=Q_MAX, ROUNDING=rounding, **config)
    return compile_for_hopper(tri._quantize_act_kernel, signature, constexprs,
                              num_warps=num_warps)


def _compile_per_token_case(mode, src_type, rounding, num_blocks, group, silu_table):
    config_mode = "silu_computed" if mode == "silu" and not silu_table else mode
    config = tri_pt.per_token_config(config_mode, num_blocks, group, BLOCK_K, num_rows=8192)
    num_warps = config.pop("num_warps")
    signature = {"src_ptr": src_type, "sorted_pair_ids_ptr": "*i32", "pair_to_row_ptr": "*i32",
                 "expert_offsets_ptr": "*i32", "a_q_ptr": "*i8", "a_qscale_ptr": "*i32",
                 "a_fscale_ptr": "*fp32", "silu_table_ptr": "*fp32", "num_src_rows": "i32",
                 "num_cols": "i32",
                 "num_blocks": "i32", "stride_src_m": "i32", "stride_aqm": "i32",
                 "stride_qsm": "i32", "stride_fsm": "i32"}
    constexprs = dict(MODE=mode, TOP_K=8, NUM_EXPERTS=256, BLOCK_K=BLOCK_K,
                      SUPER_GROUP=group, Q_MAX=Q_MAX, ROUNDING=rounding, GDC=False,
                      SILU_TABLE=silu_table, **config)
    return compile_for_hopper(tri_pt._quantize_rows_kernel, signature, constexprs,
                              num_warps=num_warps)


def _aot_main():
    """Child-process entry: compile every AOT case, return {case: PTX facts}."""
    facts = {}
    for name, case in AOT_CASES.items():
        ptx = _compile_case(*case).asm["ptx"]
        facts[name] = {"sm_90": ".target sm_90" in ptx, "div_rn": "div.rn.f32" in ptx,
                       "approx_div": "div.full.f32" in ptx or "div.approx.f32" in ptx,
                       "fp32_exp": "ex2.approx" in ptx, "fp64": "fma.rn.f64" in ptx}
    return facts


@pytest.fixture(scope="module")
def aot_facts():
    """One child process compiles every case (tests/aot.py says why a child)."""
    return run_without_interpreter("tests.test_quant", "_aot_main")


@pytest.mark.parametrize("case", list(AOT_CASES))
def test_kernel_compiles_for_sm90(case, aot_facts):
    facts = aot_facts[case]
    assert facts["sm_90"]
    # IEEE division only: the scales and the near-tie rewrite use div_rn (SPEC 4)
    assert facts["div_rn"] and not facts["approx_div"]
    assert not facts["fp32_exp"]  # SiLU's exp is the fp64 one the oracle uses
    # ... or none: the table path reads gate / (1 + exp(-gate)) from silu_gate_table
    assert facts["fp64"] == (case.startswith("silu")
                             and not AOT_CASES[case][-1].get("SILU_TABLE", False))


# ----------------------------------------------------------------------------- real sizes
@pytest.mark.gpu
@pytest.mark.parametrize("scale_rounding", ref.SCALE_ROUNDINGS)
@pytest.mark.parametrize("act_block_m, group", [(1, 4), (64, 4), (128, 256)])
def test_kernels_real_size(act_block_m, group, scale_rounding):
    """35B-A3B shapes (M=8192, K=2048, N=512, E=256, top-k 8), bit-exact on the GPU."""
    num_tokens, hidden, inter, top_k, num_experts = 8192, 2048, 512, 8, 256
    sorted_pair_ids, counts = _routing(num_tokens, top_k, num_experts, seed=80)
    segments = _segments(counts, act_block_m, "cuda")
    opts = _opts(act_block_m, group, scale_rounding)
    hidden_states = _random((num_tokens, hidden), torch.bfloat16, "cuda", 81, outliers=True)
    got = tri.permute_quantize(hidden_states, sorted_pair_ids.cuda(), *segments,
                               top_k=top_k, **opts)
    x_perm = hidden_states[sorted_pair_ids.long().cuda() // top_k]
    _assert_same(got, ref.quantize_activations(x_perm, *segments, **opts), *segments)
    h = _random((num_tokens * top_k, 2 * inter), torch.bfloat16, "cuda", 82) * 3
    _assert_same(*_run_silu(h, *segments, opts), *segments)


@pytest.mark.gpu
def test_silu_kernel_wide_super_group_real_size():
    """Mixtral's N = 14336 with one super group per row: 112 K-blocks, several tiles."""
    inter, counts = 14336, [300, 0, 17, 211, 1, 0, 90, 405]
    segments = _segments(counts, 64, "cuda")
    h = _random((sum(counts), 2 * inter), torch.bfloat16, "cuda", 90, outliers=True)
    for rounding in ref.SCALE_ROUNDINGS:
        _assert_same(*_run_silu(h, *segments, _opts(64, 256, rounding)), *segments)


@pytest.mark.gpu
def test_quantize_weight_mixtral_size_memory():
    """Mixtral-8x7B w13 [8, 2N, K] on the GPU: chunked, so temporaries stay bounded."""
    w13 = torch.randn(8, 2 * 14336, 4096, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    w_q, qscale, fscale = ref.quantize_weight(w13, block_n=64, block_k=BLOCK_K, q_max=Q_MAX,
                                              super_group_size=4, scale_rounding="consistent")
    outputs = w_q.numel() + qscale.numel() * 4 + fscale.numel() * 4
    assert torch.cuda.max_memory_allocated() - base - outputs < 6 * 2**30
    assert w_q.shape == w13.shape and qscale.shape == (8, 448, 32) and fscale.shape == (8, 448, 8)


def test_ieee_div_is_correctly_rounded(device):
    """The oracle's scale divisions must be IEEE on every device (torch on CUDA turns a
    division by a Python scalar into a multiplication by its reciprocal)."""
    from reference.quant import ieee_div

    x = torch.rand(1 << 16, device=device) * 10
    exact = (x.double() / 127).float()    # fp32 division correctly rounded via fp64
    assert torch.equal(ieee_div(x, 127).cpu(), exact.cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_silu_table_every_gate_value(dtype, device):
    """16-bit gates take ``gate / (1 + exp(-gate))`` from ``silu_gate_table`` (the oracle's
    own bits, looked up by bit pattern): every finite gate value of the dtype, per-token
    SiLU quantization against the oracle, bit for bit."""
    table = tri.silu_gate_table(dtype, torch.device(device))
    assert table is not None and table.dtype == torch.float32 and table.shape == (65536,)
    assert tri.silu_gate_table(dtype, torch.device(device)) is table   # built once
    assert tri.silu_gate_table(torch.float32, torch.device(device)) is None
    bits = torch.arange(65536, dtype=torch.int32)
    gates = torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16).view(dtype)
    gates = gates[torch.isfinite(gates.float())]
    inter = 4 * BLOCK_K
    rows = -(-gates.numel() // inter)
    gate = torch.zeros(rows * inter, dtype=dtype)
    gate[:gates.numel()] = gates
    # |up| < 1: no product overflows (a row with an Inf has no defined int8 values or Q,
    # README "non-finite values"; the oracle's own Q for one differs between CPU and GPU)
    gen = torch.Generator().manual_seed(81)
    up = ((torch.rand(rows, inter, generator=gen) * 2 - 1) * 0.99).to(dtype)
    h = torch.cat([gate.view(rows, inter), up], dim=1).to(device)
    assert torch.isfinite(ref.silu_mul(h)).all()
    segments = _segments([rows], 1, device)
    got, want = _run_silu(h, *segments, _opts(1, 4, "consistent"))
    _assert_same(got, want, *segments)


def test_silu_table_matches_the_computed_path(device, monkeypatch):
    """The table path and the fp64-exp path of the per-token kernel give the same bits."""
    segments = _segments([40, 0, 25], 1, device)
    opts = _opts(1, 4, "consistent")
    h = _random((65, 8 * BLOCK_K), torch.bfloat16, device, seed=82) * 4
    with_table = tri.silu_mul_quantize(h, *segments, **opts)
    monkeypatch.setattr(tri_pt, "silu_gate_table", lambda dtype, device: None)
    computed = tri.silu_mul_quantize(h, *segments, **opts)
    _assert_same(with_table, computed, *segments)   # the rows and scale rows written
