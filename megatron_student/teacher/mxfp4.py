"""MXFP4 (OCP microscaling FP4) packing as used by the gpt-oss checkpoints.

A block holds 32 E2M1 values in 16 bytes (low nibble = even element, high nibble = odd element) and one
E8M0 scale byte ``e``; an element decodes to ``E2M1[nibble] * 2**(e - 127)``. The scale is applied with
``torch.ldexp``, so a scale byte of 255 (NaN in the OCP spec) decodes to ``±inf`` / NaN exactly as
transformers' own conversion does.
"""

from __future__ import annotations

import math

import torch

BLOCK_SIZE = 32  # values per MXFP4 block
SCALE_BIAS = 127  # E8M0 exponent bias

# E2M1 code -> value. Bit 3 is the sign, bits 1-2 the exponent, bit 0 the mantissa.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0

# Default number of 32-value blocks decoded at once: 2**20 blocks = 32 Mi values (64 MiB in bf16).
DEFAULT_ROWS_PER_CHUNK = 1 << 20


def dequantize_mxfp4(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK,
) -> torch.Tensor:
    """Decode packed MXFP4 ``blocks`` uint8 [..., G, 16] with ``scales`` uint8 [..., G] to [..., G*32].

    The output keeps the packed (row-major) layout; gpt-oss experts need a transpose of the last two
    axes afterwards to reach HF's in-memory [E, in, out] layout. Work is done ``rows_per_chunk`` blocks at a
    time so that the int/float temporaries stay bounded for 120b-sized tensors.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK_SIZE // 2:
        raise ValueError(f"MXFP4 blocks must have shape [..., G, {BLOCK_SIZE // 2}], got {tuple(blocks.shape)}")
    if tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(
            f"MXFP4 scales shape {tuple(scales.shape)} does not match blocks shape {tuple(blocks.shape)} "
            f"(expected {tuple(blocks.shape[:-1])})"
        )
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be positive, got {rows_per_chunk}")

    lead = tuple(blocks.shape[:-2])
    n_groups = blocks.shape[-2]
    n_rows = math.prod(lead) * n_groups
    flat_blocks = blocks.reshape(n_rows, BLOCK_SIZE // 2)
    flat_exponents = scales.reshape(n_rows, 1)
    # The LUT in float32 holds every E2M1 value exactly; scaling happens in float32 and is exact (powers of
    # two), so the only rounding is the final cast, which is exact too for bf16/fp16 in their normal ranges.
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    out = torch.empty(n_rows, BLOCK_SIZE, dtype=dtype, device=blocks.device)
    for start in range(0, n_rows, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_rows)
        packed = flat_blocks[start:stop]
        codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(stop - start, BLOCK_SIZE)
        values = lut[codes.long()]
        exponent = flat_exponents[start:stop].to(torch.int32) - SCALE_BIAS
        out[start:stop] = torch.ldexp(values, exponent)
    return out.reshape(*lead, n_groups * BLOCK_SIZE)


def _round_to_e2m1_codes(magnitude: torch.Tensor) -> torch.Tensor:
    """Codes 0..7 of the nearest E2M1 magnitude to ``magnitude`` (float32, in [0, 6]); ties go to the even code."""
    grid = torch.tensor(E2M1_VALUES[:8], dtype=torch.float32, device=magnitude.device)
    midpoints = (grid[1:] + grid[:-1]) / 2
    below = torch.bucketize(magnitude, midpoints, right=False)  # a value on a midpoint goes down
    above = torch.bucketize(magnitude, midpoints, right=True)  # ... or up
    return torch.where(below % 2 == 0, below, above)


def quantize_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` [..., K] (K a multiple of 32) to MXFP4: returns (blocks uint8 [..., K/32, 16], scales uint8 [..., K/32]).

    Each block of 32 gets the smallest power-of-two scale 2**s with ``max|x| <= 6 * 2**s`` (so nothing
    saturates; s is clamped to the E8M0 range [-127, 127]) and every element is rounded to the nearest
    E2M1 value (ties to even). ``dequantize_mxfp4`` inverts it up to that rounding.
    """
    if not x.is_floating_point():
        raise TypeError(f"quantize_mxfp4 needs a floating-point tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % BLOCK_SIZE != 0:
        raise ValueError(f"the last dimension must be a multiple of {BLOCK_SIZE}, got shape {tuple(x.shape)}")
    values = x.detach().to(torch.float32)
    if not torch.isfinite(values).all():
        raise ValueError("quantize_mxfp4: input holds inf or NaN")
    lead = tuple(values.shape[:-1])
    n_groups = values.shape[-1] // BLOCK_SIZE
    grouped = values.reshape(*lead, n_groups, BLOCK_SIZE)

    amax = grouped.abs().amax(dim=-1)
    # Initial guess from log2, then fix the off-by-one cases of float rounding so that s is exactly the
    # smallest integer with amax <= 6 * 2**s.
    safe_amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    exponent = torch.ceil(torch.log2(safe_amax / E2M1_MAX)).to(torch.int32)
    limit = torch.full_like(safe_amax, E2M1_MAX)
    exponent = torch.where(safe_amax > torch.ldexp(limit, exponent), exponent + 1, exponent)
    exponent = torch.where(safe_amax <= torch.ldexp(limit, exponent - 1), exponent - 1, exponent)
    exponent = torch.where(amax > 0, exponent, torch.zeros_like(exponent))
    exponent = exponent.clamp(-SCALE_BIAS, SCALE_BIAS)

    scaled = torch.ldexp(grouped.abs(), -exponent.unsqueeze(-1)).clamp(max=E2M1_MAX).contiguous()
    codes = _round_to_e2m1_codes(scaled)
    codes = codes + 8 * (grouped < 0).to(codes.dtype)
    codes = codes.to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
