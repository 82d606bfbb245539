"""gpt-oss MoE math: router (bias, top-k over raw logits, softmax over the k selected) and the clamped
SwiGLU ((up + 1)·gate·σ(α·gate), gate ≤ limit, |up| ≤ limit) with expert biases."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


def router_topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] → (weights [N, k], expert indices [N, k]); the softmax runs in the logits' dtype, as
    gpt-oss does."""
    if not 0 < top_k <= logits.shape[-1]:
        raise ValueError(f"top_k={top_k} must be in 1..{logits.shape[-1]} (number of experts)")
    top_values, top_indices = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(top_values, dim=-1), top_indices


def clamped_swiglu(
    gate: torch.Tensor, up: torch.Tensor, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT
) -> torch.Tensor:
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(alpha * gate))


def clamped_swiglu_interleaved(gate_up: torch.Tensor, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT):
    """HF/gpt-oss layout: gate in the even, up in the odd columns."""
    return clamped_swiglu(gate_up[..., 0::2], gate_up[..., 1::2], alpha, limit)


def clamped_swiglu_stacked(gate_up: torch.Tensor, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT):
    """Megatron layout: [gate; up] halves of the last dim."""
    gate, up = gate_up.chunk(2, dim=-1)
    return clamped_swiglu(gate, up, alpha, limit)


def experts_forward(
    x: torch.Tensor,
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down_proj: torch.Tensor,
    down_bias: torch.Tensor,
    alpha: float = SWIGLU_ALPHA,
    limit: float = SWIGLU_LIMIT,
) -> torch.Tensor:
    """x [N, H]; HF weight layout gate_up_proj [E, H, 2I] (interleaved), down_proj [E, I, H].
    Tokens are grouped per expert so each expert runs one matmul over the tokens routed to it."""
    num_tokens, top_k = expert_indices.shape
    flat_experts = expert_indices.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    token_of = order // top_k
    counts = torch.bincount(flat_experts, minlength=gate_up_proj.shape[0]).tolist()
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start : start + count]
        tokens = token_of[start : start + count]
        start += count
        hidden = F.linear(x[tokens], gate_up_proj[expert].t(), gate_up_bias[expert])
        y = F.linear(clamped_swiglu_interleaved(hidden, alpha, limit), down_proj[expert].t(), down_bias[expert])
        weights = expert_weights.reshape(-1)[rows, None]
        out.index_add_(0, tokens, (y * weights).to(x.dtype))
    return out
