"""Permutation (SPEC 3): the oracle's properties checked directly and on a hand-worked case,
then the Triton kernels against the oracle, and the kernels compiled for sm_90.

All outputs are int32 and must match the oracle bit for bit (the order inside an expert is
fixed by stability, so there is exactly one right answer).
"""
from pathlib import Path

import pytest
import torch

from reference import permute as ref
from tests.aot import compile_for_hopper, run_without_interpreter
from triton_moe import permute as tri

REPO_ROOT = Path(__file__).resolve().parents[1]


def _random_ids(num_tokens, top_k, num_ids, seed, device, dtype=torch.int32):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_ids, (num_tokens, top_k), generator=gen, dtype=torch.int64)
    return ids.to(dtype).to(device)


def _random_expert_map(num_global, num_local, seed, device):
    """A shuffled global -> local map; the num_global - num_local experts left are -1."""
    gen = torch.Generator().manual_seed(seed)
    expert_map = torch.full((num_global,), -1, dtype=torch.int32)
    chosen = torch.randperm(num_global, generator=gen)[:num_local]
    expert_map[chosen] = torch.arange(num_local, dtype=torch.int32)
    return expert_map.to(device)


def _assert_same(got: ref.Permutation, want: ref.Permutation):
    for name in ref.Permutation._fields:
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == torch.int32, name
        assert torch.equal(g.cpu(), w.cpu()), name


def _check_properties(perm: ref.Permutation, local: torch.Tensor, num_experts, act_block_m):
    """What a Permutation must satisfy, from design.md, for local ids ``local`` (-1 = dropped)."""
    counts = torch.tensor([(local == e).sum().item() for e in range(num_experts)])
    assert perm.expert_counts.tolist() == counts.tolist()
    assert perm.expert_offsets.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    blocks = (counts + act_block_m - 1) // act_block_m
    assert perm.scale_row_offsets.tolist() == [0] + torch.cumsum(blocks, 0).tolist()
    num_rows = perm.expert_offsets[-1].item()
    assert num_rows == (local >= 0).sum().item()
    sorted_ids, pair_to_row = perm.sorted_pair_ids.long(), perm.pair_to_row.long()
    assert (sorted_ids[num_rows:] == -1).all()
    assert ((pair_to_row == -1) == (local < 0)).all()
    # Inverse of each other on the valid rows / kept pairs.
    assert torch.equal(pair_to_row[sorted_ids[:num_rows]], torch.arange(num_rows))
    kept = (local >= 0).nonzero().squeeze(1)
    assert torch.equal(sorted_ids[pair_to_row[kept]], kept)
    # Segment e holds exactly expert e's pairs, ascending (stable).
    for e in range(num_experts):
        lo, hi = perm.expert_offsets[e].item(), perm.expert_offsets[e + 1].item()
        segment = sorted_ids[lo:hi]
        assert (local[segment] == e).all()
        assert (segment[1:] > segment[:-1]).all()


# ----------------------------------------------------------------------------- the oracle
def test_reference_hand_worked():
    # 4 tokens, top_k 2, experts 0..2; expert 2 gets nothing, expert 1 three pairs.
    topk_ids = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0]], dtype=torch.int32)
    perm = ref.permute(topk_ids, 3, act_block_m=2)
    # pairs: p0->1 p1->0 p2->0 p3->1 p4->1 p5->0 p6->0 p7->0
    assert perm.expert_counts.tolist() == [5, 3, 0]
    assert perm.expert_offsets.tolist() == [0, 5, 8, 8]
    assert perm.sorted_pair_ids.tolist() == [1, 2, 5, 6, 7, 0, 3, 4]
    assert perm.pair_to_row.tolist() == [5, 0, 1, 6, 7, 2, 3, 4]
    assert perm.scale_row_offsets.tolist() == [0, 3, 5, 5]


def test_reference_hand_worked_expert_map():
    # Global experts 0..3 -> local [1, -1, 0, -1]: pairs on global 1 and 3 are dropped.
    topk_ids = torch.tensor([[3, 0], [2, 1], [0, 2]], dtype=torch.int32)
    expert_map = torch.tensor([1, -1, 0, -1], dtype=torch.int32)
    perm = ref.permute(topk_ids, 2, expert_map=expert_map, act_block_m=128)
    # local per pair: p0 -1, p1 1, p2 0, p3 -1, p4 1, p5 0
    assert perm.expert_counts.tolist() == [2, 2]
    assert perm.expert_offsets.tolist() == [0, 2, 4]
    assert perm.sorted_pair_ids.tolist() == [2, 5, 1, 4, -1, -1]
    assert perm.pair_to_row.tolist() == [-1, 2, 0, -1, 3, 1]
    assert perm.scale_row_offsets.tolist() == [0, 1, 2]


@pytest.mark.parametrize("num_experts,top_k,num_tokens,act_block_m",
                         [(1, 1, 5, 1), (7, 2, 33, 4), (64, 8, 40, 128), (5, 3, 0, 64)])
@pytest.mark.parametrize("use_map", [False, True])
def test_reference_properties(num_experts, top_k, num_tokens, act_block_m, use_map):
    num_ids = 2 * num_experts + 1 if use_map else num_experts
    topk_ids = _random_ids(num_tokens, top_k, num_ids, seed=num_experts, device="cpu")
    expert_map = _random_expert_map(num_ids, num_experts, 1, "cpu") if use_map else None
    perm = ref.permute(topk_ids, num_experts, expert_map=expert_map, act_block_m=act_block_m)
    local = topk_ids.reshape(-1).long()
    if use_map:
        local = expert_map.long()[local]
    _check_properties(perm, local, num_experts, act_block_m)


# ----------------------------------------------------------------------------- the kernels
# Every E x top_k at M = 0, 1, 33 (one block or two), and M = 512 (4 to 32 blocks) on a
# few of them to keep the interpreter run short.
PERMUTE_SHAPES = ([(e, k, m) for e in (1, 7, 64, 256) for k in (1, 2, 8) for m in (0, 1, 33)]
                  + [(1, 8, 512), (7, 2, 512), (64, 1, 512), (256, 8, 512)])


@pytest.mark.parametrize("num_experts,top_k,num_tokens", PERMUTE_SHAPES)
def test_permute_matches_reference(num_experts, top_k, num_tokens, device):
    topk_ids = _random_ids(num_tokens, top_k, num_experts, seed=num_tokens + top_k, device=device)
    got = tri.permute(topk_ids, num_experts)
    want = ref.permute(topk_ids.cpu(), num_experts)
    _assert_same(got, want)
    if num_tokens == 0:
        assert got.expert_offsets.tolist() == [0] * (num_experts + 1)


@pytest.mark.parametrize("act_block_m", [1, 64, 128])
@pytest.mark.parametrize("num_experts", [7, 64])
def test_permute_act_block_m(num_experts, act_block_m, device):
    topk_ids = _random_ids(300, 2, num_experts, seed=act_block_m, device=device)
    got = tri.permute(topk_ids, num_experts, act_block_m=act_block_m)
    _assert_same(got, ref.permute(topk_ids.cpu(), num_experts, act_block_m=act_block_m))


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("top_k", [2, 8])
def test_permute_expert_map(top_k, ids_dtype, device):
    num_global, num_local = 20, 7  # 13 global experts live elsewhere: their pairs drop
    topk_ids = _random_ids(45, top_k, num_global, seed=top_k, device=device, dtype=ids_dtype)
    expert_map = _random_expert_map(num_global, num_local, seed=3, device=device)
    got = tri.permute(topk_ids, num_local, expert_map=expert_map, act_block_m=64)
    want = ref.permute(topk_ids.cpu(), num_local, expert_map=expert_map.cpu(), act_block_m=64)
    _assert_same(got, want)
    assert (got.pair_to_row == -1).any() and got.expert_offsets[-1].item() < topk_ids.numel()


def test_permute_all_pairs_dropped(device):
    topk_ids = _random_ids(40, 4, 8, seed=5, device=device)
    expert_map = torch.full((8,), -1, dtype=torch.int32, device=device)
    got = tri.permute(topk_ids, 3, expert_map=expert_map)
    _assert_same(got, ref.permute(topk_ids.cpu(), 3, expert_map=expert_map.cpu()))
    assert (got.sorted_pair_ids == -1).all() and (got.pair_to_row == -1).all()


@pytest.mark.parametrize("use_map", [False, True])
def test_permute_marks_out_of_range_ids(use_map, device):
    """Out-of-range ids (negative, >= E_global, or an expert_map value outside [-1, E))
    are routed nowhere and marked INVALID_PAIR, never read or written out of bounds."""
    num_global, num_local = (12, 5) if use_map else (5, 5)
    topk_ids = _random_ids(30, 2, num_global, seed=9, device=device)
    topk_ids[2, 0], topk_ids[5, 1], topk_ids[11, 0] = num_global, -1, 10**6
    expert_map = None
    if use_map:
        expert_map = _random_expert_map(num_global, num_local, seed=4, device=device)
        expert_map[topk_ids[20, 1]] = num_local + 3   # a corrupt map entry
    got = tri.permute(topk_ids, num_local, expert_map=expert_map)
    want = ref.permute(topk_ids.cpu(), num_local,
                       expert_map=None if expert_map is None else expert_map.cpu())
    _assert_same(got, want)
    invalid = (got.pair_to_row == ref.INVALID_PAIR).nonzero().flatten().tolist()
    assert {4, 11, 22} <= set(invalid)
    assert (41 in invalid) == use_map


def test_permute_expert_with_no_tokens(device):
    topk_ids = _random_ids(64, 4, 6, seed=6, device=device)
    topk_ids = topk_ids + (topk_ids >= 3).to(topk_ids.dtype)  # expert 3 of 0..6 gets nothing
    got = tri.permute(topk_ids, 7, act_block_m=16)
    _assert_same(got, ref.permute(topk_ids.cpu(), 7, act_block_m=16))
    assert got.expert_counts[3].item() == 0


def test_permute_all_pairs_on_one_expert(device):
    # 600 pairs in 5 blocks, all on expert 5: exercises the per-block start rows.
    topk_ids = torch.full((300, 2), 5, dtype=torch.int32, device=device)
    got = tri.permute(topk_ids, 64)
    _assert_same(got, ref.permute(topk_ids.cpu(), 64))
    assert torch.equal(got.sorted_pair_ids.cpu(), torch.arange(600, dtype=torch.int32))


def test_permute_noncontiguous_ids(device):
    topk_ids = _random_ids(8, 40, 7, seed=8, device=device).t()  # [40, 8], not contiguous
    _assert_same(tri.permute(topk_ids, 7), ref.permute(topk_ids.cpu(), 7))


def test_expert_scan_several_steps(device):
    """The scan kernel walking a row in several SCAN_BLOCK steps (real sizes need more
    than 1024 blocks for that, too many programs for the interpreter)."""
    gen = torch.Generator().manual_seed(9)
    num_experts, num_blocks = 5, 37
    block_counts = torch.randint(0, 129, (num_experts, num_blocks), generator=gen,
                                 dtype=torch.int32)
    want_starts = torch.cumsum(block_counts, 1, dtype=torch.int32) - block_counts
    want_counts = block_counts.sum(1, dtype=torch.int32)
    table = block_counts.to(device)
    expert_counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    tri._expert_scan_kernel[(3,)](table, expert_counts, num_experts, num_blocks,
                                  EXPERTS_PER_PROGRAM=2, SCAN_BLOCK=8)
    assert torch.equal(table.cpu(), want_starts)
    assert torch.equal(expert_counts.cpu(), want_counts)


def test_empty_batch_launches_nothing(device, monkeypatch):
    for name in ("_block_histogram_kernel", "_expert_scan_kernel", "_scatter_kernel"):
        monkeypatch.setattr(tri, name, None)  # a launch would raise
    perm = tri.permute(torch.empty(0, 8, dtype=torch.int32, device=device), 16)
    assert perm.sorted_pair_ids.shape == perm.pair_to_row.shape == (0,)
    assert perm.expert_offsets.tolist() == perm.scale_row_offsets.tolist() == [0] * 17
    assert perm.expert_counts.tolist() == [0] * 16


@pytest.mark.gpu
@pytest.mark.parametrize("num_experts,use_map", [(256, False), (512, False), (256, True)])
def test_permute_real_size_gpu(num_experts, use_map):
    num_ids = 2 * num_experts if use_map else num_experts
    topk_ids = _random_ids(16384, 8, num_ids, seed=10, device="cuda")  # 131072 pairs
    expert_map = _random_expert_map(num_ids, num_experts, 11, "cuda") if use_map else None
    got = tri.permute(topk_ids, num_experts, expert_map=expert_map)
    _assert_same(got, ref.permute(topk_ids, num_experts, expert_map=expert_map))


# ----------------------------------------------------------------------------- sm_90 compile
def compile_kernels_for_sm90() -> dict:
    """Compile every permute kernel for sm_90; returns {kernel variant: uses atomics}.

    Runs in a child process without TRITON_INTERPRET (see ``test_kernels_compile_for_sm90``).
    """
    block_p, num_warps = tri.PERMUTE_CONFIG["BLOCK_P"], tri.PERMUTE_CONFIG["num_warps"]
    ints = {name: "i32" for name in ("num_pairs", "num_experts", "num_global_experts",
                                     "num_blocks")}
    ptrs = ("block_starts_ptr", "expert_counts_ptr", "expert_offsets_ptr",
            "scale_row_offsets_ptr", "sorted_pair_ids_ptr", "pair_to_row_ptr")
    uses_atomics = {}
    for ids_type, has_map, num_experts in [("*i32", False, 256), ("*i64", True, 512)]:
        e_pad = 1 << (num_experts - 1).bit_length()
        variant = f"{ids_type},map={has_map},E={num_experts}"
        compiled = compile_for_hopper(
            tri._block_histogram_kernel,
            {"topk_ids_ptr": ids_type, "expert_map_ptr": "*i32", "block_counts_ptr": "*i32",
             **ints},
            {"HAS_EXPERT_MAP": has_map, "BLOCK_P": block_p, "E_PAD": e_pad},
            num_warps=num_warps)
        uses_atomics["histogram " + variant] = "atom." in compiled.asm["ptx"]
        compiled = compile_for_hopper(
            tri._scatter_kernel,
            {"topk_ids_ptr": ids_type, "expert_map_ptr": "*i32",
             **{name: "*i32" for name in ptrs}, **ints, "act_block_m": "i32"},
            {"HAS_EXPERT_MAP": has_map, "BLOCK_P": block_p, "E_PAD": e_pad,
             "SINGLE_BLOCK": False},
            num_warps=num_warps)
        uses_atomics["scatter " + variant] = "atom." in compiled.asm["ptx"]
        # The small-batch path: one program counts (tl.histogram), scans and scatters.
        single = tri.SINGLE_BLOCK_CONFIG
        compiled = compile_for_hopper(
            tri._scatter_kernel,
            {"topk_ids_ptr": ids_type, "expert_map_ptr": "*i32",
             **{name: "*i32" for name in ptrs}, **ints, "act_block_m": "i32"},
            {"HAS_EXPERT_MAP": has_map, "BLOCK_P": single["MAX_PAIRS"], "E_PAD": e_pad,
             "SINGLE_BLOCK": True},
            num_warps=single["num_warps"])
        uses_atomics["histogram single-block " + variant] = "atom." in compiled.asm["ptx"]
        if has_map:  # the scan does not depend on the variant: compile it once
            continue
        experts_per_program, scan_block = tri._scan_shape(num_experts, 1024)
        compiled = compile_for_hopper(
            tri._expert_scan_kernel,
            {"block_counts_ptr": "*i32", "expert_counts_ptr": "*i32", "num_experts": "i32",
             "num_blocks": "i32"},
            {"EXPERTS_PER_PROGRAM": experts_per_program, "SCAN_BLOCK": scan_block},
            num_warps=tri.SCAN_CONFIG["num_warps"])
        uses_atomics["scan " + variant] = "atom." in compiled.asm["ptx"]
    return uses_atomics


def test_kernels_compile_for_sm90():
    """In a child process: under TRITON_INTERPRET=1, Triton's own @jit library functions
    (tl.cumsum, tl.sum) are interpreter objects, so kernels calling them cannot be
    compiled in this process even if the kernel module is loaded again."""
    uses_atomics = run_without_interpreter("tests.test_permute", "compile_kernels_for_sm90")
    assert len(uses_atomics) == 7
    # The scatter and the scan use no atomics at all. (tl.histogram lowers to shared-memory
    # integer atomics: integer adds commute, so its counts are deterministic too.)
    assert not any(used for name, used in uses_atomics.items()
                   if not name.startswith("histogram")), uses_atomics
