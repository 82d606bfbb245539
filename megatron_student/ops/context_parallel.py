"""Context parallelism (CP): one packed sequence split into contiguous chunks, one chunk per rank of a CP group.

Layout. Rank r of a CP group of size P holds tokens [r·L, (r+1)·L) of the packed sequence (L = T / P): one
contiguous chunk, the layout of fla's ``build_cp_context`` (``layout='contiguous'``). Every layer kind uses it:

* KDA is a recurrence, so a rank's chunk enters the layer only through the state it starts from. With contiguous
  chunks that state is a chain over the previous ranks: each rank summarises its chunk as an affine map of the
  incoming state, ``h_out = M·h_in + h_local`` (``M`` [K, K] per value head, ``h_local`` the state reached from
  zero), the P summaries are all-gathered (a few MB per layer, independent of T) and each rank chains those of
  its predecessors in fp32 to get its initial state. A zigzag layout (balancing causal softmax cost) would cut
  every document into two pieces per rank and double the chain; SWA and KDA cost the same on every token, so
  contiguous chunks are already balanced for the student.
* The causal short convolutions and sliding-window attention see a bounded past: the previous rank's last
  ``kernel − 1`` (convolution) or ``window − 1`` (attention) positions, sent once (a halo exchange), not the
  all-gather or all-to-all of full-attention CP.
* Full causal softmax attention (the teacher's ``full_attention`` layers) needs the whole prefix: keys and values
  are all-gathered (Megatron's ``allgather`` CP method, exact) and each rank attends its queries to the keys up to
  its chunk's end. With contiguous chunks the last rank does the most work; the teacher runs without gradients.

Packed documents (``cu_seqlens`` of the whole sequence, known to every rank) may cross rank boundaries: a rank's
first local document continues from the previous ranks only for the tokens it really has there; the state and
halos of other documents never cross a document boundary.

Gradients flow back across ranks through the autograd functions of the exchanges (each forward collective has its
mirror in backward: the halo goes forward, its gradient back to the previous rank; the gathered summaries'
gradients are all-reduced to their owners), so every rank must run the same layers in the same order, forward and
backward, as Megatron's pipeline already guarantees.

On CUDA, KDA and its convolutions run fla's own CP kernels (``chunk_kda(cp_context=…)``, ``causal_conv1d_cp``)
with the context of :meth:`ContextParallel.fla_context`; elsewhere (CPU, float64) the exact pure-torch algorithm
below runs over any process group (gloo in CI).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..host_syncs import to_device_async
from ..kernels import use_fixed_configs
from .kda import beta_from_logits, causal_short_conv, kda_gate, kda_reference
from .rope import token_positions

__all__ = [
    "ContextParallel",
    "context_parallel_split",
    "gather_sequence",
    "kda_context_parallel",
    "kda_from_logits_context_parallel",
    "pad_queries_for_halo",
    "receive_from_previous",
    "short_conv_context_parallel",
    "sliding_window_halo",
]


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in a context-parallel split of one packed sequence.

    ``bounds`` are the document boundaries of the whole sequence (global ``cu_seqlens``: 0, …, T); this rank holds
    the contiguous chunk ``[start, start + local_len)``.
    """

    group: dist.ProcessGroup
    rank: int
    size: int
    bounds: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.bounds[-1]

    @property
    def local_len(self) -> int:
        return self.total // self.size

    @property
    def start(self) -> int:
        return self.rank * self.local_len

    @functools.cached_property
    def local_bounds(self) -> tuple[int, ...]:
        """Document boundaries inside this chunk, local coordinates (0, …, local_len)."""
        end = self.start + self.local_len
        inner = [b - self.start for b in self.bounds if self.start < b < end]
        return (0, *inner, self.local_len)

    @functools.cached_property
    def first_document_start(self) -> int:
        """Global position where the document holding this chunk's first token starts."""
        return max(b for b in self.bounds[:-1] if b <= self.start)

    @property
    def continued_tokens(self) -> int:
        """Tokens of this chunk's first document that lie on earlier ranks (0: the document starts here)."""
        return self.start - self.first_document_start

    @property
    def first_carried_rank(self) -> int:
        """The earliest rank whose state reaches this chunk (this rank itself when nothing is carried)."""
        return self.first_document_start // self.local_len

    def local_cu_seqlens(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return to_device_async(torch.tensor(self.local_bounds, dtype=torch.int32), device)

    def local_positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[local_len] position of each local token inside its document (positions restart at every document)."""
        cu = torch.tensor(self.bounds, dtype=torch.long)
        return to_device_async(token_positions(self.total, "cpu", cu)[self.start : self.start + self.local_len], device)

    def local_chunk(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's chunk of a tensor holding the whole sequence along ``dim``."""
        if x.shape[dim] != self.total:
            raise ValueError(f"context parallelism: tensor has {x.shape[dim]} positions on dim {dim}, expected the "
                             f"whole sequence of {self.total}")
        return x.narrow(dim, self.start, self.local_len)

    def fla_context(self, device: torch.device, conv1d_kernel_size: int | None = None):
        """fla's ``FLACPContext`` for the same split (contiguous layout), for ``chunk_kda``/``causal_conv1d_cp``."""
        from fla.ops.cp import build_cp_context

        cu = torch.tensor(self.bounds, dtype=torch.int32)
        return build_cp_context(to_device_async(cu, device), self.group, conv1d_kernel_size=conv1d_kernel_size,
                                cu_seqlens_cpu=cu)

    def check_local(self, x: torch.Tensor, what: str, halo: int = 0) -> None:
        if x.ndim < 2 or x.shape[0] != 1 or x.shape[1] != self.local_len:
            raise ValueError(f"{what}: context parallelism takes this rank's chunk as [1, {self.local_len}, ...] "
                             f"(one packed sequence of {self.total} over {self.size} ranks), got {list(x.shape)}")
        if halo > self.local_len:
            raise ValueError(f"{what}: a halo of {halo} positions needs chunks at least that long; the chunk has "
                             f"{self.local_len} tokens (sequence {self.total} over {self.size} ranks)")


def context_parallel_split(cu_seqlens: torch.Tensor | None, total: int, group: dist.ProcessGroup) -> ContextParallel:
    """The contiguous split of a packed sequence of ``total`` tokens (documents ``cu_seqlens``, None: one document)
    over ``group``. ``total`` must be a multiple of the group size (fla's kernels need equal chunks)."""
    size = dist.get_world_size(group)
    if total <= 0 or total % size:
        raise ValueError(f"context parallelism: the sequence length {total} must be a positive multiple of the "
                         f"context-parallel size {size}")
    if cu_seqlens is None:
        bounds = (0, total)
    else:
        bounds = tuple(int(b) for b in cu_seqlens.tolist())
        if cu_seqlens.ndim != 1 or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
            raise ValueError(f"context parallelism: cu_seqlens {list(bounds)} must be 1-D, start at 0 and end at "
                             f"the sequence length {total}")
        if any(b <= a for a, b in zip(bounds[:-1], bounds[1:])):
            raise ValueError(f"context parallelism: cu_seqlens {list(bounds)} must be strictly increasing")
    return ContextParallel(group, dist.get_rank(group), size, bounds)


# --------------------------------------------------------------------------------------------
# exchanges (autograd functions: the backward of each collective is its mirror)
# --------------------------------------------------------------------------------------------


def _shift(t: torch.Tensor, group: dist.ProcessGroup, forward: bool) -> torch.Tensor:
    """Send ``t`` to the next rank and receive the previous rank's (``forward``), or the reverse; zeros where the
    neighbour does not exist."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    src, dst = (rank - 1, rank + 1) if forward else (rank + 1, rank - 1)
    t = t.contiguous()
    out = torch.zeros_like(t)
    ops = []
    if 0 <= dst < size:
        ops.append(dist.P2POp(dist.isend, t, dist.get_global_rank(group, dst), group))
    if 0 <= src < size:
        ops.append(dist.P2POp(dist.irecv, out, dist.get_global_rank(group, src), group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return out


class _FromPrevious(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tail: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _shift(tail, group, forward=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _shift(grad, ctx.group, forward=False), None


def receive_from_previous(tail: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """Every rank sends ``tail`` to the next rank and returns the previous rank's (zeros on the first rank). The
    gradient of the returned tensor goes back to the previous rank's ``tail``."""
    return _FromPrevious.apply(tail, cp.group)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(cp.size)]
        dist.all_gather(parts, x.contiguous(), group=cp.group)
        ctx.cp = cp
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cp = ctx.cp
        grad = grad.contiguous()
        dist.all_reduce(grad, group=cp.group)  # every rank's use of this rank's positions
        return grad.narrow(1, cp.start, cp.local_len), None


def gather_sequence(x: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """The whole sequence [1, T, ...] from every rank's chunk [1, L, ...]; gradients return to their owners."""
    return _GatherSequence.apply(x, cp)


def _chain(summaries: torch.Tensor, first: int, last: int, value_dim: int) -> torch.Tensor:
    """State entering rank ``last`` from the summaries [P, HV, K, V + K] (``[h_local | M]``) of ranks first..last-1."""
    h = torch.zeros_like(summaries[0, ..., :value_dim])
    for j in range(first, last):
        h = summaries[j, ..., value_dim:] @ h + summaries[j, ..., :value_dim]
    return h


class _ChainedState(torch.autograd.Function):
    """All-gather the per-rank summaries and chain the predecessors'; backward: the gradient of every gathered
    summary is summed over the ranks that used it (an all-reduce) and each rank keeps its own."""

    @staticmethod
    def forward(ctx, summary: torch.Tensor, cp: ContextParallel, value_dim: int) -> torch.Tensor:
        gathered = [torch.empty_like(summary) for _ in range(cp.size)]
        dist.all_gather(gathered, summary.contiguous(), group=cp.group)
        gathered = torch.stack(gathered)
        ctx.save_for_backward(gathered)
        ctx.cp, ctx.value_dim = cp, value_dim
        return _chain(gathered, cp.first_carried_rank, cp.rank, value_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gathered,) = ctx.saved_tensors
        cp = ctx.cp
        grad_gathered = torch.zeros_like(gathered)
        if cp.first_carried_rank < cp.rank:  # else nothing is carried into this rank; it still joins the reduction
            with torch.enable_grad():
                leaf = gathered.detach().requires_grad_()
                h = _chain(leaf, cp.first_carried_rank, cp.rank, ctx.value_dim)
                (grad_gathered,) = torch.autograd.grad(h, leaf, grad)
        dist.all_reduce(grad_gathered, group=cp.group)
        return grad_gathered[cp.rank], None, None


# --------------------------------------------------------------------------------------------
# layer pieces under CP
# --------------------------------------------------------------------------------------------


def _same_document_mask(cp: ContextParallel, halo: int, like: torch.Tensor) -> torch.Tensor:
    """[halo] 1 for the previous rank's last ``halo`` positions that belong to this chunk's first document."""
    keep = min(halo, cp.continued_tokens)
    return (torch.arange(halo, device=like.device) >= halo - keep).to(like.dtype)


def short_conv_context_parallel(x: torch.Tensor, weight: torch.Tensor, cp: ContextParallel, *,
                                activation: str | None = "silu") -> torch.Tensor:
    """:func:`~megatron_student.ops.kda.causal_short_conv` of this rank's chunk x [1, L, D] of a CP-split sequence:
    the first document's window reaches into the previous rank's last ``W − 1`` inputs when it continues there."""
    W = weight.shape[1]
    cp.check_local(x, "short_conv_context_parallel", halo=W - 1)
    if x.is_cuda and x.dtype != torch.float64:
        from fla.modules.causal_conv1d.cp import causal_conv1d_cp

        return causal_conv1d_cp(x, weight, activation=activation, cp_context=cp.fla_context(x.device, W))
    D = x.shape[2]
    halo = receive_from_previous(x[0, x.shape[1] - (W - 1):], cp)  # [W-1, D]
    halo = halo * _same_document_mask(cp, W - 1, halo)[:, None]
    first = torch.cat([halo.new_zeros(1, D), halo]).t()  # [D, W]: oldest first, like fla's conv cache
    n_docs = len(cp.local_bounds) - 1
    initial = torch.cat([first[None], first.new_zeros(n_docs - 1, D, W)])
    y, _ = causal_short_conv(x, weight, activation=activation, cu_seqlens=cp.local_cu_seqlens(x.device),
                             cu_seqlens_cpu=torch.tensor(cp.local_bounds), initial_state=initial)
    return y


def kda_context_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         cp: ContextParallel, *, scale: float | None = None,
                         use_qk_l2norm: bool = True) -> torch.Tensor:
    """KDA (``ops.kda.kda``'s contract, [1, L, ...] local chunks) of a CP-split sequence, exact in pure torch.

    1. This rank's last local document segment is run from the augmented initial state ``[0 | I]`` with values
       ``[v | 0]``: its final state is ``[h_local | M]``, the state reached from zero and the (linear) map of the
       incoming state, since the delta rule acts on the state's key axis column by column.
    2. The summaries are all-gathered and the predecessors sharing the first local document are chained in the
       accumulation dtype (fp32; fp64 for fp64 inputs).
    3. The chunk is computed from that initial state (its first document; the other documents start at zero).
    Returns o [1, L, HV, V] in q.dtype.
    """
    cp.check_local(q, "kda_context_parallel")
    HV, V, K = v.shape[2], v.shape[3], q.shape[3]
    last = cp.local_bounds[-2]
    seg_q, seg_k, seg_v, seg_g, seg_beta = (t[:, last:] for t in (q, k, v, g, beta))
    v_aug = torch.cat([seg_v, seg_v.new_zeros(*seg_v.shape[:3], K)], dim=-1)
    acc = torch.float64 if any(t.dtype == torch.float64 for t in (q, k, v, g, beta)) else torch.float32
    eye = torch.eye(K, dtype=acc, device=q.device).expand(1, HV, K, K)
    start_aug = torch.cat([eye.new_zeros(1, HV, K, V), eye], dim=-1)
    _, summary = kda_reference(  # its outputs are not needed, only the final state
seg_q, seg_k, v_aug, seg_g, seg_beta, scale=scale, initial_state=start_aug,
                               output_final_state=True, use_qk_l2norm=use_qk_l2norm)
    carried = _ChainedState.apply(summary[0], cp, V)  # [HV, K, V]
    n_docs = len(cp.local_bounds) - 1
    initial = torch.cat([carried[None], carried.new_zeros(n_docs - 1, HV, K, V)])
    o, _ = kda_reference(q, k, v, g, beta, scale=scale, initial_state=initial,
                         cu_seqlens=cp.local_cu_seqlens(q.device), use_qk_l2norm=use_qk_l2norm)
    return o


def kda_from_logits_context_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: torch.Tensor,
                                     beta_logits: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
                                     cp: ContextParallel, *, lower_bound: float | None = None,
                                     scale: float | None = None) -> torch.Tensor:
    """:func:`~megatron_student.ops.kda.kda_from_logits` of this rank's chunk of a CP-split sequence. On CUDA
    (not float64) fla's ``chunk_kda`` with ``cp_context`` (gate and sigmoid in the kernel, as without CP);
    elsewhere the gate, σ(β) and :func:`kda_context_parallel`. Returns o [1, L, HV, V] in q.dtype."""
    cp.check_local(q, "kda_from_logits_context_parallel")
    if not q.is_cuda or q.dtype == torch.float64:
        g = kda_gate(f, A_log, dt_bias, lower_bound=lower_bound)
        beta = beta_from_logits(beta_logits, q.dtype)
        return kda_context_parallel(q, k, v, g, beta, cp, scale=scale)
    use_fixed_configs()  # launch configs recorded for this GPU instead of autotuning
    from fla.ops.kda import chunk_kda

    HV, K = v.shape[2], q.shape[3]
    o, _ = chunk_kda(q=q, k=k, v=v, g=f.view(*f.shape[:2], HV, K), beta=beta_logits, A_log=A_log, dt_bias=dt_bias,
                     scale=scale, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                     use_beta_sigmoid_in_kernel=True, safe_gate=lower_bound is not None, lower_bound=lower_bound,
                     cp_context=cp.fla_context(q.device))
    return o.to(q.dtype)


def sliding_window_halo(tensors: dict[str, torch.Tensor], cp: ContextParallel, window: int
                        ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Prepend to each per-position tensor [1, L, ...] the previous rank's last ``window − 1`` positions (one
    exchange for all of them), and return the document boundaries of the extended [1, window − 1 + L] sequence:
    the halo positions of this chunk's first document join it, the others form a separate block that no local
    query sees. Gradients of the halo go back to the previous rank."""
    halo = window - 1
    for name, t in tensors.items():
        cp.check_local(t, f"sliding_window_halo ({name})", halo=halo)
    names = list(tensors)
    tails = [tensors[n][0, cp.local_len - halo:].reshape(halo, -1) for n in names]
    widths = [t.shape[1] for t in tails]
    received = receive_from_previous(torch.cat(tails, dim=1), cp).split(widths, dim=1)
    extended = {n: torch.cat([r.reshape(1, halo, *tensors[n].shape[2:]), tensors[n]], dim=1)
                for n, r in zip(names, received)}
    joined = min(halo, cp.continued_tokens)  # halo positions inside this chunk's first document
    foreign = [halo - joined] if halo - joined > 0 else []
    bounds = [0, *foreign, *(b + halo for b in cp.local_bounds[1:])]
    return extended, torch.tensor(bounds, dtype=torch.int32, device=tails[0].device)


def pad_queries_for_halo(q: torch.Tensor, halo: int) -> torch.Tensor:
    """q [1, L, ...] with ``halo`` zero queries in front, so queries and the halo-extended keys align; the outputs
    of those positions are dropped."""
    return F.pad(q, (0, 0) * (q.ndim - 2) + (halo, 0))
