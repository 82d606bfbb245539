"""Each attention layer composed once: projections → factors → rotation → attention or recurrence → gate/norm →
output, as functions over parameters and projection callables.

The two realizations call these with their own parameters: the HF student (``student/modeling.py``: all heads,
a decoding cache) and the Megatron-Core modules (``megatron/attention.py``: this rank's heads, with the
tensor-parallel entry before and the row-parallel ``o_proj`` as ``o_proj``). Head counts follow from the
parameters, so both pass their local shapes unchanged.

``extend`` (softmax and SWA+TPA) is the cache hook: it receives this call's per-position tensors [B, T, ...] and
their padding flags, and returns them with the cached positions in front (storing what later queries can still
see) and the attention key mask over them (None: no key is padding); None: no cache. KDA's cache is its
recurrent and short-conv states (``state`` in, the new states out). ``valid`` [B, T] (bool) marks the real
tokens of a left-padded batch (None: all real): padding keys are masked, and padding enters neither KDA's short
convolutions nor its state.
``cu_seqlens_cpu``: the packed documents' boundaries ``cu_seqlens`` also on the host (optional; read once per
micro-batch): every host-side use (checks, the attention block mask, fla's chunk tables) reads it, so no layer
reads ``cu_seqlens`` back from the GPU.
``cp`` (``ops.context_parallel.ContextParallel``): x is this rank's contiguous chunk [1, L, hidden] of one packed
sequence split over a context-parallel group (its documents in ``cp``, so ``cu_seqlens`` stays None); sliding
windows take the previous rank's last window − 1 positions (a halo), KDA its state chain, full attention the
all-gathered keys and values. Training only: no cache, no padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .attention import sink_attention
from .context_parallel import (ContextParallel, gather_sequence, kda_from_logits_context_parallel,
                               pad_queries_for_halo, short_conv_context_parallel, sliding_window_halo)
from .kda import causal_short_conv, kda_from_logits
from .norm import gated_rms_norm
from .rope import apply_rotary, rotation
from .tpa import TpaProjection, tpa_combine, tpa_factors

Projection = Callable[[torch.Tensor], torch.Tensor]
Extend = Callable[[dict[str, torch.Tensor], torch.Tensor | None], tuple[dict[str, torch.Tensor], torch.Tensor | None]]


def softmax_sink_layer(x: torch.Tensor, q_proj: Projection, k_proj: Projection, v_proj: Projection,
                       o_proj: Projection, sinks: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                       head_dim: int, window: int | None, cu_seqlens: torch.Tensor | None = None,
                       cu_seqlens_cpu: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                       extend: Extend | None = None, backend: str = "auto",
                       cp: ContextParallel | None = None) -> torch.Tensor:
    """gpt-oss attention: GQA + learned sinks + RoPE (cos/sin of this call's positions), over ``window`` keys
    (None: full causal). x [B, T, hidden] → o_proj(o [B, T, H·D])."""
    B, T, _ = x.shape
    q = apply_rotary(q_proj(x).view(B, T, -1, head_dim), cos, sin)
    k = apply_rotary(k_proj(x).view(B, T, -1, head_dim), cos, sin)
    v = v_proj(x).view(B, T, -1, head_dim)
    if cp is not None and window is None:
        o = _full_attention_context_parallel(q, k, v, sinks, cp, cu_seqlens, valid, extend, backend)
        return o_proj(o.reshape(B, T, -1))
    if cp is not None:
        o = _sliding_attention_context_parallel(q, {"k": k, "v": v}, lambda kv: (kv["k"], kv["v"]), sinks, window,
                                                cp, cu_seqlens, valid, extend, backend)
        return o_proj(o.reshape(B, T, -1))
    key_mask = valid
    if extend is not None:
        kv, key_mask = extend({"k": k, "v": v}, valid)
        k, v = kv["k"], kv["v"]
    o = sink_attention(q, k, v, sinks, window=window, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu,
                       key_mask=key_mask, backend=backend)
    return o_proj(o.reshape(B, T, -1))


def _check_context_parallel_call(cu_seqlens, valid, extend) -> None:
    if cu_seqlens is not None or valid is not None or extend is not None:
        raise ValueError("context parallelism takes the documents from cp (cu_seqlens None), no padding (valid) and "
                         "no cache (extend)")


def _full_attention_context_parallel(q, k, v, sinks, cp, cu_seqlens, valid, extend, backend):
    """Full causal attention of this rank's queries over the all-gathered keys and values up to its chunk's end."""
    _check_context_parallel_call(cu_seqlens, valid, extend)
    end = cp.start + cp.local_len
    k, v = (gather_sequence(t, cp)[:, :end] for t in (k, v))
    bounds = torch.tensor([b for b in cp.bounds if b < end] + [end], dtype=torch.int32, device=q.device)
    return sink_attention(q, k, v, sinks, cu_seqlens=bounds, backend=backend)


def _sliding_attention_context_parallel(q, per_position, keys_values, sinks, window, cp, cu_seqlens, valid, extend,
                                        backend):
    """Sliding-window attention of this rank's queries over its keys and the previous rank's last window − 1
    (``per_position`` tensors, exchanged before ``keys_values`` turns them into k, v)."""
    _check_context_parallel_call(cu_seqlens, valid, extend)
    extended, bounds = sliding_window_halo(per_position, cp, window)
    k, v = keys_values(extended)
    o = sink_attention(pad_queries_for_halo(q, window - 1), k, v, sinks, window=window, cu_seqlens=bounds,
                       backend=backend)
    return o[:, window - 1:]


def swa_tpa_layer(x: torch.Tensor, q: Projection | TpaProjection, k: TpaProjection, v: TpaProjection,
                  o_proj: Projection, sinks: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, head_dim: int,
                  window: int, plane_skew: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                  cu_seqlens_cpu: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                  extend: Extend | None = None, backend: str = "auto",
                  cp: ContextParallel | None = None) -> torch.Tensor:
    """Sliding-window attention with sinks whose K, V (and Q when ``q`` is a ``TpaProjection``; else a plain
    projection) are tensor products (1/R)·Σ_r a_r(x) ⊗ b_r(x). The rotation (RoPE, or GRAPE-M: cos/sin at the
    layer's frequencies and an optional learned ``plane_skew``) acts on the B factors; the cache holds the
    rotated factors, not the per-head K/V."""
    B, T, _ = x.shape
    rotate = rotation(cos, sin, plane_skew)
    if isinstance(q, TpaProjection):
        q_a, q_b = tpa_factors(x, q, head_dim)
        q = tpa_combine(q_a, rotate(q_b))
    else:
        q = rotate(q(x).view(B, T, -1, head_dim))
    k_a, k_b = tpa_factors(x, k, head_dim)
    v_a, v_b = tpa_factors(x, v, head_dim)
    factors = {"k_a": k_a, "k_b": rotate(k_b), "v_a": v_a, "v_b": v_b}
    if cp is not None:  # the halo carries the (rotated) factors, R·(H + D) numbers a position instead of 2·H·D
        o = _sliding_attention_context_parallel(
            q, factors, lambda f: (tpa_combine(f["k_a"], f["k_b"]), tpa_combine(f["v_a"], f["v_b"])), sinks,
            window, cp, cu_seqlens, valid, extend, backend)
        return o_proj(o.reshape(B, T, -1))
    key_mask = valid
    if extend is not None:
        factors, key_mask = extend(factors, valid)
    k = tpa_combine(factors["k_a"], factors["k_b"])
    v = tpa_combine(factors["v_a"], factors["v_b"])
    o = sink_attention(q, k, v, sinks, window=window, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu,
                       key_mask=key_mask, backend=backend)
    return o_proj(o.reshape(B, T, -1))


def kda_layer(x: torch.Tensor, q_proj: Projection, k_proj: Projection, v_proj: Projection,
              conv_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor], forget_proj: Projection,
              beta_proj: Projection, A_log: torch.Tensor, dt_bias: torch.Tensor, gate_proj: Projection,
              o_norm_weight: torch.Tensor, o_proj: Projection, *, head_dim: int, lower_bound: float | None,
              eps: float, cu_seqlens: torch.Tensor | None = None, cu_seqlens_cpu: torch.Tensor | None = None,
              valid: torch.Tensor | None = None, state: dict[str, torch.Tensor] | None = None,
              output_final_state: bool = False,
              cp: ContextParallel | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Kimi Delta Attention (fla 0.6.0 layout) with biased projections: q, k, v = SiLU(ShortConv(proj(x)));
    decay from the low-rank ``forget_proj`` (f_b·f_a), A_log and dt_bias; β = σ(``beta_proj``(x));
    out = o_proj(RMSNorm_head(KDA(q, k, v)) ⊙ σ(``gate_proj``(x))). ``state``: the cached
    ``{q,k,v}_conv`` and ``recurrent`` states (None: start empty); returns (out, the final states when
    ``output_final_state``, else None)."""
    B, T, _ = x.shape
    projected = (q_proj(x), k_proj(x), v_proj(x))
    if cp is not None:
        if cu_seqlens is not None or valid is not None or state is not None or output_final_state:
            raise ValueError("kda_layer: context parallelism takes the documents from cp (cu_seqlens None), no "
                             "padding (valid) and no cache (state, output_final_state)")
        q, k, v = (short_conv_context_parallel(p, w, cp, activation="silu").view(B, T, -1, head_dim)
                   for p, w in zip(projected, conv_weights))
        o = kda_from_logits_context_parallel(q, k, v, forget_proj(x), beta_proj(x), A_log, dt_bias, cp,
                                             lower_bound=lower_bound)
    else:
        if valid is not None:  # padding is zero before the convs: it reaches neither their windows nor the state (k = 0)
            projected = tuple(p * valid[..., None].to(p.dtype) for p in projected)
        convolved, conv_states = [], []
        for name, p, weight in zip("qkv", projected, conv_weights):
            y, final = causal_short_conv(
                p, weight, activation="silu", cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu,
                initial_state=None if state is None else state[f"{name}_conv"], output_final_state=output_final_state)
            convolved.append(y.view(B, T, -1, head_dim))
            conv_states.append(final)
        q, k, v = convolved
        o, recurrent = kda_from_logits(
            q, k, v, forget_proj(x), beta_proj(x), A_log, dt_bias, lower_bound=lower_bound,
            initial_state=None if state is None else state["recurrent"], output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)
    o = gated_rms_norm(o, o_norm_weight, gate_proj(x).view(o.shape), eps)
    out = o_proj(o.reshape(B, T, -1).to(x.dtype))
    if not output_final_state:
        return out, None
    return out, {"q_conv": conv_states[0], "k_conv": conv_states[1], "v_conv": conv_states[2], "recurrent": recurrent}
