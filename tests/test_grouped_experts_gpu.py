"""GPU: the grouped-GEMM experts in bf16 (``ops.moe.experts_forward_grouped``, CUDA grouped_mm) against the fp32
per-expert reference at gpt-oss-20b width (hidden 2880, intermediate 2880, 32 experts top-4), values and gradients,
with one expert that gets no token. The routing is fixed (given indices and weights), so bf16 cannot flip expert
choices; the bound is the reference loop's own bf16 error on the same inputs. Skipped without CUDA."""

import pytest
import torch

from megatron_harness import rel
from megatron_student.ops.moe import experts_forward, experts_forward_grouped, grouped_mm_available

pytestmark = pytest.mark.gpu

TOKENS, HIDDEN, INTER, EXPERTS, TOP_K = 4096, 2880, 2880, 32, 4


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
