"""Kimi Delta Attention (KDA) math as plain functions.

This module is the one home for the KDA math. The HF student modules and the
Megatron-Core tensor-parallel modules both call these functions on whatever
heads are local to them; the functions take plain tensors and own no
parameters.

Semantics follow flash-linear-attention 0.6.0 (``fla.ops.kda``,
``fla.modules.ShortConvolution``; the output norm ``fla.modules.FusedRMSNormGated`` is
``ops.norm.gated_rms_norm``, the layer composition ``ops.layers.kda_layer``):

Per value head, with state ``S`` of shape ``[K, V]`` (K-first), log-decay
``g_t <= 0`` (one value per key channel), ``beta_t`` in (0, 1), and
L2-normalised ``q_t``/``k_t`` (``q_t`` also multiplied by ``scale``)::

    S'  = Diag(exp(g_t)) S_{t-1}
    S_t = S' + beta_t k_t (v_t - S'^T k_t)^T
    o_t = S_t^T q_t

Grouped value attention (GVA): ``HV = G * H`` value heads share ``H`` q/k
heads; value head ``i`` uses q/k head ``i // G``.

State layouts (all K-first, like ``chunk_kda``/``fused_recurrent_kda`` with
the default ``state_v_first=False`` and fla's ``naive_*`` references):

* recurrent state: ``[N, HV, K, V]``, float32 (float64 when the reference
  runs on float64 inputs). The fla layer/cache uses V-first
  ``[N, HV, V, K]``; transpose the last two axes to convert.
* short-conv state: ``[N, D, W]`` holding the last ``W`` inputs of each
  sequence, oldest first (``state[..., -1]`` is the most recent input), exactly
  fla's ``ShortConvolution`` cache layout.

``N`` is the batch size, or the number of sequences when ``cu_seqlens`` is
given (then the batch size must be 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kernels import use_fixed_configs
from .norm import accumulation_dtype

__all__ = [
    "MAX_HEAD_K",
    "causal_short_conv",
    "kda",
    "kda_from_logits",
    "kda_gate",
    "kda_recurrent_step",
    "kda_reference",
    "l2_normalize",
]

MAX_HEAD_K = 256  # fla's KDA kernels assert K <= 256
L2NORM_EPS = 1e-6  # fla's l2norm / in-kernel q/k normalisation epsilon
DECODE_MAX_TOKENS = 64  # fla's layer uses fused_recurrent for q_len <= 64 at inference
_SUB = 8  # sub-block size of the reference's intra-chunk decay products


def _check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, total: int, what: str,
                      cu_seqlens_cpu: torch.Tensor | None = None) -> list[int]:
    """The boundaries as a list, checked; read from ``cu_seqlens_cpu`` (the same boundaries on the host) when given,
    so a CUDA ``cu_seqlens`` is not read back."""
    if batch != 1:
        raise ValueError(f"{what}: with cu_seqlens the batch size must be 1 (packed sequences), got B={batch}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{what}: cu_seqlens must be 1-D with N+1 >= 2 entries, got shape {list(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what}: cu_seqlens must be int32/int64, got {cu_seqlens.dtype}")
    if cu_seqlens_cpu is not None and cu_seqlens_cpu.shape != cu_seqlens.shape:
        raise ValueError(f"{what}: cu_seqlens_cpu {list(cu_seqlens_cpu.shape)} and cu_seqlens "
                         f"{list(cu_seqlens.shape)} differ")
    bounds = (cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu).tolist()
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"{what}: cu_seqlens must start at 0 and end at T={total}, got {bounds[0]}..{bounds[-1]}")
    if any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"{what}: cu_seqlens must be non-decreasing")
    return bounds


# --------------------------------------------------------------------------------------------
# small elementwise pieces
# --------------------------------------------------------------------------------------------


def l2_normalize(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """``x / sqrt(sum(x**2, -1) + eps)`` over the last dim, computed in fp32 (fp64 for fp64 input).

    This is fla's ``l2norm`` (and the in-kernel q/k normalisation of the KDA kernels): eps is
    added to the squared norm inside the square root, unlike ``F.normalize``. Returns x.dtype.
    """
    xf = x.to(accumulation_dtype(x))
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def kda_gate(
    f: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor | None = None,
    lower_bound: float | None = None,
) -> torch.Tensor:
    """KDA log-space forget gate.

    Args:
        f: ``[..., HV*K]`` output of the low-rank ``f_proj``.
        A_log: ``[HV]`` (fp32 parameter).
        dt_bias: ``[HV*K]`` (fp32 parameter) or None.
        lower_bound: None for the default gate, or a negative float for fla's ``safe_gate`` form.

    Returns:
        g: ``[..., HV, K]`` in fp32 (fp64 if any input is fp64), ``g <= 0``:

        * ``g = -exp(A_log) * softplus(f + dt_bias)``                 (lower_bound is None)
        * ``g = lower_bound * sigmoid(exp(A_log) * (f + dt_bias))``   (lower_bound given)

    Matches ``fla.ops.kda.gate.naive_kda_gate`` / ``naive_kda_lowerbound_gate`` (and so the
    in-kernel gate of ``chunk_kda(use_gate_in_kernel=True)``); softplus uses threshold 20 like fla.
    """
    if A_log.ndim != 1:
        raise ValueError(f"kda_gate: A_log must have shape [HV], got {list(A_log.shape)}")
    HV = A_log.shape[0]
    if f.shape[-1] % HV != 0:
        raise ValueError(f"kda_gate: f last dim {f.shape[-1]} is not a multiple of HV={HV} (from A_log)")
    K = f.shape[-1] // HV
    if dt_bias is not None and dt_bias.shape != (HV * K,):
        raise ValueError(f"kda_gate: dt_bias must have shape [HV*K]=[{HV * K}], got {list(dt_bias.shape)}")
    if lower_bound is not None and not lower_bound < 0:
        raise ValueError(f"kda_gate: lower_bound must be negative, got {lower_bound}")
    acc = accumulation_dtype(f, A_log, dt_bias)
    x = f.to(acc).unflatten(-1, (HV, K))
    if dt_bias is not None:
        x = x + dt_bias.to(acc).view(HV, K)
    a = A_log.to(acc).exp().view(HV, 1)
    if lower_bound is None:
        return -a * F.softplus(x)
    return lower_bound * torch.sigmoid(a * x)


# --------------------------------------------------------------------------------------------
# short convolution
# --------------------------------------------------------------------------------------------


def causal_short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal convolution over time, then optional SiLU (fla ``ShortConvolution``).

    ``y[t, d] = act(bias[d] + sum_{j<W} weight[d, j] * x[t - (W-1) + j, d])`` where inputs before
    a sequence's start come from ``initial_state`` (zeros without it); ``weight[:, -1]`` multiplies
    the current token.

    Args:
        x: ``[B, T, D]``; with ``cu_seqlens`` B must be 1 and the sequences are packed along T.
        weight: ``[D, W]`` (an ``nn.Conv1d`` depthwise weight ``[D, 1, W]`` squeezed on dim 1).
        bias: ``[D]`` or None.
        activation: ``"silu"``/``"swish"`` or None.
        cu_seqlens: ``[N+1]`` cumulative lengths; no input leaks across sequences.
        cu_seqlens_cpu: the same on the host (optional): read instead of ``cu_seqlens`` for checks and fla's
            chunk tables, so a CUDA ``cu_seqlens`` is not read back.
        initial_state: ``[N, D, W]``: the last W inputs before each sequence, oldest first
            (fla's cache layout; only the last W-1 entries influence the output).
        output_final_state: also return the ``[N, D, W]`` state after each sequence (x.dtype).

    Decoding one token per sequence is ``T == 1`` with a state. On CUDA, sequences (T > 1) run fla's
    Triton ``causal_conv1d``; elsewhere (and for decode steps) the math runs in fp32 (fp64 for fp64
    input) with ``F.conv1d``, exact and differentiable.
    Returns ``(y [B, T, D] in x.dtype, final_state or None)``.
    """
    if x.ndim != 3:
        raise ValueError(f"causal_short_conv: x must be [B, T, D], got {list(x.shape)}")
    B, T, D = x.shape
    if weight.ndim != 2 or weight.shape[0] != D:
        raise ValueError(f"causal_short_conv: weight must be [D, W] with D={D}, got {list(weight.shape)}")
    W = weight.shape[1]
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"causal_short_conv: bias must be [D]=[{D}], got {list(bias.shape)}")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_short_conv: unsupported activation {activation!r}")
    if cu_seqlens is None:
        N, starts, lens = B, [b * T for b in range(B)], [T] * B
    else:
        bounds = _check_cu_seqlens(cu_seqlens, B, T, "causal_short_conv", cu_seqlens_cpu)
        N, starts = len(bounds) - 1, bounds[:-1]
        lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if initial_state is not None and initial_state.shape != (N, D, W):
        raise ValueError(
            f"causal_short_conv: initial_state must be [N, D, W]=[{N}, {D}, {W}], got {list(initial_state.shape)}"
        )

    if x.is_cuda and T > 1 and x.dtype != torch.float64:
        use_fixed_configs()  # launch configs recorded for this GPU instead of autotuning
        from fla.modules.causal_conv1d.ops import causal_conv1d

        y, final_state = causal_conv1d(
            x, weight, bias, initial_state=initial_state, output_final_state=output_final_state,
            activation=activation, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)
        return y, final_state
    acc = accumulation_dtype(x, weight, bias, initial_state)
    dev = x.device
    # Each sequence gets W slots in front of its tokens holding its initial state (or zeros), so
    # one valid (unpadded) conv over the extended sequence never mixes two sequences.
    seq_of_token = torch.repeat_interleave(torch.arange(N, device=dev), torch.tensor(lens, device=dev))
    dest = torch.arange(B * T, device=dev) + (seq_of_token + 1) * W
    ext = x.new_zeros(B * T + N * W, D, dtype=acc).index_copy(0, dest, x.reshape(B * T, D).to(acc))
    seq_begin = torch.tensor(starts, device=dev) + torch.arange(N, device=dev) * W  # first slot of each sequence
    if initial_state is not None:
        slots = (seq_begin[:, None] + torch.arange(W, device=dev)).reshape(-1)
        ext = ext.index_copy(0, slots, initial_state.to(acc).transpose(1, 2).reshape(N * W, D))

    conv = F.conv1d(ext.t().unsqueeze(0), weight.to(acc).unsqueeze(1), groups=D)[0].t()  # [L - W + 1, D]
    y = conv.index_select(0, dest - (W - 1))
    if bias is not None:
        y = y + bias.to(acc)
    if activation is not None:
        y = F.silu(y)
    y = y.to(x.dtype).reshape(B, T, D)

    final_state = None
    if output_final_state:
        seq_end = seq_begin + W + torch.tensor(lens, device=dev)  # one past the last slot
        idx = seq_end[:, None] - W + torch.arange(W, device=dev)
        final_state = ext[idx].transpose(1, 2).to(x.dtype)  # [N, D, W]
    return y, final_state


# --------------------------------------------------------------------------------------------
# KDA
# --------------------------------------------------------------------------------------------


def _check_kda_inputs(q, k, v, g, beta, initial_state, cu_seqlens, scale, what, cu_seqlens_cpu=None):
    if q.ndim != 4:
        raise ValueError(f"{what}: q must be [B, T, H, K], got {list(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{what}: k shape {list(k.shape)} must equal q shape {list(q.shape)}")
    if K > MAX_HEAD_K:
        raise ValueError(f"{what}: q/k head dim K={K} exceeds {MAX_HEAD_K} (fla KDA kernel limit)")
    if v.ndim != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"{what}: v must be [B, T, HV, V] with B={B}, T={T}, got {list(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if HV % H != 0:
        raise ValueError(f"{what}: value heads HV={HV} (v) must be a multiple of q/k heads H={H} (q)")
    if g.shape != (B, T, HV, K):
        raise ValueError(f"{what}: g must be [B, T, HV, K]={[B, T, HV, K]}, got {list(g.shape)}")
    if beta.shape != (B, T, HV):
        raise ValueError(f"{what}: beta must be [B, T, HV]={[B, T, HV]}, got {list(beta.shape)}")
    for name, t in (("k", k), ("v", v), ("g", g), ("beta", beta), ("initial_state", initial_state)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{what}: {name} is on {t.device} but q is on {q.device}")
    if cu_seqlens is None:
        N, bounds = B, None
    else:
        bounds = _check_cu_seqlens(cu_seqlens, B, T, what, cu_seqlens_cpu)
        N = len(bounds) - 1
    if initial_state is not None:
        if initial_state.shape != (N, HV, K, V):
            raise ValueError(
                f"{what}: initial_state must be [N, HV, K, V]={[N, HV, K, V]} (K-first), "
                f"got {list(initial_state.shape)}"
            )
        if initial_state.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{what}: initial_state must be float32 (or float64 on the reference), got {initial_state.dtype}")
    if scale is None:
        scale = K**-0.5
    return B, T, H, K, HV, V, N, bounds, scale


def _decay_grams(b: torch.Tensor, G: torch.Tensor, *a_list: torch.Tensor) -> list[torch.Tensor]:
    """For each ``a``: ``M[t, j] = sum_c a[t, c] * b[j, c] * exp(G[t, c] - G[j, c])`` for ``j <= t``, else 0.

    a, b, G: ``[..., C, K]``; G is the within-chunk inclusive cumsum of g <= 0, so G is
    non-increasing along C. Every exponential used is of a non-positive number: pairs in the
    same sub-block use the exact pairwise difference; a query in sub-block i >= 1 and a key in an
    earlier sub-block factor through the reference position r = i*SUB - 1 (key <= r < query), as
    ``exp(G_t - G_r) * exp(G_r - G_j)`` with both factors <= 1. Nothing overflows for any decay.
    The decay factors are shared by all ``a`` (KDA needs the kk and the qk products).
    """
    C = b.shape[-2]
    nb = C // _SUB
    bb, Gb = (x.unflatten(-2, (nb, _SUB)) for x in (b, G))  # [..., nb, s, K]
    tri = torch.ones(_SUB, _SUB, dtype=torch.bool, device=b.device).tril()
    diff = (Gb.unsqueeze(-2) - Gb.unsqueeze(-3)).masked_fill(~tri[:, :, None], float("-inf"))  # [..., nb, t, j, K]
    bdiag = bb.unsqueeze(-3) * diff.exp()
    eye = torch.eye(nb, dtype=b.dtype, device=b.device)
    if nb > 1:
        Gref = G[..., _SUB - 1 : C - 1 : _SUB, :]  # [..., nb-1, K], the last position of sub-blocks 0..nb-2
        qdecay = (Gb[..., 1:, :, :] - Gref.unsqueeze(-2)).exp()  # [..., nb-1, s, K]
        earlier = torch.arange(C, device=b.device)[None, :] < torch.arange(1, nb, device=b.device)[:, None] * _SUB
        ex = (Gref.unsqueeze(-2) - G.unsqueeze(-3)).masked_fill(~earlier[..., None], float("-inf"))
        kbT = (b.unsqueeze(-3) * ex.exp()).transpose(-1, -2)  # [..., nb-1, K, C]
    grams = []
    for a in a_list:
        ab = a.unflatten(-2, (nb, _SUB))
        diag = (ab.unsqueeze(-2) * bdiag).sum(-1)  # [..., nb, s, s]
        M = (diag.unsqueeze(-2) * eye[:, None, :, None]).reshape(*a.shape[:-2], C, C)
        if nb > 1:
            off = (ab[..., 1:, :, :] * qdecay) @ kbT  # [..., nb-1, s, C]
            M = M + F.pad(off.flatten(-3, -2), (0, 0, _SUB, 0))
        grams.append(M)
    return grams


def kda_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pure-torch, differentiable, chunked (WY/UT) KDA. Same contract as :func:`kda`.

    Math runs in fp32 (fp64 when any of q/k/v/g/beta/initial_state is fp64). Per chunk of
    ``chunk_size`` tokens (a multiple of 8) with within-chunk cumulative decay ``G``:
    ``delta = (I + tril_-1(beta * KK_G))^-1 beta (V - (k*exp(G)) S)``, ``o = (q*exp(G)) S +
    tril(QK_G) delta``, ``S <- exp(G_last) S + (k*exp(G_last - G))^T delta``. Documents of a
    varlen batch are laid out chunk-aligned, so no chunk holds two documents; padded slots have
    ``k = v = q = beta = g = 0`` and change nothing.

    Returns ``(o [B, T, HV, V] in q.dtype, final_state [N, HV, K, V] fp32/fp64 or None)``.
    """
    B, T, H, K, HV, V, N, bounds, scale = _check_kda_inputs(
        q, k, v, g, beta, initial_state, cu_seqlens, scale, "kda_reference"
    )
    if chunk_size <= 0 or chunk_size % _SUB != 0:
        raise ValueError(f"kda_reference: chunk_size must be a positive multiple of {_SUB}, got {chunk_size}")
    C = chunk_size
    acc = accumulation_dtype(q, k, v, g, beta, initial_state)
    dev = q.device

    qf, kf = q.to(acc), k.to(acc)
    if use_qk_l2norm:
        qf, kf = l2_normalize(qf), l2_normalize(kf)
    if HV != H:
        qf, kf = qf.repeat_interleave(HV // H, dim=2), kf.repeat_interleave(HV // H, dim=2)
    qf = qf * scale
    vf, gf, bf = v.to(acc), g.to(acc), beta.to(acc)
    h0 = None if initial_state is None else initial_state.to(acc)

    # Lay the tokens out on a grid of R rows x NC chunks, every chunk inside one document.
    if bounds is None:
        R, NC = B, max(1, math.ceil(T / C))
        pad = NC * C - T
        tensors = [F.pad(x, (0, 0) * (x.ndim - 2) + (0, pad)) for x in (qf, kf, vf, gf, bf)]
        starts = {0: h0 if h0 is not None else qf.new_zeros(B, HV, K, V)}
        ends = [NC - 1]
        dest = None
    else:
        R = 1
        lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        n_chunks = [max(1, math.ceil(n / C)) for n in lens]
        first_chunk = [0]
        for n in n_chunks[:-1]:
            first_chunk.append(first_chunk[-1] + n)
        NC = first_chunk[-1] + n_chunks[-1]
        dest = torch.cat([fc * C + torch.arange(n, device=dev) for fc, n in zip(first_chunk, lens)])
        tensors = [x.new_zeros(1, NC * C, *x.shape[2:]).index_copy(1, dest, x) for x in (qf, kf, vf, gf, bf)]
        starts = {
            fc: (h0[n : n + 1] if h0 is not None else qf.new_zeros(1, HV, K, V)) for n, fc in enumerate(first_chunk)
        }
        ends = [fc + n - 1 for fc, n in zip(first_chunk, n_chunks)]
    # -> [R, NC, HV, C, D] and beta [R, NC, HV, C]
    qc, kc, vc, gc = (x.reshape(R, NC, C, HV, x.shape[-1]).transpose(2, 3).contiguous() for x in tensors[:4])
    bc = tensors[4].reshape(R, NC, C, HV).transpose(2, 3).contiguous()

    G = gc.cumsum(-2)
    eG = G.exp()
    Mkk, P = _decay_grams(kc, G, kc, qc)  # P: inclusive qk products
    A = (bc.unsqueeze(-1) * Mkk).tril(-1)
    L = A + torch.eye(C, dtype=acc, device=dev)
    bcol = bc.unsqueeze(-1)
    Wm = torch.linalg.solve_triangular(L, bcol * kc * eG, upper=False, unitriangular=True)
    Um = torch.linalg.solve_triangular(L, bcol * vc, upper=False, unitriangular=True)
    Qg = qc * eG
    G_last = G[..., -1:, :]
    Kd = (kc * (G_last - G).exp()).transpose(-1, -2)  # [R, NC, HV, K, C]
    decay_last = G_last.transpose(-1, -2).exp()  # [R, NC, HV, K, 1]

    outs, finals = [], []
    S = None
    for c in range(NC):
        if c in starts:
            S = starts[c]
        delta = Um[:, c] - Wm[:, c] @ S
        outs.append(Qg[:, c] @ S + P[:, c] @ delta)
        S = decay_last[:, c] * S + Kd[:, c] @ delta
        if c in ends:
            finals.append(S)
    o = torch.stack(outs, dim=1).transpose(2, 3).reshape(R, NC * C, HV, V)
    o = o[:, :T] if dest is None else o.index_select(1, dest)
    final_state = torch.cat(finals, 0) if output_final_state else None
    return o.to(q.dtype), final_state


def kda_recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of KDA (pure torch, differentiable), for N sequences at once.

    Args:
        q, k: ``[N, H, K]``; v: ``[N, HV, V]``; g: ``[N, HV, K]`` log-decay; beta: ``[N, HV]``.
        state: ``[N, HV, K, V]`` K-first (fp32/fp64) or None for zeros.

    Returns ``(o [N, HV, V] in q.dtype, new_state [N, HV, K, V] fp32/fp64)``; equivalent to
    :func:`kda_reference` on ``T = 1``.
    """
    if q.ndim != 3:
        raise ValueError(f"kda_recurrent_step: q must be [N, H, K], got {list(q.shape)}")
    _check_kda_inputs(
        q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], state, None, scale, "kda_recurrent_step"
    )
    N, H, K = q.shape
    HV = v.shape[1]
    if scale is None:
        scale = K**-0.5
    acc = accumulation_dtype(q, k, v, g, beta, state)
    qf, kf = q.to(acc), k.to(acc)
    if use_qk_l2norm:
        qf, kf = l2_normalize(qf), l2_normalize(kf)
    if HV != H:
        qf, kf = qf.repeat_interleave(HV // H, dim=1), kf.repeat_interleave(HV // H, dim=1)
    qf = qf * scale
    S = state.to(acc) if state is not None else qf.new_zeros(N, HV, K, v.shape[-1])
    S = g.to(acc).exp().unsqueeze(-1) * S
    err = v.to(acc) - (kf.unsqueeze(-1) * S).sum(-2)  # v - S^T k
    S = S + kf.unsqueeze(-1) * (beta.to(acc).unsqueeze(-1) * err).unsqueeze(-2)
    o = (qf.unsqueeze(-1) * S).sum(-2)
    return o.to(q.dtype), S


def kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    safe_gate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA forward (and backward), dispatched by device.

    Args:
        q, k: ``[B, T, H, K]`` (raw; L2-normalised inside when ``use_qk_l2norm``), K <= 256.
        v: ``[B, T, HV, V]`` with ``HV % H == 0`` (GVA).
        g: ``[B, T, HV, K]`` log-space decay (<= 0), e.g. from :func:`kda_gate`.
        beta: ``[B, T, HV]``, already in (0, 1) (post-sigmoid).
        scale: defaults to ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` float32, K-first.
        output_final_state: return the ``[N, HV, K, V]`` fp32 state after each sequence.
        cu_seqlens: ``[N+1]`` cumulative lengths of packed sequences (B must be 1).
        cu_seqlens_cpu: the same on the host (optional), read instead of ``cu_seqlens`` on the host side.
        use_qk_l2norm: L2-normalise q and k (eps 1e-6 inside the sqrt, as fla).
        safe_gate: CUDA only, a speed hint forwarded to ``chunk_kda``: set it only when every g
            lies in ``[-5, 0)`` (``kda_gate(..., lower_bound)`` with ``lower_bound >= -5``).

    Dispatch: CUDA tensors use fla's ``chunk_kda`` when autograd is recording for any input or
    T > 64, and ``fused_recurrent_kda`` (no autograd) for short inference calls such as decode;
    other devices, and float64 on CUDA (fla's kernels accumulate in fp32), use :func:`kda_reference`.

    Returns ``(o [B, T, HV, V] in q.dtype, final_state or None)``.
    """
    B, T, H, K, HV, V, N, bounds, scale = _check_kda_inputs(
        q, k, v, g, beta, initial_state, cu_seqlens, scale, "kda", cu_seqlens_cpu
    )
    if not q.is_cuda or q.dtype == torch.float64:
        if q.shape[1] == 1 and cu_seqlens is None:  # decoding: one recurrent step, not a padded 64-token chunk
            o, state = kda_recurrent_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], initial_state, scale=scale,
                                          use_qk_l2norm=use_qk_l2norm)
            return o[:, None], state if output_final_state else None
        return kda_reference(
            q,
            k,
            v,
            g,
            beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            use_qk_l2norm=use_qk_l2norm,
        )
    if initial_state is not None and initial_state.dtype != torch.float32:
        raise ValueError(f"kda: initial_state must be float32 for the fla kernels, got {initial_state.dtype}")
    use_fixed_configs()  # launch configs recorded for this GPU instead of autotuning
    from fla.ops.kda import chunk_kda, fused_recurrent_kda

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, beta, initial_state)
    )
    if needs_grad or T > DECODE_MAX_TOKENS:
        o, final_state = chunk_kda(
            q=q,
            k=k,
            v=v,
            g=g,
            beta=beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm,
            safe_gate=safe_gate,
            cu_seqlens=cu_seqlens,
            cu_seqlens_cpu=cu_seqlens_cpu,
        )
    else:
        o, final_state = fused_recurrent_kda(
            q=q,
            k=k,
            v=v,
            g=g,
            beta=beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm,
            cu_seqlens=cu_seqlens,
        )
    return o.to(q.dtype), final_state


def beta_from_logits(beta_logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """β = σ(logits) in the accumulation dtype (float64 stays float64: the CPU and CUDA float64 paths must not
    meet at a float32 rounding, whose last bit differs between devices), returned in ``dtype``."""
    return torch.sigmoid(beta_logits.to(accumulation_dtype(beta_logits))).to(dtype)


def kda_from_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    f: torch.Tensor,
    beta_logits: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    lower_bound: float | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA from the layer's raw projections: decay from ``f`` [B, T, HV*K] via :func:`kda_gate` and
    β = σ(``beta_logits`` [B, T, HV]). The same function as ``kda(q, k, v, kda_gate(f, …), σ(β))``; on CUDA
    training/prefill the gate and the sigmoid run inside fla's ``chunk_kda`` (as fla's own layer does),
    which saves the fp32 [B, T, HV, K] decay tensor and its backward pass. ``cu_seqlens_cpu``: as in :func:`kda`."""
    B, T = q.shape[:2]
    HV = v.shape[2]
    if beta_logits.shape != (B, T, HV):
        raise ValueError(f"kda_from_logits: beta_logits must be [B, T, HV]=[{B}, {T}, {HV}], got {list(beta_logits.shape)}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, f, beta_logits, A_log, dt_bias))
    if not (q.is_cuda and q.dtype != torch.float64 and (needs_grad or T > DECODE_MAX_TOKENS)):
        g = kda_gate(f, A_log, dt_bias, lower_bound=lower_bound)
        return kda(q, k, v, g, beta_from_logits(beta_logits, q.dtype), scale=scale,
                   initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                   cu_seqlens_cpu=cu_seqlens_cpu)
    K = q.shape[-1]
    if f.shape != (B, T, HV * K):
        raise ValueError(f"kda_from_logits: f must be [B, T, HV*K]=[{B}, {T}, {HV * K}], got {list(f.shape)}")
    _check_kda_inputs(q, k, v, f.view(B, T, HV, K), beta_logits, initial_state, cu_seqlens, scale, "kda_from_logits",
                      cu_seqlens_cpu)
    use_fixed_configs()  # launch configs recorded for this GPU instead of autotuning
    from fla.ops.kda import chunk_kda

    # V-first states, exactly the kernel variant fla's own KimiDeltaAttention compiles (one Triton build
    # serves both); our API keeps K-first states.
    o, final_state = chunk_kda(
        q=q, k=k, v=v, g=f.view(B, T, HV, K), beta=beta_logits, A_log=A_log, dt_bias=dt_bias, scale=scale,
        initial_state=None if initial_state is None else initial_state.transpose(-1, -2).contiguous(),
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
        use_beta_sigmoid_in_kernel=True, safe_gate=lower_bound is not None, lower_bound=lower_bound,
        state_v_first=True, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)
    return o.to(q.dtype), None if final_state is None else final_state.transpose(-1, -2)
