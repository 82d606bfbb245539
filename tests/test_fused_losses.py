"""The fused Triton logit losses (``ops.logit_kernels`` behind ``logit_losses(backend="fused")``) against the torch
path (``backend="torch"``, float64): values and gradients of forward and reverse KL (T = 1 and T ≠ 1) and CE, padded
vocabulary, −100 labels, per-component weights, rows longer than one kernel block, bf16 logits, vocab-parallel over
gloo TP=2 (one rank holding only padding). The same for the sparse (stored top-k teacher) losses behind
``sparse_logit_losses(backend="fused")``: the four kinds and CE, rows padded with id −1 (a budgeted capture), rows of
padding only, ids in any order, the whole vocabulary stored (no tail), the tail bucket. The kernels run in Triton's
interpreter on CPU tensors, in spawned processes; about a minute."""

from __future__ import annotations

import math

import pytest
import torch

from losses_workers import spawn
from megatron_student.ops import logit_kernels
from megatron_student.ops.losses import LogitLoss, logit_losses, sparse_logit_losses, token_weights

STAGE_B = [LogitLoss("forward_kl"), LogitLoss("ce")]
CASES = {
    "stage_b": STAGE_B,
    "kl_t2.5_ce": [LogitLoss("forward_kl", temperature=2.5), LogitLoss("ce")],
    "kl_t0.7": [LogitLoss("forward_kl", temperature=0.7)],
    "ce": [LogitLoss("ce")],
    "two_kl_same_t": [LogitLoss("forward_kl", temperature=2.0), LogitLoss("ce"), LogitLoss("forward_kl", 2.0)],
    "rkl_t1.5": [LogitLoss("reverse_kl", temperature=1.5)],
    "kl_rkl_ce": [LogitLoss("forward_kl", 0.8), LogitLoss("reverse_kl", 0.8), LogitLoss("ce")],
}


@pytest.fixture
def interpreter(monkeypatch):
    """Triton's interpreter for the worker processes: it must be chosen before triton is first imported (its own
    ``tl.max``/``tl.sum`` are Triton functions too), so the kernels run in spawned ranks, never in this process."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def batch(n: int, padded_vocab: int, vocab_size: int, components: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab_size, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.25] = -100
    mask = labels != -100
    weights = torch.stack([token_weights(labels, ~mask & mask, mask & (torch.rand(n, generator=g) < 0.5),
                                         0.5 + torch.rand(n, generator=g), analysis_channel=0.6, other_channel=0.3)
                           for _ in range(components)])
    weights[:, :2] = 1.0  # ignored labels with a weight: ce must still give them nothing
    return {"student": 3 * torch.randn(n, padded_vocab, generator=g),
            "teacher": 3 * torch.randn(n, padded_vocab, generator=g),
            "labels": labels, "weights": weights, "vocab_size": vocab_size}


def fused_losses(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    """Each case through the fused path on this rank's column shard (TP over all ranks; one rank: unsplit): the
    values and the gradient of Σ upstream·values for the shard, in the case's dtype."""
    group = torch.distributed.new_group(list(range(world_size))) if world_size > 1 else None
    out = []
    for case in cases:
        local = case["student"].shape[-1] // world_size
        cols = slice(rank * local, (rank + 1) * local)
        student = case["student"][:, cols].to(case["dtype"]).requires_grad_(True)
        specs = [LogitLoss(**s) for s in case["specs"]]
        values = logit_losses(student, case["teacher"][:, cols].to(case["dtype"]), specs, case["weights"],
                              labels=case["labels"], vocab_size=case["vocab_size"], tp_group=group, backend="fused")
        (grad,) = torch.autograd.grad((values * case["upstream"]).sum(), student)
        out.append({"values": values.detach(), "grad": grad})
    return out


def reference(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path in float64 on the case's logits (rounded to its dtype first): values and full gradient."""
    student = case["student"].to(case["dtype"]).double().requires_grad_(True)
    specs = [LogitLoss(**s) for s in case["specs"]]
    values = logit_losses(student, case["teacher"].to(case["dtype"]).double(), specs, case["weights"],
                          labels=case["labels"], vocab_size=case["vocab_size"], chunk_size=7, backend="torch")
    (grad,) = torch.autograd.grad((values * case["upstream"].double()).sum(), student)
    return values.detach(), grad


def case_of(specs, n, padded, vocab, seed, dtype=torch.float32) -> dict:
    b = batch(n, padded, vocab, len(specs), seed)
    b.update(specs=[{"kind": s.kind, "temperature": s.temperature} for s in specs], dtype=dtype,
             upstream=torch.linspace(0.5, 1.5, len(specs)))
    return b


SHAPES = [(29, 64, 64), (29, 64, 53), (5, 2 * logit_kernels.BLOCK + 160, 2 * logit_kernels.BLOCK + 123)]


def test_fused_matches_torch_path(interpreter):
    # every case × shape in one spawned process: kinds, T = 1 and T ≠ 1, padding, rows of several kernel blocks
    cases = [case_of(specs, n, padded, vocab, seed=i) for i, (specs, (n, padded, vocab))
             in enumerate((specs, shape) for specs in CASES.values() for shape in SHAPES)]
    cases.append(case_of(STAGE_B, 24, 64, 60, seed=99, dtype=torch.bfloat16))
    (results,) = spawn(fused_losses, 1, cases)
    for case, result in zip(cases, results):
        ref, ref_grad = reference(case)
        what = (case["specs"], case["vocab_size"], case["dtype"])
        assert result["values"].dtype == torch.float32 and result["grad"].dtype == case["dtype"], what
        assert rel(result["values"], ref) < (1e-5 if case["dtype"] == torch.bfloat16 else 2e-6), what
        # the gradient is written in the logits' dtype: bf16 rounding for bf16 logits
        assert rel(result["grad"], ref_grad) < (1e-2 if case["dtype"] == torch.bfloat16 else 2e-6), what
        assert result["grad"][:, case["vocab_size"]:].abs().sum() == 0, what


def test_fused_rejects_what_it_does_not_compute():
    b = batch(4, 16, 16, 1, seed=0)
    args = (b["student"], b["teacher"])
    for specs, message in (([LogitLoss("jsd")], "jsd"), ([LogitLoss("tvd")], "tvd"),
                           ([LogitLoss("forward_kl", 1.0), LogitLoss("reverse_kl", 2.0)], "one temperature")):
        with pytest.raises(ValueError, match=message):
            logit_losses(*args, specs, b["weights"][0], labels=b["labels"], backend="fused")
    with pytest.raises(ValueError, match="float64"):
        logit_losses(*(x.double() for x in args), STAGE_B, b["weights"][0], labels=b["labels"], backend="fused")
    with pytest.raises(ValueError, match="backend"):
        logit_losses(*args, STAGE_B, b["weights"][0], labels=b["labels"], backend="triton")


def test_fused_vocab_parallel_tp2_equals_unsplit_torch_path(interpreter):
    cases = [case_of([LogitLoss("forward_kl", temperature), LogitLoss("reverse_kl", temperature), LogitLoss("ce")],
                     17, 64, vocab, seed=vocab)
             for vocab, temperature in ((64, 1.0),  # no padding
                                        (50, 2.0),  # rank 1 partly padding
                                        (30, 1.0))]  # rank 1 only padding
    results = spawn(fused_losses, 2, cases)
    for i, case in enumerate(cases):
        ref, ref_grad = reference(case)
        for rank in range(2):
            result = results[rank][i]
            assert rel(result["values"], ref) < 2e-6, (rank, case["vocab_size"])
            assert rel(result["grad"], ref_grad[:, rank * 32:(rank + 1) * 32]) < 2e-6 if rank == 0 or \
                case["vocab_size"] > 32 else result["grad"].abs().max() == 0


# --------------------------------------------------------------------------------------------------------------
# Sparse losses against a stored top-k teacher

SPARSE_CASES = {
    "stage_b": STAGE_B,
    "kl_t2.5_ce": [LogitLoss("forward_kl", temperature=2.5), LogitLoss("ce")],
    "rkl_t0.7": [LogitLoss("reverse_kl", temperature=0.7)],
    "jsd_ce": [LogitLoss("jsd", temperature=1.5, beta=0.3), LogitLoss("ce")],
    "tvd_t2": [LogitLoss("tvd", temperature=2.0)],
    "all_t1.5": [LogitLoss("forward_kl", 1.5), LogitLoss("ce"), LogitLoss("reverse_kl", 1.5), LogitLoss("jsd", 1.5),
                 LogitLoss("tvd", 1.5)],
}


def stored_rows(teacher: torch.Tensor, k: int, vocab_size: int, seed: int):
    """A capture's decoded rows of dense ``teacher`` logits: each row the top ids of a count drawn in [1, k] (k when
    k is the vocabulary) in a shuffled order, padded to k with id −1 and −inf, the float64 log tail of the other ids
    (−inf when none); the first row is an unstored position (padding only, tail 0, as the reader gives it)."""
    g = torch.Generator().manual_seed(seed)
    log_p = torch.log_softmax(teacher[:, :vocab_size].double(), -1)
    n = log_p.shape[0]
    counts = torch.full((n,), k) if k == vocab_size else torch.randint(1, k + 1, (n,), generator=g)
    order = log_p.argsort(-1, descending=True)[:, :k]
    slots = torch.arange(k).expand(n, k)
    stored = slots < counts.unsqueeze(1)
    rest = log_p.scatter(1, order, torch.where(stored, -math.inf, log_p.gather(1, order)))
    ids = torch.where(stored, order, -1)
    logprobs = torch.where(stored, log_p.gather(1, order), -math.inf)
    log_tail = torch.logsumexp(rest, -1)
    ids[0], logprobs[0], log_tail[0] = -1, -math.inf, 0.0
    shuffle = torch.rand(n, k, generator=g).argsort(-1)
    return ids.gather(1, shuffle), logprobs.gather(1, shuffle), log_tail


def sparse_case_of(specs, n, padded, vocab, k, seed, dtype=torch.float32) -> dict:
    case = case_of(specs, n, padded, vocab, seed, dtype)
    case["specs"] = [{"kind": s.kind, "temperature": s.temperature, "beta": s.beta} for s in specs]
    case["ids"], case["logprobs"], case["log_tail"] = stored_rows(case.pop("teacher"), k, vocab, seed)
    return case


def fused_sparse_losses(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    """As ``fused_losses`` for ``sparse_logit_losses`` (every rank gets the stored rows whole)."""
    group = torch.distributed.new_group(list(range(world_size))) if world_size > 1 else None
    out = []
    for case in cases:
        local = case["student"].shape[-1] // world_size
        student = case["student"][:, rank * local:(rank + 1) * local].to(case["dtype"]).requires_grad_(True)
        values = sparse_logit_losses(student, case["ids"], case["logprobs"].float(), case["log_tail"].float(),
                                     [LogitLoss(**s) for s in case["specs"]], case["weights"], labels=case["labels"],
                                     vocab_size=case["vocab_size"], tp_group=group, backend="fused")
        (grad,) = torch.autograd.grad((values * case["upstream"]).sum(), student)
        out.append({"values": values.detach(), "grad": grad})
    return out


def sparse_reference(case: dict, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse torch path in ``dtype`` on the case's logits (rounded to its dtype first): values and full
    gradient."""
    student = case["student"].to(case["dtype"]).to(dtype).requires_grad_(True)
    values = sparse_logit_losses(student, case["ids"], case["logprobs"].to(dtype), case["log_tail"].to(dtype),
                                 [LogitLoss(**s) for s in case["specs"]], case["weights"], labels=case["labels"],
                                 vocab_size=case["vocab_size"], chunk_size=7, backend="torch")
    (grad,) = torch.autograd.grad((values * case["upstream"].to(dtype)).sum(), student)
    return values.detach(), grad


# (rows, padded vocabulary, vocabulary, k): padding columns, rows of several kernel blocks with their stored ids
# spread over the blocks, the whole vocabulary stored (no tail bucket)
SPARSE_SHAPES = [(29, 64, 64, 9), (29, 64, 53, 9),
                 (5, 2 * logit_kernels.BLOCK + 160, 2 * logit_kernels.BLOCK + 123, 40), (7, 24, 20, 20)]


def test_fused_sparse_matches_torch_path(interpreter):
    cases = [sparse_case_of(specs, *shape, seed=i) for i, (specs, shape)
             in enumerate((specs, shape) for specs in SPARSE_CASES.values() for shape in SPARSE_SHAPES)]
    cases.append(sparse_case_of(SPARSE_CASES["all_t1.5"], 24, 64, 60, 12, seed=99, dtype=torch.bfloat16))
    (results,) = spawn(fused_sparse_losses, 1, cases)
    for case, result in zip(cases, results):
        ref, ref_grad = sparse_reference(case)
        what = ([s["kind"] for s in case["specs"]], case["student"].shape, case["vocab_size"], case["dtype"])
        assert result["values"].dtype == torch.float32 and result["grad"].dtype == case["dtype"], what
        if case["dtype"] == torch.bfloat16:  # the gradient is written in bf16
            assert rel(result["values"], ref) < 1e-5 and rel(result["grad"], ref_grad) < 1e-2, what
        else:
            # float32 is as good as the torch path's float32: 2e-6, or worse where that is too (the tail's reverse-KL
            # and TVD terms cancel at T ≠ 1 over the 8315 ids: ~5e-6 on values and ~5e-4 on gradients)
            ref32, ref32_grad = sparse_reference(case, torch.float32)
            assert rel(result["values"], ref) < max(2e-6, 4 * rel(ref32, ref)), what
            assert rel(result["grad"], ref_grad) < max(2e-6, 4 * rel(ref32_grad, ref_grad)), what
        assert result["grad"][:, case["vocab_size"]:].abs().sum() == 0, what


def test_fused_sparse_vocab_parallel_tp2_equals_unsplit_torch_path(interpreter):
    specs = [LogitLoss("forward_kl", 2.0), LogitLoss("reverse_kl", 2.0), LogitLoss("ce"), LogitLoss("jsd", 2.0)]
    cases = [sparse_case_of(specs, 17, 64, vocab, k, seed=vocab)
             for vocab, k in ((64, 11),  # no padding
                              (50, 11),  # rank 1 partly padding
                              (30, 11),  # rank 1 only padding: its ids all on rank 0
                              (30, 30))]  # and the whole vocabulary stored
    results = spawn(fused_sparse_losses, 2, cases)
    for i, case in enumerate(cases):
        ref, ref_grad = sparse_reference(case)
        for rank in range(2):
            result = results[rank][i]
            assert rel(result["values"], ref) < 2e-6, (rank, case["vocab_size"])
            if rank == 0 or case["vocab_size"] > 32:
                assert rel(result["grad"], ref_grad[:, rank * 32:(rank + 1) * 32]) < 2e-6, (rank, case["vocab_size"])
            else:
                assert result["grad"].abs().max() == 0


def test_fused_sparse_rejects_what_it_does_not_compute():
    case = sparse_case_of(STAGE_B, 4, 16, 16, 3, seed=0)
    args = (case["student"], case["ids"], case["logprobs"], case["log_tail"])
    with pytest.raises(ValueError, match="one temperature"):
        sparse_logit_losses(*args, [LogitLoss("forward_kl", 1.0), LogitLoss("tvd", 2.0)], case["weights"][0],
                            backend="fused")
    with pytest.raises(ValueError, match="float64"):
        sparse_logit_losses(args[0].double(), *args[1:], STAGE_B, case["weights"], labels=case["labels"],
                            backend="fused")
    with pytest.raises(ValueError, match="backend"):
        sparse_logit_losses(*args, STAGE_B, case["weights"], labels=case["labels"], backend="triton")
    with pytest.raises(ValueError, match="ce needs labels"):
        sparse_logit_losses(*args, STAGE_B, case["weights"])
