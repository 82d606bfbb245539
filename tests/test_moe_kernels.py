"""The fused Triton epilogues of the grouped experts (``ops.moe_kernels`` behind ``expert_mlp_grouped(fused=True)``)
against the torch reference of ``ops.moe`` in float64: values and the gradients of rows, routing weights, both
weights and both biases, "stacked" (Megatron) and "interleaved" (HF) SwiGLU, fp32 and bf16 (bound: the bf16 torch
composition's own error, twice that in the interpreter), an expert without rows, M not a multiple of the kernels'
row block, I over one column block; the SwiGLU kernels on values at and beyond the clamp limits (the gradient is 0
exactly where the reference's is); the per-expert bias sums. The kernels run in Triton's interpreter on CPU tensors,
in a spawned process; about 20 s. Also ``ExpertSort.rows``'s backward without atomics."""

from __future__ import annotations

import pytest
import torch

from losses_workers import spawn
from megatron_harness import rel
from megatron_student.ops.moe import (SWIGLU_LIMIT, ExpertActivation, ExpertSort, expert_mlp_grouped,
                                      fused_epilogues_available, router_topk_softmax)

# expert 1 gets no row; M = 103 rows (not a multiple of the row blocks), 2I = 272 columns (over one column block)
COUNTS = [37, 0, 50, 13, 3]
HIDDEN, INTER = 40, 136
NAMES = ("out", "rows", "weights", "gate_up", "gate_up_bias", "down", "down_bias")


def sorted_rows(counts: list[int], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """group_ends [E] int32 and row_expert [M] of rows sorted by expert with ``counts`` rows each."""
    counts = torch.tensor(counts, dtype=torch.int32, device=device)
    return counts.cumsum(0, dtype=torch.int32), torch.repeat_interleave(torch.arange(len(counts), device=device),
                                                                        counts)


def expert_case(layout: str, dtype: torch.dtype, seed: int, counts: list[int] = COUNTS, hidden: int = HIDDEN,
                inter: int = INTER) -> dict:
    """Rows, routing weights and parameters; fc1 outputs of std ~5, so that some pass the clamp limit of 7."""
    g = torch.Generator().manual_seed(seed)
    m, experts = sum(counts), len(counts)
    return {"layout": layout, "dtype": dtype, "counts": counts, "grad": torch.randn(m, hidden, generator=g),
            "inputs": [torch.randn(m, hidden, generator=g), torch.rand(m, generator=g),
                       4 * torch.randn(experts, hidden, 2 * inter, generator=g) / hidden ** 0.5,
                       2 * torch.randn(experts, 2 * inter, generator=g),
                       torch.randn(experts, inter, hidden, generator=g) / inter ** 0.5,
                       torch.randn(experts, hidden, generator=g)]}


def run_expert_mlp(case: dict, fused: bool | None, device="cpu") -> list[torch.Tensor]:
    """expert_mlp_grouped on the case in its dtype: the output and the gradients of every input."""
    group_ends, row_expert = sorted_rows(case["counts"], device)
    leaves = [t.to(device=device, dtype=case["dtype"], copy=True).requires_grad_(True) for t in case["inputs"]]
    rows, weights, *params = leaves
    out = expert_mlp_grouped(rows, group_ends, row_expert, weights, *params, ExpertActivation(case["layout"]),
                             fused=fused)
    out.backward(case["grad"].to(device=device, dtype=case["dtype"]))
    return [out.detach()] + [t.grad for t in leaves]


def reference_expert_mlp(case: dict, dtype: torch.dtype = torch.float64, device="cpu") -> list[torch.Tensor]:
    """The same in ``dtype`` (inputs rounded to the case's dtype first), one expert at a time with the reference
    activation of ``ops.moe``."""
    leaves = [t.to(case["dtype"]).to(device=device, dtype=dtype, copy=True).requires_grad_(True)
              for t in case["inputs"]]
    rows, weights, gate_up, gate_up_bias, down, down_bias = leaves
    activation, out, start = ExpertActivation(case["layout"]), [], 0
    for expert, count in enumerate(case["counts"]):
        part = slice(start, start + count)
        start += count
        hidden = rows[part] @ gate_up[expert] + gate_up_bias[expert]
        out.append((activation(hidden) @ down[expert] + down_bias[expert]) * weights[part, None])
    out = torch.cat(out)
    out.backward(case["grad"].to(device=device, dtype=dtype))
    return [out.detach()] + [t.grad for t in leaves]


def clamp_case(layout: str, dtype: torch.dtype, seed: int) -> dict:
    """fc1 outputs and biases whose sums (exact in bf16) lie at, just inside and beyond the clamp limits: gate at
    limit and above, up at ±limit and beyond, besides random values."""
    g = torch.Generator().manual_seed(seed)
    m, experts = sum(COUNTS), len(COUNTS)
    _, row_expert = sorted_rows(COUNTS)
    bias = torch.randint(-8, 8, (experts, 2 * INTER), generator=g) / 4
    targets = torch.tensor([SWIGLU_LIMIT, SWIGLU_LIMIT + 0.5, SWIGLU_LIMIT - 0.25, -SWIGLU_LIMIT, -SWIGLU_LIMIT - 0.5,
                            -SWIGLU_LIMIT + 0.25])
    summed = 4 * torch.randn(m, 2 * INTER, generator=g)
    special = torch.rand(m, 2 * INTER, generator=g) < 0.5
    summed[special] = targets[torch.randint(0, len(targets), (int(special.sum()),), generator=g)]
    return {"layout": layout, "dtype": dtype, "h": summed - bias[row_expert], "bias": bias,
            "grad": torch.randn(m, INTER, generator=g)}


def run_swiglu_kernels(case: dict) -> dict:
    from megatron_student.ops import moe_kernels

    group_ends, row_expert = sorted_rows(COUNTS)
    h, bias = case["h"].to(case["dtype"]), case["bias"].to(case["dtype"])
    activation = ExpertActivation(case["layout"])
    args = (activation.alpha, activation.limit, activation.layout == "interleaved")
    grad_h = moe_kernels.bias_swiglu_grad(case["grad"].to(case["dtype"]), h, bias, row_expert, *args)
    return {"act": moe_kernels.bias_swiglu(h, bias, row_expert, *args), "grad_h": grad_h,
            "grad_bias": moe_kernels.segment_sum(grad_h, group_ends, bias.dtype)}


def fused_worker(rank: int, world_size: int, expert_cases: list[dict], clamp_cases: list[dict]) -> dict:
    assert fused_epilogues_available(torch.zeros(1))  # the interpreter chooses the kernels on CPU tensors
    return {"fused": [run_expert_mlp(case, fused=True) for case in expert_cases],
            "default": run_expert_mlp(expert_cases[0], fused=None),
            "composition": [run_expert_mlp(case, fused=False) for case in expert_cases],
            "swiglu": [run_swiglu_kernels(case) for case in clamp_cases]}


EXPERT_CASES = [expert_case(layout, dtype, seed) for seed, (layout, dtype) in
                enumerate((layout, dtype) for layout in ("stacked", "interleaved")
                          for dtype in (torch.float32, torch.bfloat16))]
CLAMP_CASES = [clamp_case(layout, dtype, 10 + seed) for seed, (layout, dtype) in
               enumerate((layout, dtype) for layout in ("stacked", "interleaved")
                         for dtype in (torch.float32, torch.bfloat16))]


@pytest.fixture(scope="module")
def fused_results():
    # Triton's interpreter for the worker: it must be chosen before triton is first imported there
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        (results,) = spawn(fused_worker, 1, EXPERT_CASES, CLAMP_CASES)
    return results


def test_fused_expert_mlp_matches_float64_reference(fused_results):
    for case, fused, composition in zip(EXPERT_CASES, fused_results["fused"], fused_results["composition"]):
        reference = reference_expert_mlp(case)
        for name, ours, torch_path, ref in zip(NAMES, fused, composition, reference):
            what = (case["layout"], case["dtype"], name)
            assert ours.dtype == case["dtype"], what
            assert ref.norm() > 0, what
            # bf16: Triton's interpreter stores float32 → bf16 by truncation (the GPU rounds to nearest): about twice
            # the rounding error of the torch composition (tests/test_grouped_experts_gpu.py holds the GPU to 1.5×)
            bound = 1e-5 if case["dtype"] == torch.float32 else 3 * rel(torch_path, ref) + 1e-3
            assert rel(ours, ref) < bound, (what, rel(ours, ref), bound)
        assert fused[4][1].abs().max() == 0 and fused[6][1].abs().max() == 0  # expert 1 has no row: no bias grads
    for ours, fused in zip(fused_results["default"], fused_results["fused"][0]):
        assert torch.equal(ours, fused)


def test_fused_swiglu_at_the_clamp_limits(fused_results):
    _, row_expert = sorted_rows(COUNTS)
    for case, result in zip(CLAMP_CASES, fused_results["swiglu"]):
        what = (case["layout"], case["dtype"])
        h = case["h"].to(case["dtype"]).double().requires_grad_(True)
        bias = case["bias"].to(case["dtype"]).double()
        act = ExpertActivation(case["layout"])(h + bias[row_expert])
        (grad_h,) = torch.autograd.grad(act, h, case["grad"].to(case["dtype"]).double())
        tol = 1e-6 if case["dtype"] == torch.float32 else 8e-3  # results rounded to bf16
        assert result["act"].dtype == result["grad_h"].dtype == result["grad_bias"].dtype == case["dtype"], what
        assert rel(result["act"], act) < tol, what
        assert rel(result["grad_h"], grad_h) < tol, what
        # zero exactly where the clamps stop the reference's gradient, and only there (the limit itself passes)
        assert torch.equal(result["grad_h"] == 0, grad_h == 0), what
        at_limit = (h + bias[row_expert]).abs() == SWIGLU_LIMIT
        assert at_limit.any() and (grad_h[at_limit] != 0).all(), what
        sums = torch.stack([rows.sum(0) for rows in grad_h.split(COUNTS)])
        assert rel(result["grad_bias"], sums) < tol, what
        assert result["grad_bias"][1].abs().max() == 0, what


def test_torch_composition_is_the_default_on_cpu():
    assert not fused_epilogues_available(torch.zeros(1))
    assert not fused_epilogues_available(torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="layout 'gate_up': choose one of interleaved, stacked"):
        ExpertActivation("gate_up")


def test_sorted_rows_gradient_sums_each_tokens_slots():
    """ExpertSort.rows: the index_select forward; the gradient of x summed per token from its k sorted rows by a
    permutation and one reduction (the backward node is ours, not index_select's index_add)."""
    g = torch.Generator().manual_seed(2)
    tokens, experts, top_k, hidden = 37, 6, 3, 8
    _, indices = router_topk_softmax(torch.randn(tokens, experts, generator=g), top_k)
    sort = ExpertSort.of(indices, experts)
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(tokens * top_k, hidden, generator=g, dtype=torch.float64)
    rows = sort.rows(x)
    assert type(rows.grad_fn).__name__ == "_SortedRowsBackward"
    assert torch.equal(rows, x.index_select(0, sort.order // top_k))
    (ours,) = torch.autograd.grad(rows, x, grad)
    (reference,) = torch.autograd.grad(x.index_select(0, sort.order // top_k), x, grad)
    assert rel(ours, reference) < 1e-15
