"""megatron_student.ops.losses against independent float64 dense references: values and gradients, padded
vocabulary, temperature, masks and weights; vocab-parallel over gloo TP=2; global normalisation over DP ranks
and micro-batches; chunked memory measured with a dispatch mode; alignment losses; the NaN guard."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from losses_workers import dp_accumulated_step, spawn, tp_logit_losses
from megatron_student.ops.losses import (LogitLoss, NonFiniteLossError, attention_alignment_loss, check_finite,
                                         global_normaliser, hidden_state_loss, logit_loss, logit_losses,
                                         token_weights)

KINDS_T = [("forward_kl", 1.0), ("forward_kl", 2.5), ("reverse_kl", 1.0), ("reverse_kl", 0.7), ("jsd", 2.0),
           ("tvd", 1.0), ("tvd", 3.0), ("ce", 1.0)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def dense_reference(student, teacher, kind, weights, *, temperature=1.0, beta=0.5, labels=None, vocab_size=None):
    """Σ_t w_t ℓ_t on the whole vocabulary in float64: padded ids are −inf logits for both models; the sums run
    over probabilities of the true vocabulary."""
    v = student.shape[-1] if vocab_size is None else vocab_size
    pad = torch.arange(student.shape[-1]) >= v
    s = student.double().masked_fill(pad, -math.inf)
    if kind == "ce":
        per_token = F.cross_entropy(s, labels, ignore_index=-100, reduction="none")
        return (weights.double() * per_token).sum()
    t = teacher.double().masked_fill(pad, -math.inf)
    p = torch.softmax(t / temperature, -1)[:, :v]
    q = torch.softmax(s / temperature, -1)[:, :v]
    if kind == "forward_kl":
        per_token = (p * (p.log() - q.log())).sum(-1)
    elif kind == "reverse_kl":
        per_token = (q * (q.log() - p.log())).sum(-1)
    elif kind == "jsd":
        m = beta * p + (1 - beta) * q
        per_token = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    else:
        per_token = 0.5 * (p - q).abs().sum(-1)
    return (weights.double() * per_token).sum() * temperature ** 2


def random_batch(n: int, padded_vocab: int, vocab_size: int, seed: int, dtype=torch.float64) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab_size, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    channel = torch.randint(0, 3, (n,), generator=g)  # 0 other, 1 analysis, 2 final
    weights = token_weights(labels, channel == 1, channel == 2, 0.5 + torch.rand(n, generator=g),
                            final_channel=1.0, analysis_channel=0.6, other_channel=0.3)
    return {"student": (3 * torch.randn(n, padded_vocab, generator=g)).to(dtype),
            "teacher": (3 * torch.randn(n, padded_vocab, generator=g)).to(dtype),
            "labels": labels, "weights": weights.double(), "vocab_size": vocab_size}


# ----------------------------------------------------------------------------------------------- dense parity

@pytest.mark.parametrize("kind,temperature", KINDS_T)
@pytest.mark.parametrize("vocab_size", [53, 64])  # 53: rows 53..63 are padding
def test_logit_loss_matches_dense_float64(kind, temperature, vocab_size):
    b = random_batch(37, 64, vocab_size, seed=hash((kind, temperature, vocab_size)) % 1000)
    student = b["student"].clone().requires_grad_(True)
    got = logit_loss(student, b["teacher"], kind, b["weights"], temperature=temperature, labels=b["labels"],
                     vocab_size=vocab_size, chunk_size=8)
    (g_got,) = torch.autograd.grad(got, student)
    ref_in = b["student"].clone().requires_grad_(True)
    ref = dense_reference(ref_in, b["teacher"], kind, b["weights"], temperature=temperature, labels=b["labels"],
                          vocab_size=vocab_size)
    (g_ref,) = torch.autograd.grad(ref, ref_in)
    assert ref.item() > 0
    assert abs(got.item() - ref.item()) / ref.item() < 1e-10
    assert rel(g_got, g_ref) < 1e-6
    assert torch.all(g_got[:, vocab_size:] == 0)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_beta_matches_dense_float64(beta):
    b = random_batch(20, 40, 33, seed=7)
    student = b["student"].clone().requires_grad_(True)
    got = logit_loss(student, b["teacher"], "jsd", b["weights"], temperature=1.5, beta=beta, vocab_size=33,
                     chunk_size=6)
    (g_got,) = torch.autograd.grad(got, student)
    ref_in = b["student"].clone().requires_grad_(True)
    ref = dense_reference(ref_in, b["teacher"], "jsd", b["weights"], temperature=1.5, beta=beta, vocab_size=33)
    (g_ref,) = torch.autograd.grad(ref, ref_in)
    assert abs(got.item() - ref.item()) / ref.item() < 1e-10
    assert rel(g_got, g_ref) < 1e-6


def test_jsd_beta_half_is_symmetric_and_bounded():
    b = random_batch(16, 32, 32, seed=3)
    w = torch.ones(16, dtype=torch.float64)
    pq = logit_loss(b["student"], b["teacher"], "jsd", w, beta=0.5)
    qp = logit_loss(b["teacher"], b["student"], "jsd", w, beta=0.5)
    assert abs(pq.item() - qp.item()) < 1e-12
    assert 0 < pq.item() < 16 * math.log(2)
    # β = 0.2 with P and Q swapped is β = 0.8 (M = βP + (1−β)Q is the same mixture).
    a = logit_loss(b["student"], b["teacher"], "jsd", w, beta=0.2)
    c = logit_loss(b["teacher"], b["student"], "jsd", w, beta=0.8)
    assert abs(a.item() - c.item()) < 1e-12


def test_several_components_one_pass_with_per_component_weights():
    b = random_batch(29, 48, 45, seed=11)
    specs = [LogitLoss("forward_kl", 2.0), LogitLoss("ce"), LogitLoss("jsd", 1.0, beta=0.3)]
    weights = torch.stack([b["weights"], (b["labels"] != -100).double(), b["weights"].flip(0)])
    student = b["student"].clone().requires_grad_(True)
    got = logit_losses(student, b["teacher"], specs, weights, labels=b["labels"], vocab_size=45, chunk_size=4)
    (g_got,) = torch.autograd.grad(got @ torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64), student)
    ref_in = b["student"].clone().requires_grad_(True)
    refs = torch.stack([dense_reference(ref_in, b["teacher"], s.kind, w, temperature=s.temperature, beta=s.beta,
                                        labels=b["labels"], vocab_size=45) for s, w in zip(specs, weights)])
    (g_ref,) = torch.autograd.grad(refs @ torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64), ref_in)
    assert torch.allclose(got.detach(), refs.detach(), rtol=1e-10, atol=0)
    assert rel(g_got, g_ref) < 1e-6


def test_leading_dims_and_bfloat16_inputs():
    """[s, b, V] bf16 logits as Megatron gives them: float32 math, bf16 gradient, close to the float64 result."""
    b = random_batch(24, 40, 40, seed=5)
    student = b["student"].to(torch.bfloat16).reshape(6, 4, 40).requires_grad_(True)
    teacher = b["teacher"].to(torch.bfloat16).reshape(6, 4, 40)
    got = logit_loss(student, teacher, "forward_kl", b["weights"].reshape(6, 4).float(), temperature=2.0,
                     chunk_size=5)
    got.backward()
    ref_in = student.detach().double().reshape(24, 40).requires_grad_(True)
    ref = dense_reference(ref_in, teacher.reshape(24, 40), "forward_kl", b["weights"], temperature=2.0)
    ref.backward()
    assert got.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    assert abs(got.item() - ref.item()) / ref.item() < 1e-5
    assert rel(student.grad.reshape(24, 40), ref_in.grad) < 1e-2


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown logit loss"):
        LogitLoss("kl")
    with pytest.raises(ValueError, match="temperature must be 1"):
        LogitLoss("ce", temperature=2.0)
    with pytest.raises(ValueError, match="beta"):
        LogitLoss("jsd", beta=1.0)
    b = random_batch(8, 16, 12, seed=0)
    bad = b["labels"].clone()
    bad[0] = 13  # a padded id
    with pytest.raises(ValueError, match="labels must be"):
        logit_loss(b["student"], None, "ce", b["weights"], labels=bad, vocab_size=12)
    with pytest.raises(ValueError, match="teacher_logits is required"):
        logit_loss(b["student"], None, "tvd", b["weights"])


# ----------------------------------------------------------------------------------------------- token weights

def test_token_weights_combine_mask_channels_and_analysis_weight():
    labels = torch.tensor([5, -100, 7, 8, 9, 3])
    analysis = torch.tensor([True, True, True, False, False, False])
    final = torch.tensor([False, False, False, True, False, False])
    aw = torch.tensor([0.5, 0.5, 0.25, 1.0, 1.0, 2.0])
    w = token_weights(labels, analysis, final, aw, final_channel=2.0, analysis_channel=0.1, other_channel=0.7)
    torch.testing.assert_close(w, torch.tensor([0.05, 0.0, 0.025, 2.0, 0.7, 1.4]))
    with pytest.raises(ValueError, match="both analysis and final"):
        token_weights(labels, analysis, analysis, aw)


# ----------------------------------------------------------------------------------------------- TP = 2 (gloo)

def test_vocab_parallel_tp2_equals_dense():
    cases = []
    for seed, vocab_size in ((1, 41), (2, 20)):  # 41: the last shard has 7 padded ids; 20: it is all padding
        b = random_batch(37, 48, vocab_size, seed)
        cases.append({**b, "chunk_size": 8,
                      "specs": [{"kind": "forward_kl", "temperature": 2.0}, {"kind": "reverse_kl", "temperature": 0.8},
                                {"kind": "jsd", "temperature": 1.0, "beta": 0.3}, {"kind": "tvd", "temperature": 1.5},
                                {"kind": "ce"}]})
    results = spawn(tp_logit_losses, 2, cases)
    for i, case in enumerate(cases):
        ref_in = case["student"].clone().requires_grad_(True)
        refs = torch.stack([dense_reference(ref_in, case["teacher"], s["kind"], case["weights"],
                                            temperature=s.get("temperature", 1.0), beta=s.get("beta", 0.5),
                                            labels=case["labels"], vocab_size=case["vocab_size"])
                            for s in case["specs"]])
        (g_ref,) = torch.autograd.grad(refs.sum(), ref_in)
        for r in range(2):  # every TP rank holds the full loss; a group of one is the unsplit computation
            assert torch.allclose(results[r][i]["values"], refs.detach(), rtol=1e-10, atol=0)
            assert torch.allclose(results[r][i]["unsplit"], refs.detach(), rtol=1e-10, atol=0)
        g_tp = torch.cat([results[0][i]["grad"], results[1][i]["grad"]], dim=-1)
        assert rel(g_tp, g_ref) < 1e-6


# ----------------------------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize("dp_grad_average", [False, True])
def test_global_normaliser_two_dp_ranks_two_micro_batches_equal_one_batch(dp_grad_average):
    g = torch.Generator().manual_seed(0)
    d, vocab = 6, 16
    w0 = torch.randn(d, vocab, generator=g, dtype=torch.float64)
    micro = []
    for rank_sizes in ((7, 12), (9, 4)):  # unequal token counts and masks, so per-micro-batch means would differ
        batches = []
        for n in rank_sizes:
            labels = torch.randint(0, vocab, (n,), generator=g)
            labels[torch.rand(n, generator=g) < 0.3] = -100
            analysis = torch.rand(n, generator=g) < 0.5
            w = token_weights(labels, analysis, ~analysis, 0.5 + torch.rand(n, generator=g), analysis_channel=0.4)
            batches.append({"x": torch.randn(n, d, generator=g, dtype=torch.float64),
                            "teacher": torch.randn(n, vocab, generator=g, dtype=torch.float64),
                            "labels": labels, "weights": w.double()})
        micro.append(batches)
    results = spawn(dp_accumulated_step, 2, w0, micro, dp_grad_average)

    every = [mb for batches in micro for mb in batches]
    cat = {k: torch.cat([mb[k] for mb in every]) for k in every[0]}
    w = w0.clone().requires_grad_(True)
    specs = [LogitLoss("forward_kl", temperature=2.0), LogitLoss("ce")]
    one = logit_losses(cat["x"] @ w, cat["teacher"], specs, cat["weights"], labels=cat["labels"]).sum()
    one = one / global_normaliser([cat["weights"]], mode="weight")
    one.backward()
    for r in range(2):
        assert abs(results[r]["loss"].item() - one.item()) < 1e-12 * one.item()
        assert rel(results[r]["grad"], w.grad) < 1e-10


def test_global_normaliser_modes_single_process():
    ws = [torch.tensor([0.0, 0.5, 1.0]), torch.tensor([2.0, 0.0])]
    assert global_normaliser(ws, mode="tokens").item() == 3
    assert global_normaliser(ws, mode="weight").item() == 3.5
    zero = global_normaliser([torch.zeros(4)])
    assert zero.item() > 0 and (torch.zeros(()) / zero).item() == 0


# ----------------------------------------------------------------------------------------------- memory

class _AllocationRecorder(TorchDispatchMode):
    """Records (dtype, bytes) of every tensor an op creates (outputs that share no storage with its inputs)."""

    def __init__(self):
        super().__init__()
        self.allocations: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.allocations.append((t.dtype, t.untyped_storage().nbytes()))
        return out


def _record_chunked_pass(n: int, vocab: int, chunk: int):
    b = random_batch(n, vocab, vocab - 5, seed=9, dtype=torch.bfloat16)
    student = b["student"].requires_grad_(True)
    specs = [LogitLoss("forward_kl", 2.0), LogitLoss("reverse_kl", 1.0), LogitLoss("jsd", 1.0, 0.4),
             LogitLoss("tvd", 2.0), LogitLoss("ce")]
    with _AllocationRecorder() as fwd:
        values = logit_losses(student, b["teacher"], specs, b["weights"], labels=b["labels"], vocab_size=vocab - 5,
                              chunk_size=chunk)
    with _AllocationRecorder() as bwd:
        values.sum().backward()
    return fwd.allocations, bwd.allocations


def test_chunked_loss_memory_is_bounded_by_chunk_times_vocab():
    n, vocab, chunk = 512, 256, 32
    fwd, bwd = _record_chunked_pass(n, vocab, chunk)
    chunk_fp32 = chunk * vocab * 4
    for phase in (fwd, bwd):
        biggest_fp32 = max(nbytes for dtype, nbytes in phase if dtype == torch.float32)
        assert chunk_fp32 // 2 <= biggest_fp32 <= chunk_fp32
    # Nothing of a whole micro-batch's size except the one bf16 gradient buffer of the logits' own shape.
    assert all(nbytes <= chunk_fp32 for _, nbytes in fwd)
    big = [(dtype, nbytes) for dtype, nbytes in bwd if nbytes > chunk_fp32]
    assert big == [(torch.bfloat16, n * vocab * 2)]
    # The recorder does see whole-batch tensors when the chunk is the whole batch.
    fwd_full, bwd_full = _record_chunked_pass(n, vocab, n)
    assert max(nb for dt, nb in fwd_full if dt == torch.float32) >= n * (vocab - 5) * 4
    assert max(nb for dt, nb in bwd_full if dt == torch.float32) >= n * (vocab - 5) * 4


# ----------------------------------------------------------------------------------------------- alignment

def _alignment_reference(s, t, w, kind):
    s, t = s.double(), t.double()
    if kind == "mse":
        per_token = ((s - t) ** 2).sum(-1) / s.shape[-1]
    else:
        per_token = 1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    return (w.double() * per_token).sum()


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_hidden_state_loss_matches_reference(kind):
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(5, 3, generator=g) < 0.7).double()
    pairs = [(torch.randn(5, 3, 8, generator=g, dtype=torch.float64).requires_grad_(True),
              torch.randn(5, 3, 8, generator=g, dtype=torch.float64).requires_grad_(True)) for _ in range(3)]
    got = hidden_state_loss(pairs, mask, kind)
    ref = sum(_alignment_reference(s, t.detach(), mask, kind) for s, t in pairs) / 3
    assert abs(got.item() - ref.item()) < 1e-12 * ref.item()
    grads = torch.autograd.grad(got, [s for s, _ in pairs], retain_graph=True)
    refs = torch.autograd.grad(ref, [s for s, _ in pairs])
    for a, r in zip(grads, refs):
        assert rel(a, r) < 1e-10
    got.backward()
    assert all(t.grad is None for _, t in pairs)  # the teacher side is constant


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_attention_alignment_is_teacher_forced(kind):
    g = torch.Generator().manual_seed(6)
    attention = torch.nn.Linear(8, 8, dtype=torch.float64)
    layer_input = torch.randn(4, 2, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    teacher_out = torch.randn(4, 2, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.rand(4, 2, generator=g, dtype=torch.float64)
    got = attention_alignment_loss(attention, layer_input, teacher_out, w, kind)
    got.backward()
    assert layer_input.grad is None and teacher_out.grad is None
    grad_got = attention.weight.grad.clone()
    attention.zero_grad()
    ref = _alignment_reference(attention(layer_input.detach()), teacher_out.detach(), w, kind)
    ref.backward()
    assert abs(got.item() - ref.item()) < 1e-12 * ref.item()
    assert rel(grad_got, attention.weight.grad) < 1e-10


# ----------------------------------------------------------------------------------------------- NaN guard

def test_check_finite_names_component_and_step():
    check_finite({"kl": torch.tensor(0.3), "ce": torch.tensor(2.0)}, step=3)
    with pytest.raises(NonFiniteLossError, match=r"'hs_cosine' is nan at step 17") as err:
        check_finite({"kl": torch.tensor(0.3), "hs_cosine": torch.tensor(float("nan")),
                      "ce": torch.tensor(float("inf"))}, step=17)
    assert err.value.component == "hs_cosine" and err.value.step == 17
    with pytest.raises(NonFiniteLossError, match=r"'ce' is inf at step 2"):
        check_finite({"kl": torch.tensor(0.3), "ce": torch.tensor(float("inf"), dtype=torch.bfloat16)}, step=2)
    # A non-finite logit reaches the guard as a non-finite loss.
    student = torch.randn(4, 8)
    student[1, 2] = float("nan")
    with pytest.raises(NonFiniteLossError, match="'kl'"):
        check_finite({"kl": logit_loss(student, torch.randn(4, 8), "forward_kl", torch.ones(4))}, step=0)
