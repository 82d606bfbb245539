"""Softmax attention with learned sinks (gpt-oss), sliding-window or full causal, GQA, packed documents.

p_ij = exp(ℓ_ij) / (exp(s_h) + Σ_j' exp(ℓ_ij')), ℓ = scaled, masked q·k; the sink logit s_h is not scaled.
A sliding window of W keeps W keys including the current one (q − W < k ≤ q).

Layout is [B, T, H, D]. Queries are the last Tq positions of the Tk keys: Tq == Tk when training, Tq < Tk
when decoding against a cache or attending to earlier context-parallel chunks. ``cu_seqlens`` (B = 1, packed;
boundaries of the Tk key positions) keeps attention inside each document; ``cu_seqlens_cpu``, the same boundaries
on the host, spares the flex path reading them back from the GPU.
``key_mask`` [B, Tk] (bool) hides padding keys of left-padded batches; a query always sees itself, so a
padding query's row stays finite (its output is discarded) and no NaN reaches the valid rows through V.
On CUDA the fast path is FlexAttention with a block-sparse mask, the sinks folded in through the
log-sum-exp (o·σ(lse − s)); on CPU an exact query-blocked reference computes in fp32.
"""

from __future__ import annotations

import functools

import torch

from ..host_syncs import to_device_async

REFERENCE_QUERY_BLOCK = 256


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] index of the document each packed position belongs to."""
    if cu_seqlens[0].item() != 0 or cu_seqlens[-1].item() != total:
        raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} must start at 0 and end at the packed length {total}")
    positions = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def _check_shapes(q, k, v, sinks, cu_seqlens, key_mask=None):
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q [B,Tq,Hq,D] and k, v [B,Tk,Hkv,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Tq, Hq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or k.shape[1] < Tq:
        raise ValueError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} (keys must cover the queries)")
    if Hq % k.shape[2]:
        raise ValueError(f"{Hq} query heads are not a multiple of {k.shape[2]} key/value heads")
    if sinks is not None and sinks.shape != (Hq,):
        raise ValueError(f"sinks has shape {tuple(sinks.shape)}, expected [{Hq}] (one per query head)")
    if cu_seqlens is not None and B != 1:
        raise ValueError("cu_seqlens (packed documents) needs batch 1")
    if key_mask is not None and (key_mask.shape != (B, k.shape[1]) or key_mask.dtype != torch.bool):
        raise ValueError(f"key_mask must be bool [B, Tk] = [{B}, {k.shape[1]}]; got {key_mask.dtype} {tuple(key_mask.shape)}")


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor | None,
    *,
    scale: float | None = None,
    window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention output [B, Tq, Hq, D]. ``sinks`` None gives plain softmax attention.

    backend: "auto" (flex on CUDA for unpadded prefill/training, reference otherwise), "flex" or "reference".
    """
    _check_shapes(q, k, v, sinks, cu_seqlens, key_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "auto":
        backend = "flex" if q.is_cuda and q.shape[1] >= 128 and key_mask is None else "reference"
    if backend == "flex":
        if key_mask is not None:
            raise ValueError("the flex backend takes no key_mask (padded batches run on the reference backend)")
        return _flex_sink_attention(q, k, v, sinks, scale, window,
                                    cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu)
    if backend == "reference":
        return sink_attention_reference(q, k, v, sinks, scale=scale, window=window, cu_seqlens=cu_seqlens,
                                        key_mask=key_mask)
    raise ValueError(f"unknown attention backend {backend!r}; use auto, flex or reference")


def sink_attention_reference(q, k, v, sinks, *, scale, window=None, cu_seqlens=None, key_mask=None):
    """Exact attention with sinks, fp32 (fp64 for fp64 inputs) math, queries in blocks so that a sliding
    window only touches the keys it can see."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    offset = Tk - Tq
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    docs = document_ids(cu_seqlens, Tk) if cu_seqlens is not None else None
    q_grouped = q.reshape(B, Tq, Hkv, group, D)
    outputs = []
    for start in range(0, Tq, REFERENCE_QUERY_BLOCK):
        stop = min(Tq, start + REFERENCE_QUERY_BLOCK)
        k_lo = 0 if window is None else max(0, start + offset - window + 1)
        k_hi = stop + offset
        qb = q_grouped[:, start:stop].to(compute)
        kb = k[:, k_lo:k_hi].to(compute)
        vb = v[:, k_lo:k_hi].to(compute)
        logits = torch.einsum("bqhgd,bkhd->bhgqk", qb, kb) * scale
        q_pos = torch.arange(start, stop, device=q.device) + offset
        k_pos = torch.arange(k_lo, k_hi, device=q.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            allowed &= q_pos[:, None] - k_pos[None, :] < window
        if docs is not None:
            allowed &= docs[q_pos][:, None] == docs[k_pos][None, :]
        if key_mask is not None:  # [B, 1, 1, q, k]; a query always sees itself (finite padding rows)
            allowed = allowed & (key_mask[:, None, None, None, k_lo:k_hi] | (k_pos[None, :] == q_pos[:, None]))
        logits = logits.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            sink = sinks.to(compute).reshape(1, Hkv, group, 1, 1).expand(B, Hkv, group, stop - start, 1)
            probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(logits, dim=-1)
        out = torch.einsum("bhgqk,bkhd->bqhgd", probs, vb)
        outputs.append(out.reshape(B, stop - start, Hq, D))
    return torch.cat(outputs, dim=1).to(q.dtype)


try:  # torch ≥ 2.9 asks for the log-sum-exp through AuxRequest; older versions through return_lse
    from torch.nn.attention.flex_attention import AuxRequest

    _LSE_REQUEST = {"return_aux": AuxRequest(lse=True)}
except ImportError:
    _LSE_REQUEST = {"return_lse": True}


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=None: the first shape gets a static kernel (training's one packed length); the first other length
    # recompiles once with the length symbolic. Past dynamo's recompile limit flex_attention runs eagerly and
    # materialises the [T, T] scores (64 GiB at 32k tokens): dynamic=False recompiled per prompt length, and one
    # evaluation process still compiles a kernel per mask and model variant (window or none, the student's and the
    # teacher's scale and head grouping, static then dynamic), more than the default 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=None)


def flex_attention_used() -> bool:
    """Whether this process has run the FlexAttention path (its compiled kernel was built), for reports."""
    return _compiled_flex_attention.cache_info().currsize > 0


@functools.lru_cache(maxsize=64)
def _block_mask(q_len: int, kv_len: int, window: int | None, boundaries: tuple[int, ...] | None, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = kv_len - q_len
    docs = None
    if boundaries:  # computed on the host and copied without waiting for the GPU (blocking copies wait for it)
        docs = to_device_async(document_ids(torch.tensor(boundaries), kv_len), device)

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        keep = kv_idx <= q_pos
        if window is not None:
            keep = keep & (q_pos - kv_idx < window)
        if docs is not None:
            keep = keep & (docs[q_pos] == docs[kv_idx])
        return keep

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)


def _flex_sink_attention(q, k, v, sinks, scale, window, cu_seqlens):
    boundaries = tuple(cu_seqlens.tolist()) if cu_seqlens is not None else None
    mask = _block_mask(q.shape[1], k.shape[1], window, boundaries, str(q.device))
    out, lse = _compiled_flex_attention()(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        block_mask=mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2], **_LSE_REQUEST,
    )
    lse = getattr(lse, "lse", lse)  # newer torch returns an aux record
    if sinks is not None:
        # Adding exp(s) to the denominator rescales the sink-free output by Σexp(ℓ)/(Σexp(ℓ)+exp(s)) = σ(lse − s).
        out = out * torch.sigmoid(lse - sinks.float()[None, :, None]).unsqueeze(-1).to(out.dtype)
    return out.transpose(1, 2)

