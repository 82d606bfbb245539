"""Context parallelism on CPU (gloo): the KDA and SWA + TPA layers with the sequence split into contiguous chunks
over CP = 2 and 4 ranks equal the whole sequence on one process — outputs, input gradients and parameter gradients —
with packed documents crossing the rank boundaries; the Megatron student (every attention kind) and teacher at
CP = 2 equal CP = 1 (logits and parameter gradients)."""

import functools

import pytest
import torch

from context_parallel_workers import layers_worker, megatron_cases_worker, run_layer
from megatron_harness import MIXED_PLAN, rel, run_distributed

TOTAL = 96  # CP = 4: chunks [0, 24) [24, 48) [48, 72) [72, 96); CP = 2: [0, 48) [48, 96)
LAYOUTS = {
    # one document over every rank: KDA chains the states of all predecessors
    "one_document": None,
    # 5..46 spans ranks 0-1 (CP 4) and crosses the CP-2 boundary; 46..50 starts 2 tokens before the CP-4 boundary
    # at 48 (a partial convolution/window halo); 50..51 is one token; 51..72 ends exactly on a boundary; 72..96
    # starts on one
    "packed": [0, 5, 46, 50, 51, 72, 96],
    # a document spanning three CP-4 ranks that starts mid-chunk, then one crossing the last boundary
    "long": [0, 17, 70, 96],
}
# float64 throughout: the split changes only the order of the same arithmetic
TOL = 1e-10
# the Megatron student in fp32: tolerances of test_megatron_parallel (reduction order; e.g. GRAPE-M's plane-skew
# gradient sums many cancelling terms); the fp64 layer tests above bound the CP math itself
MEGATRON_LOGITS_TOL, MEGATRON_GRAD_TOL = 1e-5, 1e-4


KINDS = ["kda", "swa_tpa"]


def _seed(kind: str, layout: str, cp: int) -> int:
    return 7 + cp + 10 * list(LAYOUTS).index(layout) + 100 * KINDS.index(kind)


@functools.lru_cache(maxsize=None)
def _distributed(cp: int) -> dict:
    """Every (kind, layout) case on ``cp`` gloo ranks, one process group for all (spawning dominates the cost)."""
    cases = [(kind, layout) for kind in KINDS for layout in LAYOUTS]
    ranks = run_distributed(layers_worker, cp, [(k, _seed(k, lay, cp), LAYOUTS[lay]) for k, lay in cases], TOTAL)
    results = {case: [r["results"][i] for r in ranks] for i, case in enumerate(cases)}
    results["errors"] = ranks[0]["errors"]
    return results


def test_bad_context_parallel_splits_name_the_problem():
    length, halo, bounds, both = _distributed(2)["errors"]
    assert "97 must be a positive multiple of the context-parallel size 2" in length
    assert "halo of 7 positions needs chunks at least that long; the chunk has 2 tokens" in halo
    assert "must be 1-D, start at 0 and end at the sequence length 96" in bounds
    assert "kda_layer: context parallelism takes the documents from cp (cu_seqlens None)" in both


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_layer_matches_one_process(kind, layout, cp):
    reference = run_layer(kind, _seed(kind, layout, cp), LAYOUTS[layout], TOTAL)
    results = _distributed(cp)[kind, layout]
    out = torch.cat([r["out"] for r in results], dim=1)
    x_grad = torch.cat([r["x_grad"] for r in results], dim=1)
    assert rel(out, reference["out"]) < TOL
    assert rel(x_grad, reference["x_grad"]) < TOL
    for i, grad in enumerate(reference["param_grads"]):
        assert grad.norm() > 0, f"parameter {i} has no gradient"
        for r in results:
            assert rel(r["param_grads"][i], grad) < TOL, f"parameter {i}"


MEGATRON_CASES = [(which, bounds) for which in ("student", "teacher") for bounds in ("one_document", "packed")]
MEGATRON_BOUNDS = {"one_document": None, "packed": [0, 5, 30, 33, 64]}  # CP = 2: [0, 32) [32, 64); window 8


@functools.lru_cache(maxsize=None)
def _megatron(world: int, tensor_parallel: bool = False) -> dict:
    cases = [(which, MIXED_PLAN if which == "student" else None, 11, MEGATRON_BOUNDS[bounds], 64)
             for which, bounds in MEGATRON_CASES]
    results = run_distributed(megatron_cases_worker, world, cases, tensor_parallel)[0]
    return dict(zip(MEGATRON_CASES, results))


@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("bounds", list(MEGATRON_BOUNDS))
def test_megatron_context_parallel_matches_one_process(which, bounds):
    """Every attention kind (MIXED_PLAN: SWA + TPA, KDA, softmax sliding and full) and the gpt-oss teacher."""
    single, split = _megatron(1)[which, bounds], _megatron(2)[which, bounds]
    assert rel(split["logits"], single["logits"]) < MEGATRON_LOGITS_TOL
    assert set(split["grads"]) == set(single["grads"])
    for name, grad in single["grads"].items():
        assert grad.norm() > 0, f"{name} has no gradient"
        assert rel(split["grads"][name], grad) < MEGATRON_GRAD_TOL, name


@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("bounds", list(MEGATRON_BOUNDS))
def test_megatron_tensor_and_context_parallel_logits(which, bounds):
    """TP = 2 × CP = 2 (4 ranks, sequence parallel within each chunk) equals one process."""
    split = _megatron(4, tensor_parallel=True)[which, bounds]
    assert rel(split["logits"], _megatron(1)[which, bounds]["logits"]) < MEGATRON_LOGITS_TOL
