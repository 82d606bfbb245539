"""GPU: the fused Triton logit losses at gpt-oss width (T = 4096 rows of the 201,088 vocabulary padded to 201,216, bf16
logits) against the torch path on the same logits: values within fp32 summation error, gradients within bf16
rounding, no float32 copy of the logits (peak memory: the gradient buffer and O(T) statistics), and faster. The same
for the sparse losses against a stored top-k teacher as a capture's rows hold it (up to 256 ids a row, padded).
Skipped without CUDA; ``pytest -s`` prints the times and peak memory."""

import math

import pytest
import torch

from megatron_student.offline.format import Compression
from megatron_student.ops.losses import LogitLoss, logit_losses, sparse_logit_losses

pytestmark = pytest.mark.gpu

ROWS, VOCAB, PADDED = 4096, 201_088, 201_216


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _run(student, losses, upstream):
    """(values, the student's gradient, peak memory above the start, ms) of ``losses(student)`` and its backward with
    ``upstream`` weights on the values."""
    student = student.detach().requires_grad_(True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    values = losses(student)
    (values * upstream).sum().backward()
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
        runs[backend] = _run(student, lambda s: logit_losses(s, teacher, specs, weights, labels=labels, vocab_size=VOCAB,
                                                             chunk_size=1024, backend=backend),
                             torch.tensor([0.8, 0.2], device="cuda"))
    (ref, ref_grad, ref_peak, ref_ms), (fused, grad, peak, ms) = runs["torch"], runs["fused"]
    print(f"T={temperature}: torch path {ref_ms:.1f} ms, {ref_peak / 2**30:.2f} GiB; fused {ms:.1f} ms, "
          f"{peak / 2**30:.2f} GiB; values rel {rel(fused, ref):.1e}, grad rel {rel(grad, ref_grad):.1e}")
    assert rel(fused, ref) < 1e-4
    assert grad.dtype == torch.bfloat16 and rel(grad, ref_grad) < 1e-2
    assert grad[:, VOCAB:].abs().max() == 0
    # the gradient buffer [T, V] bf16 plus O(T) statistics: no float32 [T, V] (or [chunk, V]) tensor
    assert peak < ROWS * PADDED * 2 + 2**26, peak
    assert ms * 3 < ref_ms, (ms, ref_ms)


def captured_rows(teacher: torch.Tensor, k: int, min_k: int, generator: torch.Generator):
    """Decoded capture rows of dense teacher logits: a row's count in [min_k, k] (a byte budget's allocation), its two
    most probable ids first and the others by increasing id (format 3's order), padded to k with id −1 / −inf; the
    log tail over the other ids."""
    log_p = torch.log_softmax(teacher[:, :VOCAB].float(), -1)
    values, ids = log_p.topk(k, -1)
    counts = torch.randint(min_k, k + 1, (ids.shape[0],), device=ids.device, generator=generator)
    stored = torch.arange(k, device=ids.device) < counts.unsqueeze(1)
    log_tail = torch.logsumexp(log_p.scatter(1, ids, torch.where(stored, -math.inf, values)), -1)
    ids, values = torch.where(stored, ids, -1), torch.where(stored, values, -math.inf)
    rest = torch.where(stored[:, 2:], ids[:, 2:], VOCAB).sort(-1)  # padding last
    ids = torch.cat([ids[:, :2], torch.where(rest.values < VOCAB, rest.values, -1)], -1)
    values = torch.cat([values[:, :2], values[:, 2:].gather(1, rest.indices)], -1)
    return ids, values, log_tail


SPARSE_SPECS = {"stage_b": [LogitLoss("forward_kl"), LogitLoss("ce")],
                "kl_t2_ce": [LogitLoss("forward_kl", 2.0), LogitLoss("ce")],
                "all_t1.5": [LogitLoss("forward_kl", 1.5), LogitLoss("reverse_kl", 1.5), LogitLoss("jsd", 1.5),
                             LogitLoss("tvd", 1.5), LogitLoss("ce")]}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(SPARSE_SPECS))
def test_fused_sparse_losses_at_gpt_oss_width(name):
    g = torch.Generator(device="cuda").manual_seed(1)
    compression = Compression()  # the capture's defaults: up to top_k = 256 ids a row, at least min_k
    student = (4 * torch.randn(ROWS, PADDED, device="cuda", generator=g)).bfloat16()
    rows = captured_rows(4 * torch.randn(ROWS, PADDED, device="cuda", generator=g), compression.top_k,
                         compression.min_k, g)
    labels = torch.randint(0, VOCAB, (ROWS,), device="cuda", generator=g)
    labels[::7] = -100
    weights = (labels != -100).float() * torch.rand(ROWS, device="cuda", generator=g)
    specs = SPARSE_SPECS[name]
    upstream = torch.linspace(0.2, 1.0, len(specs), device="cuda")
    runs = {}
    for backend in ("torch", "fused", "torch", "fused"):  # the second of each is timed warm
        runs[backend] = _run(student, lambda s: sparse_logit_losses(s, *rows, specs, weights, labels=labels,
                                                                    vocab_size=VOCAB, chunk_size=1024, backend=backend),
                             upstream)
    (ref, ref_grad, ref_peak, ref_ms), (fused, grad, peak, ms) = runs["torch"], runs["fused"]
    print(f"sparse {name}, k = {compression.top_k}: torch path {ref_ms:.1f} ms, {ref_peak / 2**30:.2f} GiB; fused "
          f"{ms:.1f} ms, {peak / 2**30:.2f} GiB; values rel {rel(fused, ref):.1e}, grad rel {rel(grad, ref_grad):.1e}")
    assert rel(fused, ref) < 1e-4
    assert grad.dtype == torch.bfloat16 and rel(grad, ref_grad) < 1e-2
    assert grad[:, VOCAB:].abs().max() == 0
    # the gradient buffer [T, V] bf16 plus O(T·k) rows and statistics: no float32 [T, V] (or [chunk, V]) tensor
    assert peak < ROWS * PADDED * 2 + 2**28, peak
    assert ms * 3 < ref_ms, (ms, ref_ms)
