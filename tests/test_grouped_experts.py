"""Grouped-GEMM experts against the per-expert reference: ``ops.moe.experts_forward_grouped`` vs
``experts_forward`` (HF layout) and Megatron's ``GroupedExperts`` vs ``SequentialMLP`` (same parameters), values
and gradients, fp32 and bf16, random routing with an expert that gets no tokens; the Megatron ones also with the fused
Triton epilogues (under Triton's interpreter)."""

from pathlib import Path

import pytest
import torch

from megatron_harness import rel, run_distributed
from megatron_harness_workers import grouped_experts_worker
from megatron_student.ops.moe import experts_forward, experts_forward_grouped, router_topk_softmax

STAGE_B = Path(__file__).resolve().parents[1] / "configs" / "stage_b_full_distill.yaml"
TOL = {torch.float32: 1e-6, torch.bfloat16: 2e-2}


def expert_inputs(g: torch.Generator, weights: torch.Tensor, tokens: int, hidden: int, inter: int,
                  experts: int) -> list[torch.Tensor]:
    """x, routing weights and HF-layout expert parameters (gate_up, its bias, down, its bias), in that order."""
    return [torch.randn(tokens, hidden, generator=g), weights,
            torch.randn(experts, hidden, 2 * inter, generator=g) / hidden ** 0.5,
            torch.randn(experts, 2 * inter, generator=g),
            torch.randn(experts, inter, hidden, generator=g) / inter ** 0.5,
            torch.randn(experts, hidden, generator=g)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matches_per_expert_reference(dtype):
    g = torch.Generator().manual_seed(0)
    tokens, hidden, inter, experts, top_k = 53, 32, 24, 6, 3
    logits = torch.randn(tokens, experts, generator=g)
    logits[:, 4] -= 100  # expert 4 gets no token
    weights, indices = router_topk_softmax(logits, top_k)
    assert (indices == 4).sum() == 0 and all((indices == e).any() for e in (0, 1, 2, 3, 5))
    inputs = expert_inputs(g, weights, tokens, hidden, inter, experts)
    grad_out = torch.randn(tokens, hidden, generator=g)
    results = []
    for forward in (experts_forward, experts_forward_grouped):
        leaves = [t.to(dtype).requires_grad_(True) for t in inputs]
        x, w, *params = leaves
        out = forward(x, indices, w, *params)
        out.backward(grad_out.to(dtype))
        results.append((out.detach(), [t.grad for t in leaves]))
    (reference, reference_grads), (grouped, grouped_grads) = results
    assert grouped.dtype == dtype
    assert rel(grouped, reference) < TOL[dtype]
    for name, a, b in zip(("x", "weights", "gate_up", "gate_up_bias", "down", "down_bias"), grouped_grads,
                          reference_grads):
        assert b.norm() > 0, name
        assert rel(a, b) < TOL[dtype], name
    assert torch.equal(grouped_grads[3][4], torch.zeros_like(grouped_grads[3][4]))  # the idle expert's bias


@pytest.fixture(scope="module", params=["torch", "fused"])
def megatron_results(request):
    """"fused": the worker under Triton's interpreter, where ``GroupedExperts`` runs the fused epilogues of
    ``ops.moe_kernels`` (stacked SwiGLU) on CPU tensors as it does on the GPU."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "fused":
            patch.setenv("TRITON_INTERPRET", "1")
        return run_distributed(grouped_experts_worker, 1, 7)[0]


def test_grouped_experts_match_sequential_mlp_in_the_model(megatron_results):
    sequential, grouped = megatron_results["sequential"], megatron_results["grouped"]
    assert rel(grouped["logits"], sequential["logits"]) < 1e-6
    assert set(grouped["grads"]) == set(sequential["grads"])  # same parameters, same names
    for name, grad in sequential["grads"].items():
        assert grad.norm() > 0, name
        assert rel(grouped["grads"][name], grad) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_match_sequential_mlp_on_sorted_rows(megatron_results, dtype):
    sequential, grouped = megatron_results["sequential"][dtype], megatron_results["grouped"][dtype]
    assert grouped["out"].dtype == dtype
    assert rel(grouped["out"], sequential["out"]) < TOL[dtype]
    assert torch.equal(grouped["no_grad"], grouped["out"])
    assert grouped["view"] == (dtype == torch.float32)  # packed as built; a cast to bf16 gives each its own storage
    for key in ("rows", "probs"):
        assert rel(grouped[key], sequential[key]) < TOL[dtype], key
    for name, grad in sequential["params"].items():
        if name.startswith("local_experts.1."):  # counts [7, 0, 12, 5]: expert 1 gets no row
            assert grouped["params"][name].abs().max() == 0 and grad.abs().max() == 0, name
            continue
        assert rel(grouped["params"][name], grad) < TOL[dtype], name


def test_expert_implementation_choice():
    from megatron_student.megatron import ParallelConfig
    from megatron_student.train.config import ConfigError, load_config

    assert ParallelConfig(experts="grouped").grouped_experts
    assert not ParallelConfig(experts="sequential").grouped_experts
    # auto: grouped only on CUDA with bf16 parameters
    assert ParallelConfig(params_dtype=torch.bfloat16).grouped_experts == torch.cuda.is_available()
    assert not ParallelConfig(params_dtype=torch.float32).grouped_experts
    with pytest.raises(ValueError, match="experts 'loop': choose one of auto, grouped, sequential"):
        ParallelConfig(experts="loop").grouped_experts
    with pytest.raises(ConfigError, match=r"parallel.experts: 'loop' is not one of \['auto', 'grouped', 'sequen"):
        load_config(STAGE_B, ["parallel.experts=loop"])


def test_grouped_bias_gradients_accumulate_in_fp32():
    """About 10³ rows per expert in bf16: each expert's bias gradient is within bf16 rounding of the fp64 sum (a
    gather's autograd backward, which accumulates row by row in bf16, is ~3% off here)."""
    g = torch.Generator().manual_seed(1)
    tokens, hidden, inter, experts, top_k = 2048, 32, 24, 4, 2
    weights, indices = router_topk_softmax(torch.randn(tokens, experts, generator=g), top_k)
    inputs = expert_inputs(g, weights, tokens, hidden, inter, experts)
    grad_out = torch.randn(tokens, hidden, generator=g)
    grads = {}
    for name, forward, dtype in (("exact", experts_forward, torch.float64),
                                 ("grouped", experts_forward_grouped, torch.bfloat16)):
        leaves = [t.to(dtype, copy=True).requires_grad_(True) for t in inputs]
        forward(leaves[0], indices, leaves[1], *leaves[2:]).backward(grad_out.to(dtype))
        grads[name] = (leaves[3].grad, leaves[5].grad)
    for grouped, exact in zip(grads["grouped"], grads["exact"]):
        assert rel(grouped, exact) < 1e-2
