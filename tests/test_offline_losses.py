"""Sparse (offline-teacher) losses of megatron_student.ops.losses against independent float64 references on the
top-k + tail partition: values and gradients, temperature, padded vocabulary, chunking; equal to the dense losses
when k covers the vocabulary; vocab-parallel over gloo TP=2 equal to TP=1; the vocab-parallel top-k."""

from __future__ import annotations

import math

import pytest
import torch

from losses_workers import spawn, tp_sparse_losses
from megatron_student.ops.losses import LogitLoss, logit_losses, sparse_logit_losses, vocab_parallel_topk

KINDS_T = [("forward_kl", 1.0), ("forward_kl", 2.0), ("reverse_kl", 1.0), ("reverse_kl", 0.7), ("jsd", 1.5),
           ("tvd", 1.0), ("tvd", 2.5)]


def stored_teacher(teacher: torch.Tensor, k: int, vocab_size: int):
    """Top-k ids, log-probs and log tail of dense teacher logits, by a plain float64 sort (independent of
    vocab_parallel_topk)."""
    log_p = torch.log_softmax(teacher[:, :vocab_size].double(), -1)
    order = log_p.argsort(-1, descending=True)
    ids = order[:, :k]
    tail = 1 - log_p.gather(-1, ids).exp().sum(-1)
    log_tail = torch.log(tail.clamp_min(0)) if k < vocab_size else torch.full_like(tail, -math.inf)
    return ids, log_p.gather(-1, ids), log_tail


def partition_reference(student, ids, logprobs, log_tail, kind, weights, temperature, vocab_size, beta=0.5):
    """Float64 Σ_t w_t ℓ_t on the (k+1)-bucket partition, written from the definition."""
    T = temperature
    q = torch.softmax(student[:, :vocab_size].double() / T, -1)
    q_ids = q.gather(-1, ids)
    rest = vocab_size - ids.shape[-1]
    p = (logprobs.double() / T).exp()
    if rest:
        q_parts = torch.cat([q_ids, (1 - q_ids.sum(-1, keepdim=True))], -1)
        p = torch.cat([p, (rest * (log_tail.double().exp() / rest) ** (1 / T)).unsqueeze(-1)], -1)
    else:
        q_parts = q_ids
    p = p / p.sum(-1, keepdim=True)
    if kind == "forward_kl":
        per = (p * (p.log() - q_parts.log())).sum(-1)
    elif kind == "reverse_kl":
        per = (q_parts * (q_parts.log() - p.log())).sum(-1)
    elif kind == "jsd":
        m = beta * p + (1 - beta) * q_parts
        per = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q_parts * (q_parts / m).log()).sum(-1)
    else:
        per = 0.5 * (p - q_parts).abs().sum(-1)
    return (weights.double() * per).sum() * T * T


def batch(n, padded, vocab, k, seed):
    g = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(n, padded, generator=g, dtype=torch.float64)
    teacher = 3 * torch.randn(n, padded, generator=g, dtype=torch.float64)
    ids, logprobs, log_tail = stored_teacher(teacher, k, vocab)
    return student, ids, logprobs, log_tail, 0.2 + torch.rand(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kind,temperature", KINDS_T)
def test_sparse_losses_match_float64_partition_reference(kind, temperature):
    student, ids, logprobs, log_tail, weights = batch(29, 64, 53, 7, seed=len(kind) + int(10 * temperature))
    s = student.clone().requires_grad_(True)
    got = sparse_logit_losses(s, ids, logprobs, log_tail, [LogitLoss(kind, temperature)], weights, vocab_size=53,
                              chunk_size=6)[0]
    (g_got,) = torch.autograd.grad(got, s)
    r = student.clone().requires_grad_(True)
    ref = partition_reference(r, ids, logprobs, log_tail, kind, weights, temperature, 53)
    (g_ref,) = torch.autograd.grad(ref, r)
    assert ref.item() > 0
    assert abs(got.item() - ref.item()) / ref.item() < 1e-9
    assert ((g_got - g_ref).abs().max() / g_ref.abs().max()).item() < 1e-8
    assert g_got[:, 53:].abs().max() == 0  # padding ids get no gradient


def padded_rows(teacher: torch.Tensor, counts: list[int], vocab_size: int):
    """Rows that store counts[i] ids each (a budgeted capture), padded to max(counts) with id −1 and −inf."""
    k = max(counts)
    ids, logprobs, log_tail = [], [], []
    for row, n in zip(teacher, counts):
        i, lp, t = stored_teacher(row.unsqueeze(0), n, vocab_size)
        ids.append(torch.cat([i[0], torch.full((k - n,), -1)]))
        logprobs.append(torch.cat([lp[0], torch.full((k - n,), -math.inf, dtype=lp.dtype)]))
        log_tail.append(t[0])
    return torch.stack(ids), torch.stack(logprobs), torch.stack(log_tail)


@pytest.mark.parametrize("kind,temperature", KINDS_T)
def test_padded_rows_equal_each_rows_own_partition(kind, temperature):
    student, _, _, _, weights = batch(12, 40, 37, 3, seed=11)
    teacher = 3 * torch.randn(12, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    counts = [1, 9, 4, 37, 2, 9, 5, 3, 8, 6, 7, 36]  # 37: the whole vocabulary, no tail bucket
    ids, logprobs, log_tail = padded_rows(teacher, counts, 37)
    s = student.clone().requires_grad_(True)
    got = sparse_logit_losses(s, ids, logprobs, log_tail, [LogitLoss(kind, temperature)], weights, vocab_size=37,
                              chunk_size=5)[0]
    (g_got,) = torch.autograd.grad(got, s)
    r = student.clone().requires_grad_(True)
    ref = sum(partition_reference(r[i:i + 1], ids[i:i + 1, :n], logprobs[i:i + 1, :n], log_tail[i:i + 1], kind,
                                  weights[i:i + 1], temperature, 37) for i, n in enumerate(counts))
    (g_ref,) = torch.autograd.grad(ref, r)
    assert ref.item() > 0
    assert abs(got.item() - ref.item()) / ref.item() < 1e-9
    assert ((g_got - g_ref).abs().max() / g_ref.abs().max()).item() < 1e-8


@pytest.mark.parametrize("kind,temperature", KINDS_T)
def test_sparse_equals_dense_when_k_covers_the_vocabulary(kind, temperature):
    student, ids, logprobs, log_tail, weights = batch(17, 32, 32, 32, seed=5)
    g = torch.Generator().manual_seed(9)
    teacher = 3 * torch.randn(17, 32, generator=g, dtype=torch.float64)
    ids, logprobs, log_tail = stored_teacher(teacher, 32, 32)
    spec = [LogitLoss(kind, temperature)]
    a = student.clone().requires_grad_(True)
    sparse = sparse_logit_losses(a, ids, logprobs, log_tail, spec, weights, chunk_size=5)[0]
    b = student.clone().requires_grad_(True)
    dense = logit_losses(b, teacher, spec, weights, chunk_size=5)[0]
    (ga,), (gb,) = torch.autograd.grad(sparse, a), torch.autograd.grad(dense, b)
    assert abs(sparse.item() - dense.item()) / dense.item() < 1e-10
    assert ((ga - gb).abs().max() / gb.abs().max()).item() < 1e-8


def test_sparse_losses_reject_bad_teacher_rows():
    student, ids, logprobs, log_tail, weights = batch(4, 16, 16, 3, seed=1)
    spec = [LogitLoss("forward_kl")]
    with pytest.raises(ValueError, match="ce needs labels"):
        sparse_logit_losses(student, ids, logprobs, log_tail, [LogitLoss("ce")], weights)
    with pytest.raises(ValueError, match=r"teacher ids must be"):
        sparse_logit_losses(student, ids + 16, logprobs, log_tail, spec, weights)
    with pytest.raises(ValueError, match="teacher tail"):
        sparse_logit_losses(student, ids, logprobs, log_tail[:2], spec, weights)


def test_vocab_parallel_topk_matches_a_sort():
    g = torch.Generator().manual_seed(3)
    logits = 4 * torch.randn(11, 40, generator=g)
    ids, values, log_tail = vocab_parallel_topk(logits, 6, vocab_size=37)
    ref_ids, ref_lp, ref_tail = stored_teacher(logits.double(), 6, 37)
    assert torch.equal(ids, ref_ids)
    assert torch.allclose(values.double(), ref_lp, atol=1e-5)
    assert torch.allclose(log_tail.double(), ref_tail, atol=1e-5)


def test_tp2_equals_tp1():
    cases = []
    for seed, (kind, T) in enumerate([("forward_kl", 1.0), ("reverse_kl", 2.0), ("jsd", 1.0), ("tvd", 1.5)]):
        student, ids, logprobs, log_tail, weights = batch(13, 64, 57, 9, seed=seed)
        cases.append({"student": student, "ids": ids, "logprobs": logprobs, "log_tail": log_tail,
                      "weights": weights, "specs": [{"kind": kind, "temperature": T}, {"kind": "forward_kl"}],
                      "vocab_size": 57, "chunk_size": 4, "k": 9})
    student, _, _, _, weights = batch(13, 64, 57, 9, seed=8)
    teacher = 3 * torch.randn(13, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ids, logprobs, log_tail = padded_rows(teacher, [9, 1, 4, 57, 2, 9, 5, 3, 8, 6, 7, 9, 2], 57)
    cases.append({"student": student, "ids": ids, "logprobs": logprobs, "log_tail": log_tail, "weights": weights,
                  "specs": [{"kind": "reverse_kl", "temperature": 1.5}, {"kind": "jsd"}], "vocab_size": 57,
                  "chunk_size": 4, "k": 9})
    results = spawn(tp_sparse_losses, 2, cases)
    for case, r0, r1 in zip(cases, *results):
        s = case["student"].clone().requires_grad_(True)
        single = sparse_logit_losses(s, case["ids"], case["logprobs"], case["log_tail"],
                                     [LogitLoss(**x) for x in case["specs"]], case["weights"], vocab_size=57,
                                     chunk_size=4)
        (grad,) = torch.autograd.grad(single.sum(), s)
        for r in (r0, r1):
            assert torch.allclose(r["values"], single.detach(), rtol=1e-12, atol=0)
        assert torch.allclose(torch.cat([r0["grad"], r1["grad"]], -1), grad, rtol=1e-10, atol=1e-14)
        ids, values, log_tail = vocab_parallel_topk(case["student"], 9, vocab_size=57)
        for r in (r0, r1):
            assert torch.equal(r["topk"][0], ids)
            assert torch.allclose(r["topk"][1], values, atol=1e-6)
            assert torch.allclose(r["topk"][2], log_tail, atol=1e-6)
