"""Tensor Product Attention (arXiv 2501.06425) factors, and their initialisation from gpt-oss's GQA.

Per token, a projection with rank R is X = (1/R)·Σ_r a_r ⊗ b_r ∈ R^{H×D} with a head factor
a(x) = A0 + W_A·x (A0 constant, W_A contextual) and a token factor b(x) = W_B·x + b_B. RoPE acts on the D
axis, so it is applied to the B factors only (TPA Theorem 3.1).

GQA is TPA with constant head factors: with R = G (KV groups), A0[g, h] = G·[h in group g] and W_B, b_B the
k/v projection rows of group g, the product is exactly the teacher's per-head k/v, so a student starts at
the teacher when W_A = 0. Lower ranks come from an SVD of the per-head projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch


def tpa_combine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., R, H], b [..., R, D] → [..., H, D] = (1/R)·Σ_r a_r ⊗ b_r."""
    rank = a.shape[-2]
    if b.shape[-2] != rank:
        raise ValueError(f"head factor has rank {rank} but token factor has rank {b.shape[-2]}")
    return torch.einsum("...rh,...rd->...hd", a, b) / rank


class TpaProjection(NamedTuple):
    """One TPA projection's parameters: the constant head factor A0 [R, H], the contextual head factor
    W_A (a callable x → [..., R·H]; None: non-contextual TPA) and the token factor W_B (x → [..., R·D])."""

    a0: torch.Tensor
    a_proj: Callable[[torch.Tensor], torch.Tensor] | None
    b_proj: Callable[[torch.Tensor], torch.Tensor]


def named_projection(module, name: str, rank: int | None) -> TpaProjection | Callable[[torch.Tensor], torch.Tensor]:
    """The ``name`` (q, k or v) projection of an SWA+TPA module of either realization, by the parameter names
    both share (so the converters map them by name): ``{name}_a0``, ``{name}_a_proj``, ``{name}_b_proj`` when
    factored (``rank`` set), else the plain ``{name}_proj``."""
    if rank is None:
        return getattr(module, f"{name}_proj")
    return TpaProjection(getattr(module, f"{name}_a0"), getattr(module, f"{name}_a_proj"), getattr(module, f"{name}_b_proj"))


def tpa_factors(x: torch.Tensor, proj: TpaProjection, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, hidden] → head factor a = A0 + W_A·x [B, T, R, H] and token factor b = W_B·x + b_B [B, T, R, D]."""
    B, T, _ = x.shape
    rank, heads = proj.a0.shape
    a = proj.a0.to(x.dtype).expand(B, T, rank, heads)
    if proj.a_proj is not None:
        a = a + proj.a_proj(x).view(B, T, rank, heads)
    return a, proj.b_proj(x).view(B, T, rank, head_dim)


@dataclass
class TpaInit:
    """Factors for one projection: A0 [R, H], W_B [R·D, hidden], b_B [R·D] and the relative Frobenius error
    of the rank-R product against the teacher's per-head projection (weights and bias together)."""

    a0: torch.Tensor
    b_weight: torch.Tensor
    b_bias: torch.Tensor
    relative_error: float


def tpa_from_gqa(weight: torch.Tensor, bias: torch.Tensor, num_heads: int, head_dim: int) -> TpaInit:
    """Exact TPA factors of a GQA projection: weight [G·D, hidden], bias [G·D] with G groups serving
    num_heads query heads. Rank R = G."""
    groups = weight.shape[0] // head_dim
    if weight.shape[0] != groups * head_dim or num_heads % groups:
        raise ValueError(f"projection with {weight.shape[0]} rows is not G·{head_dim} for G dividing {num_heads} heads")
    per_group = num_heads // groups
    a0 = torch.zeros(groups, num_heads, dtype=torch.float32)
    for g in range(groups):
        a0[g, g * per_group : (g + 1) * per_group] = groups  # cancels the 1/R of the product
    return TpaInit(a0, weight.clone(), bias.clone(), 0.0)


def tpa_from_heads_svd(
    weight: torch.Tensor, bias: torch.Tensor, num_heads: int, head_dim: int, rank: int
) -> TpaInit:
    """Rank-R TPA factors of a projection whose rows give `num_heads` heads (a GQA projection is first
    expanded to its query heads), by truncated SVD of the head-unfolded [H, D·(hidden+1)] matrix."""
    hidden = weight.shape[1]
    groups = weight.shape[0] // head_dim
    if num_heads % groups:
        raise ValueError(f"{groups} projected heads do not divide {num_heads} query heads")
    per_head = torch.cat([weight.double(), bias.double()[:, None]], dim=1).reshape(groups, head_dim * (hidden + 1))
    per_head = per_head.repeat_interleave(num_heads // groups, dim=0)  # [H, D·(hidden+1)]
    max_rank = min(per_head.shape)
    if not 0 < rank <= max_rank:
        raise ValueError(f"TPA rank {rank} must be in 1..{max_rank}")
    u, s, vh = torch.linalg.svd(per_head, full_matrices=False)
    a0 = (u[:, :rank] * rank).t()  # [R, H]; ×R cancels the 1/R of the product
    b = (s[:rank, None] * vh[:rank]).reshape(rank, head_dim, hidden + 1)
    approx = a0.t() @ b.reshape(rank, -1) / rank
    error = (torch.linalg.norm(approx - per_head) / torch.linalg.norm(per_head)).item()
    b_weight = b[..., :hidden].reshape(rank * head_dim, hidden)
    b_bias = b[..., hidden].reshape(rank * head_dim)
    return TpaInit(a0.float(), b_weight.to(weight.dtype), b_bias.to(bias.dtype), error)
