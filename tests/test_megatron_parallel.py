"""Distributed invariance on CPU (gloo): TP = 2, EP = 2 and TP = 2 × EP = 2 against TP = EP = 1 for the student with
every attention kind, with per-expert (SequentialMLP) and grouped-GEMM experts (allgather dispatcher: alltoall needs
CUDA streams, see tests/test_megatron_gpu.py);
replicated parameters after optimizer steps; checkpoint resharding, also across the two expert implementations."""

import pytest
import torch

from megatron_harness import MIXED_PLAN, rel, run_distributed
from megatron_harness_workers import checkpoint_worker, train_worker

SEED = 5
# fp32 throughout; the tolerances cover reduction-order differences of the collectives.
LOGITS_TOL, LOSS_TOL, GRAD_TOL = 1e-5, 1e-6, 1e-4


@pytest.fixture(scope="module")
def reference():
    return run_distributed(train_worker, 1, "student", MIXED_PLAN, 1, 1, SEED, 0, "sequential")[0]


@pytest.mark.parametrize("tp,ep,world,experts", [(2, 1, 2, "sequential"), (1, 2, 2, "sequential"),
                                                  (2, 2, 4, "sequential"), (2, 2, 4, "grouped")])
def test_parallel_layout_matches_single_process(reference, tp, ep, world, experts):
    results = run_distributed(train_worker, world, "student", MIXED_PLAN, tp, ep, SEED, 3, experts)
    r = results[0]
    assert rel(r["logits"], reference["logits"]) < LOGITS_TOL
    assert rel(r["packed"], reference["packed"]) < LOGITS_TOL
    assert abs(r["loss"].item() - reference["loss"].item()) < LOSS_TOL * abs(reference["loss"].item())
    assert set(r["grads"]) == set(reference["grads"])
    for name, grad in reference["grads"].items():
        assert grad.norm() > 0, f"{name} has no gradient"
        assert rel(r["grads"][name], grad) < GRAD_TOL, name
    for rank_result in results:  # after 3 AdamW steps all copies of a replicated parameter are identical
        for name, copies in rank_result["replicated_after_steps"].items():
            for copy in copies[1:]:
                assert torch.equal(copy, copies[0]), name


def test_checkpoint_reshards_tp1_ep1_to_tp2_ep2_and_back(tmp_path):
    """Written by per-expert experts at TP = EP = 1, read by grouped ones at TP = EP = 2, written again and read back
    by per-expert ones: one checkpoint layout."""
    layouts = [(1, 1, "sequential"), (2, 2, "grouped"), (1, 1, "sequential")]
    logits = run_distributed(checkpoint_worker, 4, "student", MIXED_PLAN, SEED, str(tmp_path), layouts)[0]
    first, resharded, back = logits
    assert rel(resharded, first) < 1e-5
    assert rel(back, first) < 1e-5
