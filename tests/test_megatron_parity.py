"""Megatron-Core student and teacher against their HF references (CPU, fp32, TP = EP = 1), the expert activation
against Megatron's own clamped GLU, packed documents, and the compat module."""

import pytest
import torch

from megatron_harness import MIXED_PLAN, rel, run_distributed
from megatron_harness_workers import activation_worker, compat_worker, packed_worker, parity_worker

PLANS = {
    "default": None,  # swa_tpa (KV-only TPA, YaRN) + KDA (head mapping A)
    "mixed": MIXED_PLAN,  # every kind, TPA on q, GRAPE-M with a learned basis, GVA KDA with a lower bound
}


@pytest.fixture(scope="module")
def parity():
    return run_distributed(parity_worker, 1, PLANS, 7)[0]


def test_teacher_logits_match_transformers_gpt_oss(parity):
    megatron, hf = parity["teacher"]
    assert megatron.shape == hf.shape
    assert rel(megatron, hf) < 1e-5


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_student_logits_match_hf_student(parity, plan):
    megatron, hf = parity[plan]
    assert megatron.shape == hf.shape
    assert rel(megatron, hf) < 1e-5


def test_expert_activation_equals_megatron_clamped_glu():
    (ours, ours_grad), (megatron, megatron_grad) = run_distributed(activation_worker, 1, 3)[0]
    assert rel(ours, megatron) < 1e-6
    assert rel(ours_grad, megatron_grad) < 1e-6


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_packed_documents_equal_each_alone(plan):
    result = run_distributed(packed_worker, 1, "student", PLANS[plan], 9)[0]
    together, (first, second) = result["together"][0], result["alone"]
    n = first.shape[1]
    assert rel(together[:n], first[0]) < 1e-5
    assert rel(together[n:], second[0]) < 1e-5


def test_compat_apply_is_idempotent_and_makes_megatron_router_usable_on_cpu():
    logits, expected, has_grad, idempotent = run_distributed(compat_worker, 1)[0]
    assert idempotent
    assert torch.allclose(logits, expected, atol=1e-6) and has_grad


def test_compat_gradient_norm_fallback_stays_on_the_device():
    """Without TE/apex Megatron's gradient norm read every tensor's norm on the host; compat's replacement gives the
    same norm as a [1] tensor on the gradients' device."""
    from megatron.core.optimizer import clip_grads

    from megatron_student.megatron import compat

    compat.apply()
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g), torch.randn(2, 2, 2, generator=g)]
    norm, per_tensor = clip_grads.l2_norm_impl(2048 * 32, None, [tensors], False)
    exact = torch.cat([t.double().flatten() for t in tensors]).norm()
    assert per_tensor is None and norm.shape == (1,) and norm.device == tensors[0].device
    assert abs(float(norm[0]) - float(exact)) < 1e-6 * float(exact)
