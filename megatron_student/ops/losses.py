"""Distillation losses as plain functions: the one home of the trainer's loss math.

Conventions shared by every function here:

* **Token losses are weighted sums.** Every token loss returns ``Σ_t w_t · ℓ_t`` over the caller's tokens;
  the caller divides by a normaliser from :func:`global_normaliser`, which counts the whole optimiser step
  (every micro-batch of gradient accumulation on every data-parallel rank). Per-token tensors (labels, masks,
  weights) are aligned with the logits rows: the caller has already shifted labels so that row ``t`` is
  scored against ``labels[t]``.
* **Distributions.** ``P`` is the teacher, ``Q`` the student, both ``softmax(logits / T)`` in float32
  (float64 when the student logits are float64). The teacher is a constant: no gradient reaches it.
* **Kinds** (``ℓ_t`` per token, summed over the vocabulary):

  - ``forward_kl``: KL(P‖Q) = Σ p (log p − log q)
  - ``reverse_kl``: KL(Q‖P) = Σ q (log q − log p)
  - ``jsd``: generalised (skew) Jensen–Shannon, ``β·KL(P‖M) + (1−β)·KL(Q‖M)`` with ``M = β·P + (1−β)·Q``,
    β in (0, 1). β = 0.5 is the symmetric JSD (bounded by log 2); for small β it approaches β·KL(P‖Q) and for
    β near 1 it approaches (1−β)·KL(Q‖P) (the GKD paper's JSD(β), P = teacher).
  - ``tvd``: total variation, ½ Σ |p − q| (in [0, 1]).
  - ``ce``: −log q[label] on the **untempered** student logits (its temperature must be 1; no teacher needed).

  The four distillation kinds are multiplied by T² (DistillKit's convention), which keeps their gradient scale
  independent of T. CE is not.
* **Vocabulary parallelism.** Logits are ``[..., V_local]``, the caller's shard of the (padded) vocabulary as
  Megatron's ColumnParallel output layer leaves it: TP rank r holds ids ``[r·V_local, (r+1)·V_local)``. The
  vocabulary is never gathered; per-token max (all-reduce MAX) and Σexp (differentiable all-reduce SUM) over
  ``tp_group`` give a global log-softmax on each shard. Ids ≥ ``vocab_size`` (Megatron's padding, a suffix of
  the vocabulary and so on the last ranks) are excluded for both models, which is the same as −inf logits, and
  get zero gradient. ``tp_group=None`` (or a group of one) runs the same code without communication.
  The returned loss is the full loss, identical on every TP rank; backpropagating it on every rank yields each
  rank's exact gradient for its shard (the Megatron vocab-parallel cross-entropy convention — the sum over the
  vocabulary is not counted TP times).
* **Memory.** Tokens are processed in chunks of ``chunk_size`` by a custom autograd function: the forward keeps
  no activations, and the backward recomputes each chunk's softmaxes (forward/reverse KL and CE then in closed
  form, JSD and TVD by re-running the chunk under autograd) and writes its gradient into one buffer of the
  logits' own shape and dtype. No float32 tensor larger than ``[chunk_size, V_local]`` is created, forward or
  backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

IGNORE_INDEX = -100
LOGIT_LOSS_KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd", "ce")
ALIGNMENT_KINDS = ("cosine", "mse")


@dataclass(frozen=True)
class LogitLoss:
    """One logit-loss component: its kind, temperature and (for ``jsd``) the skew β."""

    kind: str
    temperature: float = 1.0
    beta: float = 0.5

    def __post_init__(self):
        if self.kind not in LOGIT_LOSS_KINDS:
            raise ValueError(f"unknown logit loss {self.kind!r}; expected one of {LOGIT_LOSS_KINDS}")
        if not self.temperature > 0:
            raise ValueError(f"{self.kind}: temperature must be > 0, got {self.temperature}")
        if self.kind == "ce" and self.temperature != 1.0:
            raise ValueError("ce is computed on the untempered student logits; its temperature must be 1")
        if self.kind == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(f"jsd: beta must be in (0, 1) (0 and 1 make the loss identically 0), got {self.beta}")


# --------------------------------------------------------------------------------------------------------------
# Per-token weights and the global normaliser


def token_weights(labels: torch.Tensor, analysis_mask: torch.Tensor, final_mask: torch.Tensor,
                  analysis_weight: torch.Tensor | None = None, *, final_channel: float = 1.0,
                  analysis_channel: float = 1.0, other_channel: float = 1.0) -> torch.Tensor:
    """Per-token loss weights (float32, the shape of ``labels``).

    weight = [labels ≠ −100] × (``final_channel`` on final tokens, ``analysis_channel`` on analysis tokens,
    ``other_channel`` elsewhere) × ``analysis_weight`` (the data pipeline's per-token float, 1.0 outside analysis
    content; None means all ones). A token may not be both analysis and final.
    """
    for name, t in (("analysis_mask", analysis_mask), ("final_mask", final_mask), ("analysis_weight", analysis_weight)):
        if t is not None and t.shape != labels.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, labels {tuple(labels.shape)}")
    if bool((analysis_mask & final_mask).any()):
        raise ValueError("a token is marked both analysis and final")
    channel = torch.full(labels.shape, float(other_channel), dtype=torch.float32, device=labels.device)
    channel = channel.masked_fill(analysis_mask, float(analysis_channel)).masked_fill(final_mask, float(final_channel))
    weight = channel * (labels != IGNORE_INDEX)
    if analysis_weight is not None:
        weight = weight * analysis_weight.to(torch.float32)
    return weight


def global_normaliser(weights: Sequence[torch.Tensor], *, mode: str = "tokens",
                      group: dist.ProcessGroup | None = None, dp_grad_average: bool = False) -> torch.Tensor:
    """The denominator of one optimiser step's loss: over this rank's micro-batches (``weights``, one per-token
    weight tensor each) and every rank of the data-parallel ``group`` (None: this process only).

    ``mode="tokens"`` counts tokens of non-zero weight; ``mode="weight"`` sums the weights. Each micro-batch's
    loss is then ``Σ w·ℓ / normaliser``, and **summing** the gradients over micro-batches and DP ranks gives
    exactly the gradient of one batch holding all of them. If the DDP wrapper **averages** gradients over DP
    (Megatron's default without ``calculate_per_token_loss``), pass ``dp_grad_average=True``: the normaliser is
    then divided by the DP world size to compensate. Call it with the same micro-batch list on every TP rank of
    a DP replica (their weights are identical). A zero total returns the smallest positive float, so an
    all-masked step gives a zero loss, not NaN.
    """
    if mode not in ("tokens", "weight"):
        raise ValueError(f"mode must be 'tokens' or 'weight', got {mode!r}")
    if not weights:
        raise ValueError("global_normaliser needs at least one micro-batch")
    total = torch.zeros((), dtype=torch.float64, device=weights[0].device)
    for w in weights:
        total = total + ((w != 0).sum() if mode == "tokens" else w.double().sum())
    world = 1 if group is None else dist.get_world_size(group)
    if world > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    if dp_grad_average:
        total = total / world
    return total.clamp_min(torch.finfo(torch.float64).tiny)


# --------------------------------------------------------------------------------------------------------------
# Vocab-parallel, token-chunked logit losses


@dataclass(frozen=True)
class _VocabShard:
    vocab: int  # the true vocabulary size
    start: int  # global id of this rank's first column
    valid: int  # columns of this shard below the true vocabulary size
    group: dist.ProcessGroup | None  # None when there is no communication


def _per_loss_weights(weights: torch.Tensor, lead: tuple, count: int) -> torch.Tensor:
    """Per-token ``weights`` [*lead] shared by every loss, or one row per loss [count, *lead]: as [count, *lead]."""
    if weights.shape == lead:
        return weights.unsqueeze(0).expand(count, *lead)
    if weights.shape != (count, *lead):
        raise ValueError(f"weights {tuple(weights.shape)} must be {tuple(lead)} or {(count, *lead)}")
    return weights


def _vocab_shard(local_vocab: int, vocab_size: int | None, tp_group) -> _VocabShard:
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if world == 1 else dist.get_rank(tp_group)
    if vocab_size is None:
        vocab_size = local_vocab * world
    if not 0 < vocab_size <= local_vocab * world:
        raise ValueError(f"vocab_size {vocab_size} outside (0, {local_vocab * world}] for {world} shards of "
                         f"{local_vocab}")
    start = rank * local_vocab
    valid = max(0, min(local_vocab, vocab_size - start))
    return _VocabShard(vocab_size, start, valid, tp_group if world > 1 else None)


def _global_log_softmax(x: torch.Tensor, shard: _VocabShard) -> torch.Tensor:
    """log-softmax over the whole (sharded) vocabulary of the valid local columns ``x`` [c, valid]."""
    if shard.group is None:
        return torch.log_softmax(x, dim=-1)  # one fused kernel: 2.4x the step-by-step form below on a CPU
    if x.shape[-1]:
        m = x.detach().amax(-1)
    else:
        m = x.new_full(x.shape[:-1], -math.inf)
    if shard.group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=shard.group)
    sum_exp = torch.exp(x - m.unsqueeze(-1)).sum(-1)
    if shard.group is not None:
        sum_exp = dist_nn.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=shard.group)
    return x - (m + torch.log(sum_exp)).unsqueeze(-1)


def _chunk_losses(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None,
                  weights: torch.Tensor, specs: tuple[LogitLoss, ...], shard: _VocabShard) -> torch.Tensor:
    """This shard's part of ``Σ_t w_t ℓ_t`` for each spec, [K], on one token chunk."""
    cdtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    s = student[:, :shard.valid].to(cdtype)
    t = None if teacher is None else teacher[:, :shard.valid].to(cdtype)
    log_q_at: dict[float, torch.Tensor] = {}
    log_p_at: dict[float, torch.Tensor] = {}
    out = []
    for spec, w in zip(specs, weights):
        T = spec.temperature
        if T not in log_q_at:
            log_q_at[T] = _global_log_softmax(s / T if T != 1.0 else s, shard)
        log_q = log_q_at[T]
        if spec.kind == "ce":
            local = labels - shard.start
            here = (local >= 0) & (local < shard.valid)
            if shard.valid:
                picked = log_q.gather(-1, local.clamp(0, shard.valid - 1).unsqueeze(-1)).squeeze(-1)
                per_token = torch.where(here, -picked, torch.zeros_like(picked))
            else:
                per_token = log_q.new_zeros(log_q.shape[:-1])
        else:
            if T not in log_p_at:
                log_p_at[T] = _global_log_softmax(t / T if T != 1.0 else t, shard)
            log_p = log_p_at[T]
            if spec.kind == "forward_kl":
                terms = torch.exp(log_p) * (log_p - log_q)
            elif spec.kind == "reverse_kl":
                terms = torch.exp(log_q) * (log_q - log_p)
            elif spec.kind == "jsd":
                b = spec.beta
                log_m = torch.logaddexp(log_p + math.log(b), log_q + math.log1p(-b))
                terms = b * torch.exp(log_p) * (log_p - log_m) + (1 - b) * torch.exp(log_q) * (log_q - log_m)
            else:  # tvd
                terms = 0.5 * (torch.exp(log_p) - torch.exp(log_q)).abs()
            per_token = terms.sum(-1) * (T * T)
        out.append((w.to(cdtype) * per_token).sum())
    return torch.stack(out)


class _ChunkedLogitLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, weights, specs, shard, chunk_size):
        n = student.shape[0]
        cdtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        total = torch.zeros(len(specs), dtype=cdtype, device=student.device)
        for a in range(0, n, chunk_size):
            b = min(a + chunk_size, n)
            total += _chunk_losses(student[a:b], None if teacher is None else teacher[a:b],
                                   None if labels is None else labels[a:b], weights[:, a:b], specs, shard)
        if shard.group is not None:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=shard.group)
        ctx.save_for_backward(student, teacher, labels, weights)
        ctx.specs, ctx.shard, ctx.chunk_size = specs, shard, chunk_size
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        student, teacher, labels, weights = ctx.saved_tensors
        # Every TP rank holds the same total and backpropagates it: each takes the gradient of its own shard's
        # partial sum; the differentiable Σexp all-reduce inside adds the other shards' dependence on it.
        grad = torch.zeros_like(student)
        closed_form = all(spec.kind in CLOSED_FORM_KINDS for spec in ctx.specs)
        for a in range(0, student.shape[0], ctx.chunk_size):
            b = min(a + ctx.chunk_size, student.shape[0])
            chunk = (None if teacher is None else teacher[a:b], None if labels is None else labels[a:b],
                     weights[:, a:b], ctx.specs, ctx.shard)
            if closed_form:
                grad[a:b, :ctx.shard.valid] = _chunk_grad(student[a:b], *chunk, grad_total)
                continue
            with torch.enable_grad():
                s = student[a:b].detach().requires_grad_(True)
                (grad[a:b],) = torch.autograd.grad(_chunk_losses(s, *chunk), s, grad_total)
        return grad, None, None, None, None, None, None


# kinds whose gradient the backward writes in closed form (one softmax per temperature and one pass, instead of
# re-running the forward under autograd: ~3x fewer passes over a [chunk, vocabulary] block on a CPU)
CLOSED_FORM_KINDS = ("forward_kl", "reverse_kl", "ce")


def _chunk_grad(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None,
                weights: torch.Tensor, specs: tuple[LogitLoss, ...], shard: _VocabShard,
                grad_total: torch.Tensor) -> torch.Tensor:
    """d(Σ_k grad_total_k · :func:`_chunk_losses`_k)/d student on this shard's valid columns, for
    :data:`CLOSED_FORM_KINDS`: with q = softmax(s/T) and p = softmax(t/T) over the whole vocabulary,
    d(T²·KL(p‖q))/ds = T·(q − p), d(T²·KL(q‖p))/ds = T·q·(log q − log p − Σ q (log q − log p)) (the sum over every
    shard) and d CE/ds = softmax(s) − onehot(label) for tokens with a label (−100: none)."""
    cdtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    s = student[:, :shard.valid].to(cdtype)
    t = None if teacher is None else teacher[:, :shard.valid].to(cdtype)
    log_q_at: dict[float, torch.Tensor] = {}
    log_p_at: dict[float, torch.Tensor] = {}
    q_at: dict[float, torch.Tensor] = {}
    p_at: dict[float, torch.Tensor] = {}

    def cached(cache, T, x, log):
        if T not in cache:
            scaled = x / T if T != 1.0 else x
            cache[T] = _global_log_softmax(scaled, shard) if log else _global_softmax(scaled, shard)
        return cache[T]

    grad = torch.zeros_like(s)
    for spec, w, g in zip(specs, weights, grad_total):
        T = spec.temperature
        coef = (g.to(cdtype) * w.to(cdtype)).unsqueeze(-1)  # [c, 1]
        if spec.kind == "ce":
            grad.addcmul_(cached(q_at, T, s, False), torch.where(labels.unsqueeze(-1) >= 0, coef, 0.0))
            local = labels - shard.start
            here = (local >= 0) & (local < shard.valid)
            if shard.valid:  # a shard of padding only holds no label
                grad.scatter_add_(-1, local.clamp(0, shard.valid - 1).unsqueeze(-1),
                                  -torch.where(here.unsqueeze(-1), coef, 0.0))
        elif spec.kind == "forward_kl":
            grad.addcmul_(cached(q_at, T, s, False), coef * T).addcmul_(cached(p_at, T, t, False), coef * -T)
        else:  # reverse_kl
            log_q, log_p = cached(log_q_at, T, s, True), cached(log_p_at, T, t, True)
            q = log_q.exp()
            log_ratio = log_q - log_p
            divergence = (q * log_ratio).sum(-1, keepdim=True)
            if shard.group is not None:
                dist.all_reduce(divergence, op=dist.ReduceOp.SUM, group=shard.group)
            grad.addcmul_(q, (log_ratio - divergence) * (coef * T))
    return grad.to(student.dtype)


def _global_softmax(x: torch.Tensor, shard: _VocabShard) -> torch.Tensor:
    """softmax over the whole (sharded) vocabulary of the valid local columns ``x`` [c, valid]."""
    return torch.softmax(x, dim=-1) if shard.group is None else _global_log_softmax(x, shard).exp()


FUSED_KINDS = ("forward_kl", "reverse_kl", "ce")
LOGIT_LOSS_BACKENDS = ("auto", "fused", "torch")


def fused_unsupported(specs: Sequence[LogitLoss], dtype: torch.dtype,
                      kinds: Sequence[str] = FUSED_KINDS) -> str | None:
    """Why the fused kernels (``ops.logit_kernels``) cannot compute ``specs`` on logits of ``dtype``; None if they
    can: ``kinds`` (dense teacher: forward/reverse KL and CE; stored teacher: every kind) with the
    teacher kinds at one temperature, on bf16/fp16/fp32 logits (float64 stays on the torch path)."""
    other = sorted({spec.kind for spec in specs} - set(kinds))
    if other:
        return f"the fused logit losses compute {tuple(kinds)}, not {other}"
    temperatures = {spec.temperature for spec in specs if spec.kind != "ce"}
    if len(temperatures) > 1:
        return f"the fused logit losses take the teacher kinds at one temperature, got {sorted(temperatures)}"
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"the fused logit losses take bf16/fp16/fp32 logits, got {dtype}"
    return None


def _merged_partials(local_max: torch.Tensor, sums: Sequence[tuple[torch.Tensor, int]],
                     shard: _VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Streaming partials of the TP shards merged over the group: per row the global maxima [n, j] of the shards'
    running maxima ``local_max`` [n, j] (0 where all are −inf) and the global sums [n, len(sums)] of ``sums``, each
    (a shard's [n] sum, the column of ``local_max`` it is relative to), rescaled to those maxima."""
    top = local_max.clone()
    if shard.group is not None:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=shard.group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # no column: −inf everywhere, sums stay 0
    scale = torch.exp(local_max - top)
    merged = torch.stack([partial * scale[:, j] for partial, j in sums], 1)
    if shard.group is not None:
        dist.all_reduce(merged, op=dist.ReduceOp.SUM, group=shard.group)
    return top, merged


def _merged_row_stats(stats: torch.Tensor, shard: _VocabShard) -> tuple[torch.Tensor, ...]:
    """The shards' streaming partials [n, 6] (``logit_kernels.row_stats``) merged over the TP group: per row the
    student's and the teacher's global log-sum-exp, Σ p·(t − s)/T and Σ q·(s − t)/T, float32 [n] each."""
    # m_s, m_t: a slice (a list index would copy an index tensor to the device)
    top, sums = _merged_partials(stats[:, 0:3:2], [(stats[:, 1], 0), (stats[:, 3], 1), (stats[:, 4], 1),
                                                   (stats[:, 5], 0)], shard)
    return (top[:, 0] + torch.log(sums[:, 0]), top[:, 1] + torch.log(sums[:, 1]), sums[:, 2] / sums[:, 1],
            sums[:, 3] / sums[:, 0])


def _fused_ce(student: torch.Tensor, labels: torch.Tensor | None, lse: torch.Tensor, temperature: float,
              shard: _VocabShard) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """CE at the labels [n] (−100: none) for the fused paths, given the student's global log-sum-exp ``lse`` at
    ``temperature``: (per-row −log q[label] or None without labels, log Z at T = 1 (``lse`` when T is 1, else a
    student-only ``row_stats`` pass), each row's local label column, −1 when not on this shard)."""
    from . import logit_kernels

    local = torch.full_like(lse, -1, dtype=torch.int64)
    if labels is None:
        return None, lse, local
    lse1 = lse
    if temperature != 1.0:
        lse1 = _merged_row_stats(logit_kernels.row_stats(student, None, shard.valid, 1.0), shard)[0]
    scored = labels != IGNORE_INDEX
    here = scored & (labels >= shard.start) & (labels < shard.start + shard.valid)
    local = torch.where(here, labels - shard.start, local)
    picked = student.gather(1, local.clamp_min(0).unsqueeze(1)).squeeze(1).float() * here
    if shard.group is not None:
        dist.all_reduce(picked, op=dist.ReduceOp.SUM, group=shard.group)
    return torch.where(scored, lse1 - picked, torch.zeros_like(picked)), lse1, local


class _FusedLogitLosses(torch.autograd.Function):
    """forward_kl and reverse_kl (one temperature) and ce through the Triton kernels: per-row statistics in one read of
    both logits, per-row losses on [n] vectors, and a one-pass gradient from the saved log-sum-exps. Each TP rank holds
    the full total (the row statistics are global) and its backward writes its own shard's exact gradient, with
    no communication."""

    @staticmethod
    def forward(ctx, student, teacher, labels, weights, specs, shard):
        from . import logit_kernels

        kl_temperature = next((spec.temperature for spec in specs if spec.kind != "ce"), None)
        temperature = 1.0 if kl_temperature is None else kl_temperature
        stats = logit_kernels.row_stats(student, None if kl_temperature is None else teacher, shard.valid, temperature)
        lse_s, lse_t, cross_p, cross_q = _merged_row_stats(stats, shard)
        per_kind = {"forward_kl": (cross_p - lse_t + lse_s) * (temperature * temperature),
                    "reverse_kl": (cross_q - lse_s + lse_t) * (temperature * temperature)}
        per_kind["ce"], lse_s1, local = _fused_ce(student, labels, lse_s, temperature, shard)
        total = torch.stack([(w * per_kind[spec.kind]).sum() for spec, w in zip(specs, weights)])
        zeros = torch.zeros_like(lse_s)
        rows = torch.stack([lse_s, lse_t, lse_s1, zeros, zeros, zeros, cross_q], 1)  # coefficients: backward
        ctx.save_for_backward(student, teacher, labels, local, weights, rows)
        ctx.specs, ctx.shard, ctx.temperature = specs, shard, temperature
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        from . import logit_kernels

        student, teacher, labels, local, weights, rows = ctx.saved_tensors
        kl, rkl, ce = ([k for k, spec in enumerate(ctx.specs) if spec.kind == kind]
                       for kind in ("forward_kl", "reverse_kl", "ce"))
        coefficient = grad_total.to(weights.dtype).unsqueeze(1) * weights  # [K, n]
        if kl:  # d(T²·KL(P‖Q))/ds = T·(q − p)
            rows[:, 3] = sum(coefficient[k] for k in kl) * ctx.temperature
        if rkl:  # d(T²·KL(Q‖P))/ds = T·q·(s/T − t/T − Σ q (s − t)/T)
            rows[:, 4] = sum(coefficient[k] for k in rkl) * ctx.temperature
        if ce:
            rows[:, 5] = sum(coefficient[k] for k in ce) * (labels != IGNORE_INDEX)
        grad = logit_kernels.logits_grad(student, teacher, rows, local, ctx.shard.valid, ctx.temperature,
                                         has_kl=bool(kl), has_rkl=bool(rkl), has_ce=bool(ce))
        return grad, None, None, None, None, None


def _checked_labels(labels: torch.Tensor | None, specs: Sequence[LogitLoss], lead: tuple,
                    shard: _VocabShard, check_ids: bool = True) -> torch.Tensor | None:
    """``labels`` flattened when a spec is ``ce`` (checked: the logits' leading shape and, unless the caller checked
    them on the host (``check_ids`` False: the device check is a host sync), −100 or a vocabulary id), else None."""
    if not any(s.kind == "ce" for s in specs):
        return None
    if labels is None or labels.shape != lead:
        raise ValueError(f"ce needs labels of shape {tuple(lead)}")
    if check_ids and bool(((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= shard.vocab))).any()):
        raise ValueError(f"labels must be −100 or ids in [0, {shard.vocab})")
    return labels.reshape(-1)


def logit_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, losses: Sequence[LogitLoss],
                 weights: torch.Tensor, *, labels: torch.Tensor | None = None, vocab_size: int | None = None,
                 tp_group: dist.ProcessGroup | None = None, chunk_size: int = 512,
                 backend: str = "auto", check_labels: bool = True) -> torch.Tensor:
    """``Σ_t w_t · ℓ_t`` for each of ``losses`` in one chunked pass over vocab-parallel logits; returns [K].

    ``student_logits``/``teacher_logits``: ``[..., V_local]`` (the same shape; the teacher is never
    differentiated and may be None when every component is ``ce``). ``weights``: the logits' leading shape, or
    ``[K, *leading]`` for a separate weight per component (e.g. different KD and CE masks). ``labels``: the
    leading shape, needed for ``ce`` (ids below ``vocab_size``, or −100). ``vocab_size``: the true vocabulary
    size (None: no padding). ``tp_group``: the tensor-parallel group over which the vocabulary is split (None:
    unsplit). See the module docstring for kinds, T², sharding and memory.

    ``backend``: ``torch`` (the chunked reference above), ``fused`` (the Triton kernels of ``ops.logit_kernels``:
    forward and reverse KL at one temperature and CE, bf16/fp16/fp32; they need a GPU, or ``TRITON_INTERPRET=1``
    on the CPU; no float32 copy of the logits at all, so ``chunk_size`` does not apply) or ``auto`` (fused on CUDA
    when the kinds and dtype allow it, torch otherwise).

    ``check_labels``: refuse labels outside [0, ``vocab_size``) other than −100 (a host read of a CUDA tensor);
    False when the caller has checked them on the host already (the trainer, as it builds each micro-batch).
    """
    specs = tuple(losses)
    if not specs:
        raise ValueError("logit_losses needs at least one LogitLoss")
    if backend not in LOGIT_LOSS_BACKENDS:
        raise ValueError(f"logit loss backend {backend!r}: choose one of {LOGIT_LOSS_BACKENDS}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead = student_logits.shape[:-1]
    local_vocab = student_logits.shape[-1]
    if teacher_logits is None:
        if any(s.kind != "ce" for s in specs):
            raise ValueError("teacher_logits is required for every loss but ce")
    elif teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} != student {tuple(student_logits.shape)}")
    weights = _per_loss_weights(weights, lead, len(specs))
    shard = _vocab_shard(local_vocab, vocab_size, tp_group)
    labels = _checked_labels(labels, specs, lead, shard, check_labels)
    unsupported = fused_unsupported(specs, student_logits.dtype)
    if backend == "fused" and unsupported:
        raise ValueError(unsupported)
    if backend == "fused" or (backend == "auto" and student_logits.is_cuda and not unsupported):
        student = student_logits.reshape(-1, local_vocab)
        teacher = None if teacher_logits is None else teacher_logits.detach().reshape(-1, local_vocab)
        return _FusedLogitLosses.apply(
            student if student.stride(-1) == 1 else student.contiguous(),
            teacher if teacher is None or teacher.stride(-1) == 1 else teacher.contiguous(),
            labels, weights.detach().reshape(len(specs), -1).float(), specs, shard)
    return _ChunkedLogitLosses.apply(
        student_logits.reshape(-1, local_vocab),
        None if teacher_logits is None else teacher_logits.detach().reshape(-1, local_vocab),
        labels, weights.detach().reshape(len(specs), -1), specs, shard, chunk_size)


def logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, kind: str, weights: torch.Tensor,
               *, temperature: float = 1.0, beta: float = 0.5, labels: torch.Tensor | None = None,
               vocab_size: int | None = None, tp_group: dist.ProcessGroup | None = None,
               chunk_size: int = 512) -> torch.Tensor:
    """One component of :func:`logit_losses`: the scalar ``Σ_t w_t · ℓ_t``."""
    return logit_losses(student_logits, teacher_logits, [LogitLoss(kind, temperature, beta)], weights,
                        labels=labels, vocab_size=vocab_size, tp_group=tp_group, chunk_size=chunk_size)[0]


# --------------------------------------------------------------------------------------------------------------
# Hidden-state and attention alignment


def _alignment_per_token(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    if kind not in ALIGNMENT_KINDS:
        raise ValueError(f"unknown alignment loss {kind!r}; expected one of {ALIGNMENT_KINDS}")
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    cdtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    s, t = student.to(cdtype), teacher.detach().to(cdtype)
    if kind == "mse":
        return (s - t).pow(2).mean(-1)
    return 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)


def hidden_state_loss(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: torch.Tensor,
                      kind: str = "cosine") -> torch.Tensor:
    """Residual-stream alignment over a layer map, averaged over the pairs: ``(1/L) Σ_pairs Σ_t w_t ℓ_t``.

    ``pairs``: ``(student_hidden, teacher_hidden)``, each ``[..., H]`` (full hidden width; project the student
    first if widths differ). ``weights``: the leading shape (a token mask, or float weights). ``kind``:
    ``cosine`` (ℓ = 1 − cos(s, t)) or ``mse`` (ℓ = mean over H of (s − t)², so a token-count normaliser gives
    DistillKit's squared error / (tokens × hidden)). The teacher side is detached.
    """
    if not pairs:
        raise ValueError("hidden_state_loss needs at least one (student, teacher) pair")
    total = 0.0
    for student, teacher in pairs:
        if weights.shape != student.shape[:-1]:
            raise ValueError(f"weights {tuple(weights.shape)} do not match hidden {tuple(student.shape)}")
        per_token = _alignment_per_token(student, teacher, kind)
        total = total + (weights.to(per_token.dtype) * per_token).sum()
    return total / len(pairs)


def attention_alignment_loss(student_attention: Callable[[torch.Tensor], torch.Tensor], layer_input: torch.Tensor,
                             teacher_output: torch.Tensor, weights: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """RADLADS-style teacher-forced attention alignment for one layer: ``Σ_t w_t ℓ_t`` between
    ``student_attention(layer_input)`` and ``teacher_output``.

    ``layer_input`` is the teacher's input to this layer's attention (after its input norm) and
    ``teacher_output`` the teacher attention's output on it; both are detached, so only the student attention
    module receives gradients (no error flows between layers and all layers train at once). ``kind``: ``mse``
    (RADLADS) or ``cosine``, per token as in :func:`hidden_state_loss`.
    """
    student_output = student_attention(layer_input.detach())
    if weights.shape != student_output.shape[:-1]:
        raise ValueError(f"weights {tuple(weights.shape)} do not match output {tuple(student_output.shape)}")
    per_token = _alignment_per_token(student_output, teacher_output, kind)
    return (weights.to(per_token.dtype) * per_token).sum()


# --------------------------------------------------------------------------------------------------------------
# NaN / Inf guard


class NonFiniteLossError(FloatingPointError):
    """A loss component is NaN or ±Inf; ``component``, ``step`` and ``value`` say which, when and what."""

    def __init__(self, component: str, step: int, value: float):
        super().__init__(f"loss component {component!r} is {value} at step {step}")
        self.component, self.step, self.value = component, step, value


def check_finite(losses: Mapping[str, torch.Tensor], step: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the first non-finite component of ``losses`` (scalars)."""
    if not losses:
        return
    values = torch.stack([v.detach().reshape(()).double() for v in losses.values()]).cpu()
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    i = int((~finite).nonzero()[0])
    raise NonFiniteLossError(list(losses)[i], step, float(values[i]))


# --------------------------------------------------------------------------------------------------------------
# Vocab-parallel top-k (offline teacher capture) and sparse losses on a top-k + tail partition


@torch.no_grad()
def vocab_parallel_topk(logits: torch.Tensor, k: int, *, vocab_size: int | None = None,
                        tp_group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global top-k of ``log_softmax(logits)`` over vocab-parallel logits [n, V_local], without gathering the
    vocabulary: each rank's local top-k (k values and global ids, [n, k]) is all-gathered and reduced to k.
    Returns (ids int64 [n, k], log-probabilities float32 [n, k], both by descending probability, and the log tail
    mass ``log Σ_{other ids} p`` [n], a log-sum-exp over the other ids (−inf when k covers the vocabulary)),
    identical on every TP rank."""
    shard = _vocab_shard(logits.shape[-1], vocab_size, tp_group)
    if not 1 <= k <= shard.vocab:
        raise ValueError(f"top-k {k} outside [1, vocabulary {shard.vocab}]")
    log_p = _global_log_softmax(logits[:, :shard.valid].float(), shard)
    n = log_p.shape[0]
    local = min(k, shard.valid)
    values = log_p.new_full((n, k), -math.inf)
    ids = torch.full((n, k), shard.vocab, dtype=torch.int64, device=log_p.device)
    if local:
        values[:, :local], ids[:, :local] = log_p.topk(local, dim=-1)
        ids[:, :local] += shard.start
    if shard.group is not None:
        world = dist.get_world_size(shard.group)
        all_values = [torch.empty_like(values) for _ in range(world)]
        all_ids = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(all_values, values, group=shard.group)
        dist.all_gather(all_ids, ids, group=shard.group)
        values, pick = torch.cat(all_values, -1).topk(k, dim=-1)
        ids = torch.cat(all_ids, -1).gather(-1, pick)
    mine = (ids >= shard.start) & (ids < shard.start + shard.valid)
    rest = log_p.clone()
    if shard.valid:
        rows = torch.arange(n, device=log_p.device).unsqueeze(-1).expand(n, k)
        rest[rows[mine], (ids - shard.start)[mine]] = -math.inf
    m = values[:, :1].squeeze(-1)  # the global maximum log-probability: a safe shift for every shard
    tail = torch.exp(rest - m.unsqueeze(-1)).sum(-1)
    if shard.group is not None:
        dist.all_reduce(tail, op=dist.ReduceOp.SUM, group=shard.group)
    return ids, values, torch.log(tail) + m


SPARSE_KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd")


def _sparse_partition_terms(picked: torch.Tensor, log_tail_q: torch.Tensor | None, teacher: torch.Tensor,
                            teacher_tail: torch.Tensor, valid: torch.Tensor, rest_ids: torch.Tensor,
                            spec: LogitLoss) -> torch.Tensor:
    """Per-token ``T²·ℓ`` [n] of ``spec`` on the top-k + tail partition from the student's log-probabilities at
    temperature T at the stored ids ``picked`` [n, k] (−inf at padding slots) and of its tail ``log_tail_q`` [n]
    (None: no row has a tail bucket), the teacher's temperature-1 log-probabilities ``teacher`` [n, k] and log tail
    ``teacher_tail`` [n], the stored slots ``valid`` [n, k] and the count of the other ids ``rest_ids`` [n]."""
    T = spec.temperature
    # The teacher's tempered partition: its tail mass is taken as spread evenly over the other ids (the
    # reconstruction the capture documents), so p_tail(T) = n·(p_tail/n)^(1/T) before normalising.
    log_p = (teacher / T).masked_fill(~valid, -math.inf)
    log_q_parts = picked
    if log_tail_q is not None:
        log_n = torch.log(rest_ids.clamp_min(1).to(teacher.dtype))
        tempered_tail = torch.where(rest_ids > 0, (teacher_tail - log_n) / T + log_n, -math.inf)
        log_p = torch.cat([log_p, tempered_tail.unsqueeze(-1)], -1)
        log_q_parts = torch.cat([picked, log_tail_q.unsqueeze(-1)], -1)
    log_p = log_p - torch.logsumexp(log_p, -1, keepdim=True)
    p_mask, q_mask = torch.isfinite(log_p), torch.isfinite(log_q_parts)
    lp = torch.where(p_mask, log_p, torch.zeros_like(log_p))
    lq = torch.where(q_mask, log_q_parts, torch.zeros_like(log_q_parts))
    p, q = torch.exp(lp) * p_mask, torch.exp(lq) * q_mask
    zero = torch.zeros_like(p)
    if spec.kind == "forward_kl":
        terms = torch.where(p_mask, p * (lp - lq), zero)
    elif spec.kind == "reverse_kl":
        terms = torch.where(q_mask, q * (lq - lp), zero)
    elif spec.kind == "jsd":
        b = spec.beta
        m = b * p + (1 - b) * q
        lm = torch.log(torch.where(m > 0, m, torch.ones_like(m)))
        terms = b * torch.where(p_mask, p * (lp - lm), zero) + (1 - b) * torch.where(q_mask, q * (lq - lm), zero)
    else:  # tvd
        terms = 0.5 * (p - q).abs()
    return terms.sum(-1) * (T * T)


def _sparse_chunk_losses(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, log_tail: torch.Tensor,
                         weights: torch.Tensor, specs: tuple[LogitLoss, ...], shard: _VocabShard) -> torch.Tensor:
    """This rank's share (1/TP of the replicated value) of ``Σ_t w_t ℓ_t`` on the top-k + tail partition, [K]."""
    cdtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    world = 1 if shard.group is None else dist.get_world_size(shard.group)
    s = student[:, :shard.valid].to(cdtype)
    n, k = ids.shape
    valid = ids >= 0  # id −1: a padding slot of a row that stores fewer ids
    rest_ids = shard.vocab - valid.sum(-1)  # ids outside each row's stored ones; none: no tail bucket
    local = ids - shard.start
    here = valid & (local >= 0) & (local < shard.valid)
    local = local.clamp(0, max(shard.valid - 1, 0))
    stored = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    rows = torch.arange(n, device=s.device).unsqueeze(-1).expand(n, k)
    stored[rows[here], local[here]] = True  # not a scatter of `here`: clamped foreign ids would collide
    teacher = logprobs.to(cdtype)
    teacher_tail = log_tail.to(cdtype)
    out = []
    for spec, w in zip(specs, weights):
        T = spec.temperature
        log_q = _global_log_softmax(s / T if T != 1.0 else s, shard)
        picked = (log_q.gather(-1, local) if shard.valid else log_q.new_zeros(n, k)).masked_fill(~here, 0.0)
        if shard.group is not None:
            picked = dist_nn.all_reduce(picked, op=dist.ReduceOp.SUM, group=shard.group)
        picked = picked.masked_fill(~valid, -math.inf)
        log_tail_q = None
        if bool((rest_ids > 0).any()):
            tail_q = torch.exp(log_q).masked_fill(stored, 0.0).sum(-1)
            if shard.group is not None:
                tail_q = dist_nn.all_reduce(tail_q, op=dist.ReduceOp.SUM, group=shard.group)
            positive = tail_q > 0
            log_tail_q = torch.where(positive, torch.log(torch.where(positive, tail_q, torch.ones_like(tail_q))),
                                     torch.full_like(tail_q, -math.inf))
        per_token = _sparse_partition_terms(picked, log_tail_q, teacher, teacher_tail, valid, rest_ids, spec)
        out.append((w.to(cdtype) * per_token).sum() / world)
    return torch.stack(out)


class _ChunkedSparseLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, ids, logprobs, log_tail, weights, specs, shard, chunk_size):
        cdtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        total = torch.zeros(len(specs), dtype=cdtype, device=student.device)
        for a in range(0, student.shape[0], chunk_size):
            b = min(a + chunk_size, student.shape[0])
            total += _sparse_chunk_losses(student[a:b], ids[a:b], logprobs[a:b], log_tail[a:b], weights[:, a:b],
                                          specs, shard)
        if shard.group is not None:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=shard.group)
        ctx.save_for_backward(student, ids, logprobs, log_tail, weights)
        ctx.specs, ctx.shard, ctx.chunk_size = specs, shard, chunk_size
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        student, ids, logprobs, log_tail, weights = ctx.saved_tensors
        # As _ChunkedLogitLosses: each rank differentiates its share; the differentiable all-reduces (Σexp, the
        # gathered log q at the stored ids, the student's tail) carry the other ranks' dependence on this shard.
        grad = torch.zeros_like(student)
        for a in range(0, student.shape[0], ctx.chunk_size):
            b = min(a + ctx.chunk_size, student.shape[0])
            with torch.enable_grad():
                s = student[a:b].detach().requires_grad_(True)
                partial = _sparse_chunk_losses(s, ids[a:b], logprobs[a:b], log_tail[a:b], weights[:, a:b],
                                               ctx.specs, ctx.shard)
                (grad[a:b],) = torch.autograd.grad(partial, s, grad_total)
        return grad, None, None, None, None, None, None, None


class _FusedSparseLosses(torch.autograd.Function):
    """The sparse losses (one temperature) and ce through the Triton kernels: one read of the student logits per row
    for its log-sum-exp over the vocabulary and over the ids not stored (the tail bucket, summed directly), the
    partition losses of :func:`_sparse_partition_terms` on [n, k + 1] tensors, and a one-pass gradient. Each TP rank
    holds the full total (the row statistics are merged as in :class:`_FusedLogitLosses`, the stored ids' logits
    summed from the ranks that own them) and its backward writes its own shard's exact gradient, with no
    communication."""

    @staticmethod
    def forward(ctx, student, ids, logprobs, log_tail, labels, weights, specs, shard):
        from . import logit_kernels

        temperature = next(spec.temperature for spec in specs if spec.kind != "ce")
        valid = ids >= 0  # id −1: a padding slot of a row that stores fewer ids
        local = ids - shard.start
        here = valid & (local >= 0) & (local < shard.valid)
        sorted_cols, order, bounds = logit_kernels.stored_columns(local, here, student.shape[1])
        stats = logit_kernels.sparse_row_stats(student, sorted_cols, bounds, shard.valid, temperature)
        top, sums = _merged_partials(stats[:, 0:3:2], [(stats[:, 1], 0), (stats[:, 3], 1)], shard)
        log_z = torch.log(sums)  # over all columns and over the rest (−inf: no rest id)
        at_ids = student.gather(1, local.clamp(0, max(shard.valid - 1, 0))).float().masked_fill(~here, 0.0)
        if shard.group is not None:
            dist.all_reduce(at_ids, op=dist.ReduceOp.SUM, group=shard.group)
        # x − max − log Σexp as a log-softmax takes it: the max's magnitude does not enter the rounding
        picked = (at_ids * (1.0 / temperature) - top[:, :1] - log_z[:, :1]).masked_fill(~valid, -math.inf)
        log_tail_q = (top[:, 1] - top[:, 0]) + (log_z[:, 1] - log_z[:, 0])
        lse = top[:, 0] + log_z[:, 0]
        rest_ids = shard.vocab - valid.sum(-1)
        ce, lse1, label_cols = _fused_ce(student, labels, lse, temperature, shard)
        total = torch.stack([(w * (ce if spec.kind == "ce" else _sparse_partition_terms(
            picked, log_tail_q, logprobs, log_tail, valid, rest_ids, spec))).sum() for spec, w in zip(specs, weights)])
        ctx.save_for_backward(student, logprobs, log_tail, labels, label_cols, weights, valid, rest_ids, picked,
                              log_tail_q, top, log_z, lse1, sorted_cols, order, bounds)
        ctx.specs, ctx.shard, ctx.temperature = specs, shard, temperature
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        from . import logit_kernels

        (student, logprobs, log_tail, labels, label_cols, weights, valid, rest_ids, picked, log_tail_q, top, log_z,
         lse1, sorted_cols, order, bounds) = ctx.saved_tensors
        T = ctx.temperature
        coefficient = grad_total.to(weights.dtype).unsqueeze(1) * weights  # [K, n]
        # The partition's own gradient, on [n, k + 1] in float64 (the tail's coefficient below cancels, by ~10³ for
        # reverse KL at T < 1 over a large vocabulary, which float32 gradients would carry into every rest column),
        # one component at a time (one graph of [n, k + 1] temporaries alive)
        picked_leaf = picked.double().requires_grad_(True)
        tail_leaf = log_tail_q.double().requires_grad_(True)
        teacher, teacher_tail = logprobs.double(), log_tail.double()
        grad_picked, grad_tail = torch.zeros_like(picked_leaf), torch.zeros_like(tail_leaf)
        for k, spec in enumerate(ctx.specs):
            if spec.kind != "ce":
                with torch.enable_grad():
                    partial = (coefficient[k].double() * _sparse_partition_terms(
                        picked_leaf, tail_leaf, teacher, teacher_tail, valid, rest_ids, spec)).sum()
                    grads = torch.autograd.grad(partial, (picked_leaf, tail_leaf))
                grad_picked += grads[0]
                grad_tail += grads[1]
        # picked = x[id] − log Z and log_tail_q = log Σ_rest exp(x) − log Z with x = s/T, so ∂/∂s_j is (1/T)·(the
        # picked gradient of j's slots + c·q_j, + grad_tail·q_j/q_tail on the rest), c = −(Σ grad_picked + grad_tail):
        # c_q = c/T on the stored columns, c_rest = (c·q_tail + grad_tail)/T on the rest
        c = -(grad_picked.sum(-1) + grad_tail)
        c_rest = (c * torch.exp(tail_leaf.detach()) + grad_tail) / T
        has_rest = torch.isfinite(log_z[:, 1])
        zeros = torch.zeros_like(lse1)
        ce = [k for k, spec in enumerate(ctx.specs) if spec.kind == "ce"]
        c_ce = sum(coefficient[k] for k in ce) * (labels != IGNORE_INDEX) if ce else zeros
        rows = torch.stack([top[:, 0], log_z[:, 0], top[:, 1], torch.where(has_rest, log_z[:, 1], zeros),
                            (c / T).float(), c_rest.float(), lse1, c_ce], 1)
        slot_grad = (grad_picked / T).float().gather(1, order)  # in the order of the sorted columns
        grad = logit_kernels.sparse_logits_grad(student, sorted_cols, slot_grad, bounds, rows, label_cols,
                                                ctx.shard.valid, T, has_ce=bool(ce))
        return grad, None, None, None, None, None, None, None


def sparse_logit_losses(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                        teacher_log_tail: torch.Tensor, losses: Sequence[LogitLoss], weights: torch.Tensor, *,
                        labels: torch.Tensor | None = None, vocab_size: int | None = None,
                        tp_group: dist.ProcessGroup | None = None, chunk_size: int = 512,
                        backend: str = "auto", check_labels: bool = True) -> torch.Tensor:
    """``Σ_t w_t · ℓ_t`` for each of ``losses`` against a stored (offline) teacher; returns [K].

    The teacher is its top-k ``teacher_ids`` [..., k] (global ids, distinct, below ``vocab_size``; −1 marks a
    padding slot of a row that stores fewer, whose log-probability is −inf) with their
    temperature-1 log-probabilities ``teacher_logprobs`` [..., k] and the log tail mass ``teacher_log_tail``
    [...] (−inf when k is the whole vocabulary). Both models are compared on the partition {each stored id} ∪
    {tail}: the student's tail is 1 − Σ of its probabilities on the stored ids (summed directly over the other
    ids, not subtracted). ``forward_kl``, ``reverse_kl``, ``jsd`` and ``tvd`` are those of the two (k+1)-bucket
    distributions (lower bounds of the full-vocabulary ones; equal when k covers the vocabulary). Temperature T:
    the student's softmax(z/T) is exact; the teacher's top-k scale as p^(1/T) and its tail is taken as spread
    evenly over the other ids, both renormalised. T² scaling, weights, vocab-parallel student logits (stored
    ids are routed to the shard that owns them; only [n, k] values cross ranks), chunking and the gradient
    convention are those of :func:`logit_losses`. ``ce`` needs no teacher: it is that of :func:`logit_losses` on
    the student logits at ``labels`` (the leading shape, ids or −100), computed here so that the fused path reads
    the logits once for all components.

    ``backend``: ``torch`` (the chunked reference above, ``ce`` through :func:`logit_losses`), ``fused`` (the Triton
    kernels of ``ops.logit_kernels``: the four kinds at one temperature and ``ce``, bf16/fp16/fp32; one streaming
    pass over the student logits for its log-sum-exp over the vocabulary and over the ids not stored, the
    partition losses on [tokens, k + 1] values, the gradient written in one pass; no float32 copy of the logits,
    so ``chunk_size`` does not apply) or ``auto`` (fused on CUDA when the kinds and dtype allow it, torch
    otherwise), and ``check_labels``, as for :func:`logit_losses`.
    """
    specs = tuple(losses)
    if not specs:
        raise ValueError("sparse_logit_losses needs at least one LogitLoss")
    if backend not in LOGIT_LOSS_BACKENDS:
        raise ValueError(f"logit loss backend {backend!r}: choose one of {LOGIT_LOSS_BACKENDS}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if all(spec.kind == "ce" for spec in specs):  # nothing of the teacher's
        return logit_losses(student_logits, None, specs, weights, labels=labels, vocab_size=vocab_size,
                            tp_group=tp_group, chunk_size=chunk_size, backend=backend, check_labels=check_labels)
    lead, local_vocab = student_logits.shape[:-1], student_logits.shape[-1]
    k = teacher_ids.shape[-1]
    if teacher_ids.shape != (*lead, k) or teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(f"teacher ids {tuple(teacher_ids.shape)} and log-probs {tuple(teacher_logprobs.shape)} "
                         f"must be {(*lead, k)} for student logits {tuple(student_logits.shape)}")
    if teacher_log_tail.shape != lead:
        raise ValueError(f"teacher tail {tuple(teacher_log_tail.shape)} must be {tuple(lead)}")
    weights = _per_loss_weights(weights, lead, len(specs))
    shard = _vocab_shard(local_vocab, vocab_size, tp_group)
    if k > shard.vocab or bool(((teacher_ids < -1) | (teacher_ids >= shard.vocab)).any()):
        raise ValueError(f"teacher ids must be {k} ≤ {shard.vocab} distinct ids in [0, {shard.vocab}) or -1 "
                         "(padding)")
    flat_labels = _checked_labels(labels, specs, lead, shard, check_labels)
    unsupported = fused_unsupported(specs, student_logits.dtype, LOGIT_LOSS_KINDS)
    if backend == "fused" and unsupported:
        raise ValueError(unsupported)
    if backend == "fused" or (backend == "auto" and student_logits.is_cuda and not unsupported):
        student = student_logits.reshape(-1, local_vocab)
        return _FusedSparseLosses.apply(
            student if student.stride(-1) == 1 else student.contiguous(), teacher_ids.reshape(-1, k),
            teacher_logprobs.detach().reshape(-1, k).float(), teacher_log_tail.detach().reshape(-1).float(),
            flat_labels, weights.detach().reshape(len(specs), -1).float(), specs, shard)
    sums = [None] * len(specs)
    ce = [i for i, spec in enumerate(specs) if spec.kind == "ce"]
    taught = [i for i, spec in enumerate(specs) if spec.kind != "ce"]
    if ce:  # alone, ce may still be fused (auto on CUDA)
        values = logit_losses(student_logits, None, [specs[i] for i in ce], torch.stack([weights[i] for i in ce]),
                              labels=labels, vocab_size=vocab_size, tp_group=tp_group, chunk_size=chunk_size,
                              backend=backend, check_labels=check_labels)
        for i, value in zip(ce, values):
            sums[i] = value
    values = _ChunkedSparseLosses.apply(
        student_logits.reshape(-1, local_vocab), teacher_ids.reshape(-1, k), teacher_logprobs.detach().reshape(-1, k),
        teacher_log_tail.detach().reshape(-1),
        torch.stack([weights[i] for i in taught]).detach().reshape(len(taught), -1),
        tuple(specs[i] for i in taught), shard, chunk_size)
    for i, value in zip(taught, values):
        sums[i] = value
    return torch.stack(sums)
