"""Routing (SPEC 2): the oracle against direct formulas and a hand-worked grouped case,
tie order in oracle and kernel, and the Triton kernels against the oracle.

Expert ids must match exactly. Weights: atol 1e-6, rtol 1e-5 -- Triton's exp (numpy
under the interpreter, ex2-based on the GPU) differs from torch's by a few ulps, and the
kernel renormalizes by the chosen exponentials where the oracle renormalizes the chosen
probabilities, a few more roundings on values <= 2.5.
"""
import math

import pytest
import torch

from reference import routing as ref
from tests.aot import compile_for_hopper, run_without_interpreter
from triton_moe import routing as tri

WEIGHT_TOL = dict(atol=1e-6, rtol=1e-5)
IMPLS = {"reference": ref, "triton": tri}


def _grid_logits(num_tokens, num_experts, dtype, device, seed):
    """Random logits on a 1/64 grid in [-4, 4): exact in bf16/fp16, full of exact ties (so
    the tie rule is exercised on every shape), and distinct values differ by >= 1/64, which
    moves sigmoid by >= 2.7e-4, far more than the ulps by which Triton's exp/sigmoid may
    differ from torch's, so both see the same expert order."""
    gen = torch.Generator().manual_seed(seed)
    ints = torch.randint(-256, 256, (num_tokens, num_experts), generator=gen)
    return (ints.float() / 64).to(dtype).to(device)


def _num_tokens(num_experts):
    """Tokens that leave the last program partial (and span several programs when
    E > 32), few enough for the interpreter, whose cost is per program and per op."""
    return 24 if num_experts <= 128 else 10


def _grid_bias(num_experts, device, seed):
    """A correction bias on a 1/256 grid in [-1/16, 1/16). s + bias of two experts can
    land within ulps of each other only by a coincidence (none with these seeds)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-16, 16, (num_experts,), generator=gen).float() / 256).to(device)


def _logit(p):
    """Inverse sigmoid: a logit whose sigmoid is p (to fp32 rounding)."""
    return math.log(p / (1.0 - p))


# ----------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("renormalize", [True, False])
def test_reference_softmax_matches_direct_formula(renormalize):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=gen)
    logits[1, 3] = logits[1, 7] = logits[1].max() + 1.0  # a tie at the top of row 1
    logits[2] = 0.5  # a fully tied row
    top_k = 3
    weights, ids = ref.route_softmax(logits, top_k, renormalize=renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    for row in range(logits.shape[0]):
        values = logits[row].tolist()
        order = sorted(range(len(values)), key=lambda e: (-values[e], e))[:top_k]
        probs = torch.softmax(logits[row], dim=0)[order]
        if renormalize:
            probs = probs / probs.sum()
        assert ids[row].tolist() == order
        torch.testing.assert_close(weights[row], probs, atol=1e-7, rtol=1e-6)
    assert ids[1, :2].tolist() == [3, 7] and ids[2].tolist() == [0, 1, 2]


# Hand-worked grouped case: E = 8 in 4 groups of 2, keep 2 groups, top_k = 3.
#   s      = [0.9, 0.1 | 0.6, 0.5 | 0.2, 0.8 | 0.7, 0.3]
#   bias   = [0,   0   | 0,   0   | 0.5, 0   | -0.1, 0 ]
#   biased = [0.9, 0.1 | 0.6, 0.5 | 0.7, 0.8 | 0.6, 0.3]
#   group scores (sum of the two best) = [1.0, 1.1, 1.5, 0.9] -> keep groups 2, 1
#   (expert 0, the best single score, is dropped with its group).
#   top 3 biased among experts {2, 3, 4, 5}: 5 (0.8), 4 (0.7), 2 (0.6)
#   unbiased s of 5, 4, 2 = [0.8, 0.2, 0.6], sum 1.6 -> [0.5, 0.125, 0.375]
#   times routed_scaling_factor 2: [1.0, 0.25, 0.75]; without renormalize [1.6, 0.4, 1.2].
HAND_S = [0.9, 0.1, 0.6, 0.5, 0.2, 0.8, 0.7, 0.3]
HAND_BIAS = [0.0, 0.0, 0.0, 0.0, 0.5, 0.0, -0.1, 0.0]


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("renormalize,expected_weights",
                         [(True, [1.0, 0.25, 0.75]), (False, [1.6, 0.4, 1.2])])
def test_sigmoid_grouped_hand_example(impl, renormalize, expected_weights, device):
    logits = torch.tensor([[_logit(p) for p in HAND_S]], device=device)
    bias = torch.tensor(HAND_BIAS, device=device)
    weights, ids = IMPLS[impl].route_sigmoid_grouped(
        logits, 3, num_expert_group=4, topk_group=2, correction_bias=bias,
        renormalize=renormalize, routed_scaling_factor=2.0)
    assert ids.cpu().tolist() == [[5, 4, 2]]
    torch.testing.assert_close(weights.cpu(), torch.tensor([expected_weights]),
                               atol=1e-6, rtol=1e-6)  # sigmoid(logit(p)) = p to ~1 ulp


# ----------------------------------------------------------------------------- tie order
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_softmax_ties_go_to_lower_index(impl, device):
    logits = torch.tensor([[1.0] * 8,
                           [1.0, 3.0, 3.0, 1.0, 3.0, 2.0, 2.0, 3.0]], device=device)
    weights, ids = IMPLS[impl].route_softmax(logits, 5)
    assert ids.cpu().tolist() == [[0, 1, 2, 3, 4], [1, 2, 4, 7, 5]]
    torch.testing.assert_close(weights[0].cpu(), torch.full((5,), 0.2), **WEIGHT_TOL)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_sigmoid_ties_go_to_lower_group_and_index(impl, device):
    # E = 16 in 4 groups of 4. Row 0: all equal -> groups 0, 1 kept, experts 0..5 in order.
    # Row 1: group 0 lowered; groups 1, 2, 3 tie -> 1, 2 kept -> experts 4..9.
    logits = torch.zeros(2, 16, device=device)
    logits[1, :4] = -1.0
    weights, ids = IMPLS[impl].route_sigmoid_grouped(logits, 6, num_expert_group=4,
                                                     topk_group=2)
    assert ids.cpu().tolist() == [[0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9]]
    torch.testing.assert_close(weights.cpu(), torch.full((2, 6), 1.0 / 6), **WEIGHT_TOL)


# ----------------------------------------------------------------------------- kernel vs oracle
def _check_against_reference(scoring, logits, top_k, **options):
    weights, ids = tri.route(logits, top_k, scoring=scoring, **options)
    ref_weights, ref_ids = ref.route(logits, top_k, scoring=scoring, **options)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.shape == weights.shape == (logits.shape[0], top_k)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, **WEIGHT_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("num_experts", [8, 6, 60, 256])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_kernel_matches_reference(scoring, num_experts, top_k, dtype, device):
    if top_k > num_experts:
        pytest.skip("top_k > E")
    logits = _grid_logits(_num_tokens(num_experts), num_experts, dtype, device,
                          seed=num_experts * 10 + top_k)
    _check_against_reference(scoring, logits, top_k)


GROUPED_CASES = [
    # E, num_expert_group, topk_group, top_k, routed_scaling_factor, with bias, dtype, renormalize
    (16, 4, 2, 4, 1.0, False, torch.float32, True),
    (16, 4, 2, 4, 2.0, True, torch.float32, False),
    (256, 8, 4, 8, 2.5, True, torch.float32, True),    # DeepSeek-V3
    (256, 8, 4, 8, 2.5, True, torch.bfloat16, False),
    (60, 4, 2, 6, 1.0, True, torch.bfloat16, True),    # group size 15: not a power of two
    (8, 8, 3, 2, 1.0, True, torch.float32, True),      # one expert per group
    (16, 4, 4, 5, 1.0, True, torch.float32, False),    # every group kept: no group step
]


def _case_id(case):
    num_experts, groups, kept, top_k, scaling, with_bias, dtype, renormalize = case
    return (f"E{num_experts}-g{groups}-tg{kept}-k{top_k}-s{scaling:g}-bias{int(with_bias)}-"
            f"{str(dtype).split('.')[-1]}-renorm{int(renormalize)}")


@pytest.mark.parametrize("case", GROUPED_CASES, ids=_case_id)
def test_kernel_matches_reference_grouped(case, device):
    num_experts, groups, kept, top_k, scaling, with_bias, dtype, renormalize = case
    logits = _grid_logits(_num_tokens(num_experts), num_experts, dtype, device,
                          seed=num_experts + groups)
    bias = _grid_bias(num_experts, device, seed=num_experts) if with_bias else None
    _check_against_reference("sigmoid", logits, top_k, num_expert_group=groups,
                             topk_group=kept, correction_bias=bias, renormalize=renormalize,
                             routed_scaling_factor=scaling)


@pytest.mark.parametrize("num_experts,top_k", [(60, 8), (8, 8)])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_kernel_matches_reference_no_renormalize(scoring, num_experts, top_k, device):
    logits = _grid_logits(20, num_experts, torch.bfloat16, device, seed=3)
    _check_against_reference(scoring, logits, top_k, renormalize=False)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_kernel_large_e_and_top_k(scoring, device):
    """E = 512 (BLOCK_E = 512, several tokens per program) with top_k = 16, fp16 logits."""
    logits = _grid_logits(6, 512, torch.float16, device, seed=5)
    _check_against_reference(scoring, logits, 16)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_kernel_strided_logits(scoring, device):
    """A non-contiguous logits view (stride along E = 2, rows of stride 2E) is read as is."""
    wide = _grid_logits(8, 2 * 60, torch.float32, device, seed=7)
    _check_against_reference(scoring, wide[:, ::2], 8)


def test_softmax_matches_on_continuous_logits(device):
    """Off the grid too: softmax selects on the logits themselves, so ids stay exact."""
    gen = torch.Generator().manual_seed(11)
    logits = (3 * torch.randn(32, 60, generator=gen)).to(device)
    _check_against_reference("softmax", logits, 8)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_empty_batch_launches_nothing(scoring, device, monkeypatch):
    monkeypatch.setattr(tri, "_route_softmax_kernel", None)  # a launch would raise
    monkeypatch.setattr(tri, "_route_sigmoid_grouped_kernel", None)
    weights, ids = tri.route(torch.empty(0, 16, device=device), 4, scoring=scoring)
    assert weights.shape == ids.shape == (0, 4)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32


# ----------------------------------------------------------------------------- sm_90 compile
# (scoring, E, top_k, num_expert_group, topk_group, logits pointer type)
AOT_CASES = {
    "softmax-E256-k8-bf16": ("softmax", 256, 8, 1, 1, "*bf16"),
    "softmax-E2048-k16-fp32": ("softmax", 2048, 16, 1, 1, "*fp32"),
    "sigmoid-deepseek-v3": ("sigmoid", 256, 8, 8, 4, "*fp32"),
    "sigmoid-E60-g4-fp16": ("sigmoid", 60, 6, 4, 2, "*fp16"),
}


def _compile_case(scoring, num_experts, top_k, groups, kept, logits_type):
    block_e, block_m, num_warps = tri._routing_config(num_experts)
    signature = {"logits_ptr": logits_type, "topk_weights_ptr": "*fp32",
                 "topk_ids_ptr": "*i32", "M": "i32", "E": "i32",
                 "stride_lm": "i32", "stride_le": "i32", "stride_om": "i32"}
    constexprs = {"TOP_K": top_k, "RENORMALIZE": True, "BLOCK_M": block_m,
                  "BLOCK_E": block_e, "BLOCK_K": 1 << (top_k - 1).bit_length()}
    kernel = tri._route_softmax_kernel
    if scoring == "sigmoid":
        kernel = tri._route_sigmoid_grouped_kernel
        signature.update({"correction_bias_ptr": "*fp32", "routed_scaling_factor": "fp32"})
        constexprs.update({"NUM_GROUPS": groups, "GROUP_SIZE": num_experts // groups,
                           "TOPK_GROUP": kept, "HAS_BIAS": True,
                           "BLOCK_G": 1 << (groups - 1).bit_length()})
    return compile_for_hopper(kernel, signature, constexprs, num_warps=num_warps)


def _aot_main():
    """Child-process entry: compile every AOT case, return {case: PTX facts}."""
    facts = {}
    for name, case in AOT_CASES.items():
        ptx = _compile_case(*case).asm["ptx"]
        facts[name] = {"sm_90": ".target sm_90" in ptx, "div_rn": "div.rn.f32" in ptx}
    return facts


@pytest.fixture(scope="module")
def aot_facts():
    """One child process compiles every case (tests/aot.py says why a child)."""
    return run_without_interpreter("tests.test_routing", "_aot_main")


@pytest.mark.parametrize("case", sorted(AOT_CASES))
def test_kernels_compile_for_sm90(case, aot_facts):
    assert aot_facts[case]["sm_90"]
    assert aot_facts[case]["div_rn"]  # IEEE division, not the approximate `/`


# ----------------------------------------------------------------------------- real sizes
@pytest.mark.gpu
def test_real_sizes_gpu():
    """Default workload (M 8192, E 256, k 8, softmax) and DeepSeek-V3 grouped routing."""
    logits = _grid_logits(8192, 256, torch.bfloat16, "cuda", seed=1)
    _check_against_reference("softmax", logits, 8)
    bias = _grid_bias(256, "cuda", seed=2)
    _check_against_reference("sigmoid", logits.float(), 8, num_expert_group=8, topk_group=4,
                             correction_bias=bias, routed_scaling_factor=2.5)
