"""RMSNorm as gpt-oss computes it (fp32, the weight applied before casting back), and KDA's gated per-head
RMSNorm (fla's ``FusedRMSNormGated``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import use_fixed_configs


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * x).to(dtype)


def accumulation_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64, otherwise float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def gated_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    gate: torch.Tensor,
    eps: float = 1e-5,
    activation: str = "sigmoid",
) -> torch.Tensor:
    """``rmsnorm(x) * weight * act(gate)`` over the last dim (per head), fp32 math, returns x.dtype.

    ``rmsnorm(x) = x / sqrt(mean(x**2, -1) + eps)``; ``act`` is ``sigmoid`` (KDA's output gate) or
    ``swish``/``silu`` (``gate * sigmoid(gate)``). Matches fla's
    ``FusedRMSNormGated(D, eps=eps, activation=activation)``. ``weight`` is ``[D]`` or None.
    """
    if gate.shape != x.shape:
        raise ValueError(f"gated_rms_norm: gate shape {list(gate.shape)} != x shape {list(x.shape)}")
    if weight is not None and weight.shape != x.shape[-1:]:
        raise ValueError(f"gated_rms_norm: weight must have shape [{x.shape[-1]}], got {list(weight.shape)}")
    if activation not in ("sigmoid", "swish", "silu"):
        raise ValueError(f"gated_rms_norm: unsupported activation {activation!r}")
    if x.is_cuda and x.dtype != torch.float64:
        use_fixed_configs()  # launch configs recorded for this GPU instead of autotuning
        from fla.modules.fused_norm_gate import rms_norm_gated

        return rms_norm_gated(x, gate, weight, None, activation=activation, eps=eps)
    acc = accumulation_dtype(x, weight, gate)
    xf, gf = x.to(acc), gate.to(acc)
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(acc)
    y = y * (torch.sigmoid(gf) if activation == "sigmoid" else F.silu(gf))
    return y.to(x.dtype)
