"""GPU: the grouped-GEMM experts in bf16 (``ops.moe.experts_forward_grouped``, CUDA grouped_mm) against the fp32
per-expert reference at gpt-oss-20b width (hidden 2880, intermediate 2880, 32 experts top-4), values and gradients,
with one expert that gets no token. The routing is fixed (given indices and weights), so bf16 cannot flip expert
choices; the bound is the reference loop's own bf16 error on the same inputs. The same for the fused Triton epilogues
(``ops.moe_kernels``) of ``expert_mlp_grouped`` on 32,768 expert-sorted rows in both SwiGLU layouts, against the
per-expert fp32 reference of tests/test_moe_kernels.py, and without a host sync. Skipped without CUDA."""

import pytest
import torch

from megatron_harness import rel
from megatron_student.ops.moe import (SWIGLU_ALPHA, SWIGLU_LIMIT, ExpertActivation, expert_mlp_grouped,
                                      experts_forward, experts_forward_grouped, fused_epilogues_available,
                                      grouped_mm_available)
from test_moe_kernels import NAMES, expert_case, reference_expert_mlp, run_expert_mlp, sorted_rows

pytestmark = pytest.mark.gpu

TOKENS, HIDDEN, INTER, EXPERTS, TOP_K = 4096, 2880, 2880, 32, 4
SORTED_ROWS = 32768  # T = 8192, top-4


def _inputs():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(TOKENS, EXPERTS, generator=g)
    logits[:, 5] -= 100  # expert 5 gets no token
    weights, indices = torch.softmax(logits.topk(TOP_K).values, -1), logits.topk(TOP_K).indices
    tensors = [torch.randn(TOKENS, HIDDEN, generator=g), weights,
               torch.randn(EXPERTS, HIDDEN, 2 * INTER, generator=g) / HIDDEN ** 0.5,
               torch.randn(EXPERTS, 2 * INTER, generator=g),
               torch.randn(EXPERTS, INTER, HIDDEN, generator=g) / INTER ** 0.5,
               torch.randn(EXPERTS, HIDDEN, generator=g)]
    return indices, tensors, torch.randn(TOKENS, HIDDEN, generator=g)


def _run(forward, indices, tensors, grad_out, dtype, device):
    leaves = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in tensors]
    x, w, *params = leaves
    out = forward(x, indices.to(device), w, *params)
    out.backward(grad_out.to(device=device, dtype=dtype))
    return [out.detach().float().cpu()] + [t.grad.float().cpu() for t in leaves]


def test_grouped_bf16_matches_fp32_reference():
    assert grouped_mm_available(), f"torch {torch.__version__} has no grouped_mm"
    indices, tensors, grad_out = _inputs()
    reference = _run(experts_forward, indices, tensors, grad_out, torch.float32, "cuda")
    reference_bf16 = _run(experts_forward, indices, tensors, grad_out, torch.bfloat16, "cuda")
    grouped = _run(experts_forward_grouped, indices, tensors, grad_out, torch.bfloat16, "cuda")
    names = ("out", "x", "weights", "gate_up", "gate_up_bias", "down", "down_bias")
    for name, ours, ref, ref_bf16 in zip(names, grouped, reference, reference_bf16):
        bound = 1.5 * rel(ref_bf16, ref) + 1e-3
        assert rel(ours, ref) < bound, (name, rel(ours, ref), bound)
    assert grouped[4][5].abs().max() == 0  # the idle expert's gate_up bias has no gradient


def test_grouped_experts_do_not_synchronise_with_the_host():
    """Forward and backward of the grouped experts under CUDA's sync debug mode "error": a host synchronisation
    (a device-to-host copy, .item(), a data-dependent output size) raises."""
    indices, tensors, grad_out = _inputs()
    leaves = [t.to(device="cuda", dtype=torch.bfloat16).requires_grad_(True) for t in tensors]
    x, w, *params = leaves
    indices, grad_out = indices.cuda(), grad_out.to(device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        experts_forward_grouped(x, indices, w, *params).backward(grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(t.grad is not None for t in leaves)



@pytest.mark.parametrize("layout", ["stacked", "interleaved"])
def test_fused_epilogues_match_fp32_reference(layout):
    """expert_mlp_grouped on 32,768 rows sorted by expert (T = 8192, top-4; expert 5 gets none) with the fused
    epilogues (the default on CUDA) against the per-expert fp32 loop; the bound is that loop's own bf16 error. Then
    forward and backward of the fused path under sync debug mode "error"."""
    counts = torch.multinomial(torch.ones(EXPERTS), SORTED_ROWS, replacement=True,
                               generator=torch.Generator().manual_seed(4)).bincount(minlength=EXPERTS)
    counts[5] = 0
    case = expert_case(layout, torch.bfloat16, 5, counts.tolist(), HIDDEN, INTER)
    assert fused_epilogues_available(torch.zeros(1, device="cuda"))
    reference = reference_expert_mlp(case, torch.float32, "cuda")
    reference_bf16 = reference_expert_mlp(case, torch.bfloat16, "cuda")
    fused = run_expert_mlp(case, None, "cuda")
    for name, ours, ref, ref_bf16 in zip(NAMES, fused, reference, reference_bf16):
        bound = 1.5 * rel(ref_bf16, ref) + 1e-3
        assert ours.dtype == torch.bfloat16, name
        assert rel(ours, ref) < bound, (name, rel(ours, ref), bound)
    assert fused[4][5].abs().max() == 0 and fused[6][5].abs().max() == 0  # expert 5's biases: no gradient

    group_ends, row_expert = sorted_rows(case["counts"], "cuda")
    rows, weights, *params = [t.to(device="cuda", dtype=torch.bfloat16).requires_grad_(True) for t in case["inputs"]]
    grad = case["grad"].to(device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        expert_mlp_grouped(rows, group_ends, row_expert, weights, *params, ExpertActivation(layout)).backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rows.grad is not None and params[1].grad is not None


def test_fused_swiglu_keeps_a_nan():
    """A NaN in the fc1 output stays NaN through the kernel's clamps, as through torch's clamp (the GPU's min/max
    would otherwise return the limit), so the step's NaN checks still see it."""
    from megatron_student.ops import moe_kernels

    h = torch.zeros(4, 2 * 256, device="cuda", dtype=torch.bfloat16)
    h[1, 3] = float("nan")  # stacked: gate of column 3; interleaved: up of column 1
    bias = torch.zeros(2, 2 * 256, device="cuda", dtype=torch.bfloat16)
    row_expert = torch.tensor([0, 0, 1, 1], device="cuda")
    for interleaved, column in ((False, 3), (True, 1)):
        act = moe_kernels.bias_swiglu(h, bias, row_expert, SWIGLU_ALPHA, SWIGLU_LIMIT, interleaved)
        assert act.isnan().nonzero().tolist() == [[1, column]], interleaved
