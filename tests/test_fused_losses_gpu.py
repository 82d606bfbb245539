"""GPU: the fused Triton logit losses at gpt-oss width (T = 4096 rows of the 201,088 vocabulary padded to 201,216, bf16
logits) against the torch path on the same logits: values within fp32 summation error, gradients within bf16
rounding, no float32 copy of the logits (peak memory: the gradient buffer and O(T) statistics), and faster.
Skipped without CUDA."""

import pytest
import torch

from megatron_student.ops.losses import LogitLoss, logit_losses

pytestmark = pytest.mark.gpu

ROWS, VOCAB, PADDED = 4096, 201_088, 201_216


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _run(student, teacher, specs, weights, labels, backend):
    student = student.detach().requires_grad_(True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    values = logit_losses(student, teacher, specs, weights, labels=labels, vocab_size=VOCAB, chunk_size=1024,
                          backend=backend)
    (values * torch.tensor([0.8, 0.2], device="cuda")).sum().backward()
    end.record()
    end.synchronize()
    return values.detach(), student.grad, torch.cuda.max_memory_allocated() - base, start.elapsed_time(end)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_logit_losses_at_gpt_oss_width(temperature):
    g = torch.Generator(device="cuda").manual_seed(0)
    student = (4 * torch.randn(ROWS, PADDED, device="cuda", generator=g)).bfloat16()
    teacher = (4 * torch.randn(ROWS, PADDED, device="cuda", generator=g)).bfloat16()
    labels = torch.randint(0, VOCAB, (ROWS,), device="cuda", generator=g)
    labels[::7] = -100
    weights = (labels != -100).float() * torch.rand(ROWS, device="cuda", generator=g)
    specs = [LogitLoss("forward_kl", temperature), LogitLoss("ce")]
    runs = {}
    for backend in ("torch", "fused", "torch", "fused"):  # the second of each is timed warm
        runs[backend] = _run(student, teacher, specs, weights, labels, backend)
    (ref, ref_grad, ref_peak, ref_ms), (fused, grad, peak, ms) = runs["torch"], runs["fused"]
    print(f"T={temperature}: torch path {ref_ms:.1f} ms, {ref_peak / 2**30:.2f} GiB; fused {ms:.1f} ms, "
          f"{peak / 2**30:.2f} GiB; values rel {rel(fused, ref):.1e}, grad rel {rel(grad, ref_grad):.1e}")
    assert rel(fused, ref) < 1e-4
    assert grad.dtype == torch.bfloat16 and rel(grad, ref_grad) < 1e-2
    assert grad[:, VOCAB:].abs().max() == 0
    # the gradient buffer [T, V] bf16 plus O(T) statistics: no float32 [T, V] (or [chunk, V]) tensor
    assert peak < ROWS * PADDED * 2 + 2**26, peak
    assert ms * 3 < ref_ms, (ms, ref_ms)
