"""Fused Triton kernels for the dense logit losses of :func:`megatron_student.ops.losses.logit_losses`: forward and
reverse KL at one temperature T and CE at the label, reading the bf16 (or fp16/fp32) student and teacher logits once
per pass with a streaming log-sum-exp over the vocabulary, and never creating a float32 [tokens, vocabulary] tensor.

Forward (one program per row): over this shard's valid columns, with x = s/T and y = t/T,
``m_s = max x``, ``z_s = Σ exp(x − m_s)``, ``m_t = max y``, ``z_t = Σ exp(y − m_t)``,
``a = Σ exp(y − m_t)·(y − x)`` and ``b = Σ exp(x − m_s)·(x − y)``, each block rescaled to the running maximum. The
caller merges the shards' partials (max, then rescaled sums, over the TP group) and gets per row
``log Z_s = m_s + log z_s``, ``log Z_t``, ``KL(P‖Q) = a/z_t − log Z_t + log Z_s`` (Σ p (y − x) = a/z_t) and
``KL(Q‖P) = b/z_s − log Z_s + log Z_t``. CE at T = 1 takes ``log Z_s`` at T = 1 (the same statistics when the KL
temperature is 1, otherwise a student-only pass) minus the logit at the label.

Backward (one program per row, writes the gradient of the shard in the logits' dtype, padding columns 0):
``c_kl·(q − p) + c_rkl·q·(x − y − D) + c_ce·(softmax(s) − onehot(label))`` with q = softmax(x), p = softmax(y) and
D = Σ q (x − y), where the caller's per-row coefficients hold the upstream gradient, the weights and the T of
d(T²·KL(P‖Q))/ds = T·(q − p) and d(T²·KL(Q‖P))/ds = T·q·(x − y − D).

Sparse losses against a stored top-k teacher (:func:`megatron_student.ops.losses.sparse_logit_losses`): the row's k
stored ids that fall on this shard are sorted once (:func:`stored_columns`), with each block's range of them, so a
block finds its stored columns in a loop over those few ids. Forward: one read of the student logits gives, with the
same streaming step, ``(max, Σexp)`` of x = s/T over all valid columns and over the rest (the columns not stored):
the student's log-sum-exp and its tail bucket summed directly, never as 1 − Σ stored. The partition losses on
[n, k + 1] values are the caller's (torch). Backward: ``c_q·q + g_i`` at a stored column (``g_i`` the partition's
gradient at its slot), ``c_rest·q/q_tail`` on the rest, plus the CE term as above.

On a machine without a GPU, ``TRITON_INTERPRET=1`` (set before this module is imported) runs the kernels through
Triton's interpreter on CPU tensors: that is how the CPU tests check them against the torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# columns per block: a row of 201,088 is ~50 blocks; 8 warps keep 16 values per thread in flight
BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _online_logsumexp_step(x, mask, m, z):
    """One block of a streaming log-sum-exp: the new running max and Σexp, this block's exp(x − max) (0 where
    masked) and the factor that rescaled the earlier sums. Blocks masked entirely before the first unmasked column
    leave (−inf, 0)."""
    x_masked = tl.where(mask, x, float("-inf"))
    m_new = tl.maximum(m, tl.max(x_masked, 0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # exp(−inf − (−inf)) would be NaN
    e = tl.exp(x_masked - shift)
    scale = tl.exp(m - shift)
    return m_new, z * scale + tl.sum(e, 0), e, scale


@triton.jit
def _row_stats_kernel(s_ptr, t_ptr, stats_ptr, stride_s, stride_t, valid, inv_temperature,
                      HAS_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row · stride exceeds 2³¹ at T = 16k, V = 201k
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    m_s = tl.full((), float("-inf"), tl.float32)
    z_s = tl.zeros((), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    z_t = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    b = tl.zeros((), tl.float32)
    # every block starts below `valid`, so each has a valid column and the running maxima are finite after the
    # first block (exp(−inf − finite) = 0 rescales the empty initial sums)
    for start in range(0, valid, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < valid
        x = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature
        m_s, z_s, e_s, scale_s = _online_logsumexp_step(x, mask, m_s, z_s)
        if HAS_TEACHER:
            y = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature
            m_t, z_t, e_t, scale_t = _online_logsumexp_step(y, mask, m_t, z_t)
            a = a * scale_t + tl.sum(tl.where(mask, e_t * (y - x), 0.0), 0)
            b = b * scale_s + tl.sum(tl.where(mask, e_s * (x - y), 0.0), 0)
    out = stats_ptr + row * 6
    tl.store(out, m_s)
    tl.store(out + 1, z_s)
    tl.store(out + 2, m_t)
    tl.store(out + 3, z_t)
    tl.store(out + 4, a)
    tl.store(out + 5, b)


@triton.jit
def _grad_kernel(s_ptr, t_ptr, g_ptr, rows_ptr, labels_ptr, stride_s, stride_t, stride_g, valid, local_vocab,
                 inv_temperature, HAS_KL: tl.constexpr, HAS_RKL: tl.constexpr, HAS_CE: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    # per-row inputs [n, 7]: log Z_s at T, log Z_t at T, log Z_s at 1, c_kl, c_rkl, c_ce, D
    lse_s = tl.load(rows_ptr + row * 7)
    lse_t = tl.load(rows_ptr + row * 7 + 1)
    lse_s1 = tl.load(rows_ptr + row * 7 + 2)
    c_kl = tl.load(rows_ptr + row * 7 + 3)
    c_rkl = tl.load(rows_ptr + row * 7 + 4)
    c_ce = tl.load(rows_ptr + row * 7 + 5)
    d = tl.load(rows_ptr + row * 7 + 6)
    label = tl.load(labels_ptr + row)  # local column of the label, −1 when not on this shard (or ignored)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    g_row = g_ptr + row * stride_g
    for start in range(0, local_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        here = cols < valid
        s = tl.load(s_row + cols, mask=here, other=0.0).to(tl.float32)
        g = tl.zeros((BLOCK_V,), tl.float32)
        if HAS_KL or HAS_RKL:
            x = s * inv_temperature
            y = tl.load(t_row + cols, mask=here, other=0.0).to(tl.float32) * inv_temperature
            q = tl.exp(x - lse_s)
            if HAS_KL:
                g += c_kl * (q - tl.exp(y - lse_t))
            if HAS_RKL:
                g += c_rkl * q * (x - y - d)
        if HAS_CE:
            g += c_ce * (tl.exp(s - lse_s1) - tl.where(cols == label, 1.0, 0.0))
        g = tl.where(here, g, 0.0)  # Megatron's padding columns: no gradient
        tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=cols < local_vocab)


@triton.jit
def _sparse_row_stats_kernel(s_ptr, sorted_ptr, bounds_ptr, stats_ptr, stride_s, stride_sorted, stride_bounds, valid,
                             inv_temperature, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    sorted_row = sorted_ptr + row * stride_sorted
    bounds_row = bounds_ptr + row * stride_bounds
    m = tl.full((), float("-inf"), tl.float32)
    z = tl.zeros((), tl.float32)
    m_rest = tl.full((), float("-inf"), tl.float32)
    z_rest = tl.zeros((), tl.float32)
    for start in range(0, valid, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < valid
        x = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature
        m, z, _, _ = _online_logsumexp_step(x, mask, m, z)
        rest = mask
        for i in range(tl.load(bounds_row + start // BLOCK_V), tl.load(bounds_row + start // BLOCK_V + 1)):
            rest = rest & (cols != tl.load(sorted_row + i))  # the stored columns in this block
        m_rest, z_rest, _, _ = _online_logsumexp_step(x, rest, m_rest, z_rest)
    out = stats_ptr + row * 4
    tl.store(out, m)
    tl.store(out + 1, z)
    tl.store(out + 2, m_rest)
    tl.store(out + 3, z_rest)


@triton.jit
def _sparse_grad_kernel(s_ptr, g_ptr, sorted_ptr, slot_grad_ptr, bounds_ptr, rows_ptr, labels_ptr, stride_s, stride_g,
                        stride_sorted, stride_bounds, valid, local_vocab, inv_temperature, HAS_CE: tl.constexpr,
                        BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    # per-row inputs [n, 8] at T: max and log Σexp over all columns, over the rest; c_q, c_rest; log Z at 1, c_ce
    m = tl.load(rows_ptr + row * 8)
    log_z = tl.load(rows_ptr + row * 8 + 1)
    m_rest = tl.load(rows_ptr + row * 8 + 2)
    log_z_rest = tl.load(rows_ptr + row * 8 + 3)
    c_q = tl.load(rows_ptr + row * 8 + 4)
    c_rest = tl.load(rows_ptr + row * 8 + 5)
    lse1 = tl.load(rows_ptr + row * 8 + 6)
    c_ce = tl.load(rows_ptr + row * 8 + 7)
    label = tl.load(labels_ptr + row)  # local column of the label, −1 when not on this shard (or ignored)
    s_row = s_ptr + row * stride_s
    g_row = g_ptr + row * stride_g
    sorted_row = sorted_ptr + row * stride_sorted
    slot_grad_row = slot_grad_ptr + row * stride_sorted
    bounds_row = bounds_ptr + row * stride_bounds
    for start in range(0, local_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        here = cols < valid
        s = tl.load(s_row + cols, mask=here, other=0.0).to(tl.float32)
        x = s * inv_temperature
        rest = here
        g = tl.zeros((BLOCK_V,), tl.float32)
        for i in range(tl.load(bounds_row + start // BLOCK_V), tl.load(bounds_row + start // BLOCK_V + 1)):
            hit = cols == tl.load(sorted_row + i)
            rest = rest & ~hit
            g += tl.where(hit, tl.load(slot_grad_row + i), 0.0)  # a repeated id gets each of its slots' terms
        # c_q·q on the stored columns, c_rest·q/q_tail on the rest (x − max − log Σexp, as a log-softmax)
        g += tl.where(rest, c_rest, c_q) * tl.exp(tl.where(rest, x - m_rest - log_z_rest, x - m - log_z))
        if HAS_CE:
            g += c_ce * (tl.exp(s - lse1) - tl.where(cols == label, 1.0, 0.0))
        g = tl.where(here, g, 0.0)  # Megatron's padding columns: no gradient
        tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=cols < local_vocab)


def row_stats(student: torch.Tensor, teacher: torch.Tensor | None, valid: int, temperature: float,
              block: int = BLOCK) -> torch.Tensor:
    """Per-row streaming statistics [n, 6] float32 (m_s, z_s, m_t, z_t, a, b; see the module docstring) of the first
    ``valid`` columns of ``student``/``teacher`` [n, V_local] at ``temperature``; the teacher entries are
    (−inf, 0, 0, 0) without a teacher, all are (−inf, 0, …) when ``valid`` is 0."""
    n = student.shape[0]
    stats = torch.zeros(n, 6, device=student.device)  # on the device: no host-to-device copy inside the step
    stats[:, 0].fill_(float("-inf"))
    stats[:, 2].fill_(float("-inf"))
    if valid and n:
        teacher_arg = student if teacher is None else teacher
        _row_stats_kernel[(n,)](student, teacher_arg, stats, student.stride(0), teacher_arg.stride(0), valid,
                                1.0 / temperature, HAS_TEACHER=teacher is not None, BLOCK_V=block,
                                num_warps=NUM_WARPS)
    return stats


def logits_grad(student: torch.Tensor, teacher: torch.Tensor | None, rows: torch.Tensor, labels: torch.Tensor,
                valid: int, temperature: float, has_kl: bool, has_rkl: bool, has_ce: bool,
                block: int = BLOCK) -> torch.Tensor:
    """The gradient w.r.t. ``student`` [n, V_local] (its dtype) from per-row ``rows`` [n, 7] float32 (log Z_s at
    ``temperature``, log Z_t at ``temperature``, log Z_s at 1, c_kl, c_rkl, c_ce, D) and ``labels`` [n] int64 local
    label columns (−1: none on this shard)."""
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    n, local_vocab = student.shape
    if not valid:
        return grad.zero_()
    if n:
        teacher_arg = student if teacher is None else teacher
        _grad_kernel[(n,)](student, teacher_arg, grad, rows, labels, student.stride(0), teacher_arg.stride(0),
                           grad.stride(0), valid, local_vocab, 1.0 / temperature, HAS_KL=has_kl, HAS_RKL=has_rkl,
                           HAS_CE=has_ce,
                           BLOCK_V=block, num_warps=NUM_WARPS)
    return grad


OTHER_SHARD = 2**31 - 1  # the sorted column of a slot whose id is not on this shard (or a padding slot): sorts last


def stored_columns(local: torch.Tensor, here: torch.Tensor, local_vocab: int,
                   block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' view of the stored ids: this shard's columns ``local`` [n, k] where ``here``, sorted ascending
    per row with the other slots last (int32 [n, k]), the permutation that sorted them (int64 [n, k]) and each
    kernel block's range of them (int32 [n, blocks + 1]: block j holds sorted[bounds[j]:bounds[j + 1]])."""
    n = local.shape[0]
    sorted_cols, order = torch.where(here, local, OTHER_SHARD).to(torch.int32).sort(-1)
    starts = torch.arange(0, triton.cdiv(local_vocab, block) + 1, dtype=torch.int32, device=local.device) * block
    bounds = torch.searchsorted(sorted_cols, starts.expand(n, -1).contiguous(), out_int32=True)
    return sorted_cols.contiguous(), order, bounds


def sparse_row_stats(student: torch.Tensor, sorted_cols: torch.Tensor, bounds: torch.Tensor, valid: int,
                     temperature: float, block: int = BLOCK) -> torch.Tensor:
    """Per-row streaming statistics [n, 4] float32 of the first ``valid`` columns of ``student`` [n, V_local] at
    ``temperature``: (max, Σexp) over all of them and over the rest, the columns not in ``sorted_cols`` (from
    :func:`stored_columns`); (−inf, 0) for a set without columns."""
    n = student.shape[0]
    stats = torch.zeros(n, 4, device=student.device)
    stats[:, 0].fill_(float("-inf"))
    stats[:, 2].fill_(float("-inf"))
    if valid and n:
        _sparse_row_stats_kernel[(n,)](student, sorted_cols, bounds, stats, student.stride(0), sorted_cols.stride(0),
                                       bounds.stride(0), valid, 1.0 / temperature, BLOCK_V=block,
                                       num_warps=NUM_WARPS)
    return stats


def sparse_logits_grad(student: torch.Tensor, sorted_cols: torch.Tensor, slot_grad: torch.Tensor,
                       bounds: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, valid: int, temperature: float,
                       has_ce: bool, block: int = BLOCK) -> torch.Tensor:
    """The gradient w.r.t. ``student`` [n, V_local] (its dtype): ``c_rest·q/q_tail`` on the rest (the columns not in
    ``sorted_cols``), ``c_q·q + slot_grad`` at each stored column (``slot_grad`` [n, k] float32 in ``sorted_cols``
    order), plus ``c_ce·(softmax(s) − onehot(label))``, from per-row ``rows`` [n, 8] float32 (at ``temperature``
    the max and log Σexp over all valid columns, the same over the rest, c_q, c_rest; log Z at 1, c_ce) and
    ``labels`` [n] int64 local label columns (−1: none on this shard); x = s/T, q = softmax(x), q_tail = Σ_rest q."""
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    n, local_vocab = student.shape
    if not valid:
        return grad.zero_()
    if n:
        _sparse_grad_kernel[(n,)](student, grad, sorted_cols, slot_grad, bounds, rows, labels, student.stride(0),
                                  grad.stride(0), sorted_cols.stride(0), bounds.stride(0), valid, local_vocab,
                                  1.0 / temperature, HAS_CE=has_ce, BLOCK_V=block, num_warps=NUM_WARPS)
    return grad
