"""The sync-free token dispatch of EP = 1 (``megatron.dispatch``) against Megatron-Core's allgather dispatcher on the
same weights, fp32 on CPU: model logits and every parameter gradient, router statistics, the MoE layer's output and
the gradients of its input and router probabilities; with grouped and per-expert experts, at TP = 1 and TP = 2
(sequence parallel: each rank routes its own shard); a checkpoint written with one dispatcher read with the other;
the shared sort (``ops.moe.ExpertSort``) against Megatron's ``permute``; the knob's resolution and errors."""

from pathlib import Path

import pytest
import torch

from megatron_harness import MIXED_PLAN, rel, run_distributed
from megatron_harness_workers import checkpoint_worker, dispatch_worker

STAGE_B = Path(__file__).resolve().parents[1] / "configs" / "stage_b_full_distill.yaml"
SEED = 11
# fp32: the two paths differ only in the order of each token's sum over its k expert outputs
TOL = 1e-6


def check_same(allgather: dict, sorted_: dict) -> None:
    assert rel(sorted_["logits"], allgather["logits"]) < TOL
    assert set(sorted_["grads"]) == set(allgather["grads"])  # same parameters, same names
    for name, grad in allgather["grads"].items():
        assert grad.norm() > 0, f"{name} has no gradient"
        assert rel(sorted_["grads"][name], grad) < 1e-5, name
    assert set(sorted_["router"]) == set(allgather["router"])
    for name, counts in allgather["router"].items():
        assert counts.sum() > 0 and torch.equal(sorted_["router"][name], counts), name
    layer_a, layer_s = allgather["layer"], sorted_["layer"]
    assert layer_s["bias"] is None and layer_a["bias"] is None
    for key in ("out", "x", "probs"):
        assert layer_a[key].norm() > 0, key
        assert rel(layer_s[key], layer_a[key]) < TOL, key


@pytest.mark.parametrize("which,plan,experts", [("teacher", None, "grouped"), ("student", MIXED_PLAN, "grouped"),
                                                ("teacher", None, "sequential")])
def test_sorted_dispatch_matches_megatron_allgather(which, plan, experts):
    result = run_distributed(dispatch_worker, 1, which, plan, 1, SEED, experts)[0]
    check_same(result["allgather"], result["sorted"])


def test_sorted_dispatch_matches_megatron_allgather_at_tp2():
    for rank_result in run_distributed(dispatch_worker, 2, "student", MIXED_PLAN, 2, SEED, "grouped"):
        check_same(rank_result["allgather"], rank_result["sorted"])


def test_checkpoint_written_with_one_dispatcher_loads_with_the_other(tmp_path):
    layouts = [(1, 1, "grouped", "allgather"), (1, 1, "grouped", "sorted"), (1, 1, "sequential", "allgather")]
    first, sorted_, back = run_distributed(checkpoint_worker, 1, "student", MIXED_PLAN, SEED, str(tmp_path),
                                           layouts)[0]
    assert rel(sorted_, first) < TOL
    assert rel(back, first) < TOL


def test_expert_sort_is_megatrons_permutation():
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    from megatron_student.megatron.dispatch import routed_experts
    from megatron_student.ops.moe import ExpertSort, router_topk_softmax

    g = torch.Generator().manual_seed(SEED)
    tokens, experts, top_k = 37, 6, 3
    logits = torch.randn(tokens, experts, generator=g)
    logits[:, 2] -= 100  # expert 2 gets no token
    weights, indices = router_topk_softmax(logits, top_k)
    probs = torch.zeros_like(logits).scatter(1, indices, weights)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, indices, True)
    x = torch.randn(tokens, 8, generator=g)

    picked, chosen = routed_experts(probs, routing_map, top_k)
    assert torch.equal(torch.zeros_like(routing_map).scatter(1, chosen, True), routing_map)
    assert torch.equal(picked, probs.gather(1, chosen))
    sort = ExpertSort.of(chosen, experts)
    rows, permuted_probs, sorted_tokens = permute(x, routing_map, probs)
    assert torch.equal(sort.counts, routing_map.sum(0).to(torch.int32)) and sort.counts[2] == 0
    assert torch.equal(sort.rows(x), rows)
    assert torch.equal(sort.order // top_k, sorted_tokens)
    assert torch.equal(sort.row_weights(picked), permuted_probs)
    assert torch.equal(sort.row_expert, torch.repeat_interleave(torch.arange(experts), sort.counts.long()))
    weighted = rows * permuted_probs[:, None]
    assert rel(sort.combine(weighted), unpermute(weighted, sorted_tokens, x.shape)) < TOL
    # bf16: Megatron scatter-adds each row in bf16, the sort sums a token's k rows at once: within bf16 rounding
    weighted = weighted.bfloat16()
    combined = sort.combine(weighted)
    assert combined.dtype == torch.bfloat16
    assert rel(combined, unpermute(weighted, sorted_tokens, x.shape)) < 1e-2


def test_dispatcher_choice():
    from megatron_student.megatron import ParallelConfig
    from megatron_student.train.config import ConfigError, load_config

    assert ParallelConfig().token_dispatcher == "sorted"
    assert ParallelConfig(expert_parallel=2).token_dispatcher == ("alltoall" if torch.cuda.is_available()
                                                                  else "allgather")
    assert ParallelConfig(expert_parallel=2, dispatcher="alltoall").token_dispatcher == "alltoall"
    assert ParallelConfig(dispatcher="allgather").token_dispatcher == "allgather"
    with pytest.raises(ValueError, match="dispatcher 'sorted' needs expert parallelism 1 \\(got EP 2\\)"):
        ParallelConfig(expert_parallel=2, dispatcher="sorted").token_dispatcher
    with pytest.raises(ValueError, match="dispatcher 'flex': choose one of auto, sorted, allgather, alltoall"):
        ParallelConfig(dispatcher="flex").token_dispatcher
    with pytest.raises(ConfigError, match="parallel.dispatcher: 'sorted' needs parallel.ep 1 \\(got 8\\)"):
        load_config(STAGE_B, ["parallel.dispatcher=sorted"])
    with pytest.raises(ConfigError, match=r"parallel.dispatcher: 'flex' is not one of \['auto', 'sorted', "):
        load_config(STAGE_B, ["parallel.dispatcher=flex"])
