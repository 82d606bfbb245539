"""Rotary position encodings: gpt-oss's YaRN RoPE and GRAPE-M.

Conventions (gpt-oss / HF ``rotate_half``): the head dim is split in halves x1 = x[..., :D/2], x2 = x[..., D/2:],
o1 = x1·cos − x2·sin, o2 = x2·cos + x1·sin, and cos/sin carry YaRN's concentration factor
(0.1·ln(factor) + 1 ≈ 1.3466 for gpt-oss), so q·k logits gain its square.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class YarnRope:
    head_dim: int
    theta: float = 150000.0
    factor: float = 32.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = False

    @classmethod
    def from_hf_config(cls, config) -> "YarnRope":
        params = dict(getattr(config, "rope_parameters", None) or {})
        if not params:  # transformers < 5 keeps them apart
            params = dict(getattr(config, "rope_scaling", None) or {})
            params.setdefault("rope_theta", getattr(config, "rope_theta", None))
        if params.get("rope_type", params.get("type")) != "yarn":
            raise ValueError(f"rope parameters {params} are not yarn; gpt-oss uses yarn RoPE")
        return cls(
            head_dim=config.head_dim,
            theta=float(params["rope_theta"]),
            factor=float(params["factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            truncate=bool(params.get("truncate", True)),
        )

    @property
    def concentration(self) -> float:
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0

    def correction_range(self) -> tuple[float, float]:
        def dim_for(rotations: float) -> float:
            wavelength_ratio = self.original_max_position_embeddings / (rotations * 2 * math.pi)
            return self.head_dim * math.log(wavelength_ratio) / (2 * math.log(self.theta))

        low, high = dim_for(self.beta_fast), dim_for(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0.0), min(high, self.head_dim - 1.0)

    def inv_freq(self) -> torch.Tensor:
        """fp32 [head_dim/2]: high-frequency planes keep θ^(-2i/d), low-frequency ones are divided by `factor`,
        with a linear ramp between the correction bounds."""
        half = self.head_dim // 2
        base_freq = self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        low, high = self.correction_range()
        if low == high:
            high += 0.001
        ramp = ((torch.arange(half, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # weight of the original (extrapolated) frequency
        return (1.0 / (self.factor * base_freq)) * (1 - keep) + (1.0 / base_freq) * keep


def token_positions(length: int, device, cu_seqlens: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
    """[length] positions: ``start, start+1, …``, or restarting at 0 in every packed document of ``cu_seqlens``."""
    if cu_seqlens is not None and start:
        raise ValueError("packed documents (cu_seqlens) start at position 0; a cache offset cannot apply")
    ids = torch.arange(start, start + length, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        ids = ids - cu[:-1].repeat_interleave(cu.diff(), output_size=length)  # output_size: no host read
    return ids


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [..., T] (int) → cos, sin (fp32, or fp64 for fp64 frequencies) [..., T, 1, D/2] for shared frequencies (inv_freq [D/2]) or
    [..., T, H, D/2] for per-head frequencies (inv_freq [H, D/2]); ready to broadcast over [..., T, H, D/2]."""
    dtype = torch.promote_types(inv_freq.dtype, torch.float32)  # fp32 as gpt-oss; fp64 stays fp64 for checks
    angles = positions[..., None, None].to(dtype) * inv_freq.to(dtype)
    return angles.cos() * scaling, angles.sin() * scaling


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, H, D] by half-split planes; cos/sin [..., T, 1|H, D/2] (cast to x's dtype as HF does)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def orthogonal_from_skew(skew: torch.Tensor) -> torch.Tensor:
    """A learned plane basis B ∈ SO(d) as exp(S − Sᵀ); S = 0 gives exactly the identity."""
    return torch.linalg.matrix_exp(skew - skew.transpose(-1, -2))


def apply_grape_m(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, basis: torch.Tensor | None = None
) -> torch.Tensor:
    """GRAPE-M (multiplicative, commuting planes): G(n)x = B·R(n)·Bᵀx with R the half-split plane rotations at
    the learnable frequencies baked into cos/sin. Without a basis this is RoPE (GRAPE paper, Prop. 3.1), so
    frequencies initialised to the teacher's YaRN inv_freq reproduce the teacher exactly."""
    if basis is None:
        return apply_rotary(x, cos, sin)
    basis = basis.to(x.dtype)
    return apply_rotary(x @ basis, cos, sin) @ basis.transpose(-1, -2)


def rotation(cos: torch.Tensor, sin: torch.Tensor, plane_skew: torch.Tensor | None = None
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The position map of one forward, built once for q and the K factors: the half-split plane rotations of
    cos/sin (RoPE, or GRAPE-M at its learned frequencies), in the learned plane basis exp(S − Sᵀ) when a skew S
    is given."""
    basis = orthogonal_from_skew(plane_skew) if plane_skew is not None else None
    return lambda x: apply_grape_m(x, cos, sin, basis)
