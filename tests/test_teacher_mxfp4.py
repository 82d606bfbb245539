"""Our MXFP4 (de)quantisation against transformers' own conversion and against brute force."""

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from megatron_student.teacher.mxfp4 import E2M1_VALUES, dequantize_mxfp4, quantize_mxfp4

EXTREME_SCALES = [0, 1, 2, 126, 127, 128, 200, 253, 254, 255]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[t.dtype])


def _random_packed(seed: int, experts: int = 3, rows: int = 37, groups: int = 5):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 256, (experts, rows, groups), dtype=torch.uint8, generator=g)
    # Every extreme scale byte appears, for every nibble value in at least one block.
    scales[0, : len(EXTREME_SCALES), 0] = torch.tensor(EXTREME_SCALES, dtype=torch.uint8)
    blocks[0, : len(EXTREME_SCALES), 0, :] = torch.arange(0, 256, 17, dtype=torch.uint8)  # 0x00, 0x11, ..., 0xFF
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("rows_per_chunk", [1, 7, 1 << 20])
def test_dequantize_equals_transformers_bit_exactly(dtype, rows_per_chunk):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh bytes every run; the seed is in the failure report
    blocks, scales = _random_packed(seed)
    ours = dequantize_mxfp4(blocks, scales, dtype=dtype, rows_per_chunk=rows_per_chunk)
    assert ours.shape == (3, 37, 5 * 32) and ours.dtype == dtype
    # transformers returns HF's in-memory [E, in, out] layout, i.e. ours transposed.
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype, rows_per_chunk=11)
    assert torch.equal(_bits(ours.transpose(1, 2)), _bits(theirs)), f"seed {seed}"
    assert torch.isinf(ours).any(), "scale 255 should overflow to inf, as in transformers"


def test_dequantize_nibble_order_and_scale():
    # Byte 0x71: low nibble 1 (+0.5) is the even element, high nibble 7 (+6) the odd one.
    # Byte 0xA8: low nibble 8 (-0), high nibble 10 (-1). Scale byte 129 multiplies by 4.
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0], blocks[0, 0, 1] = 0x71, 0xA8
    blocks[0, 0, 2:] = 0xC3  # low nibble 3 (+1.5), high nibble 12 (-2)
    out = dequantize_mxfp4(blocks, torch.tensor([[129]], dtype=torch.uint8), dtype=torch.float32)
    expected = torch.tensor([0.5, 6.0, -0.0, -1.0] + [1.5, -2.0] * 14) * 4
    assert torch.equal(out[0], expected)
    assert torch.signbit(out[0, 2])


def test_dequantize_rejects_bad_inputs():
    blocks = torch.randint(0, 256, (2, 3, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"scales shape \(2, 4\) does not match blocks shape"):
        dequantize_mxfp4(blocks, torch.randint(0, 256, (2, 4), dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        dequantize_mxfp4(blocks.to(torch.int32), torch.randint(0, 256, (2, 3), dtype=torch.uint8))


def test_quantize_rounds_to_the_nearest_point_of_a_non_saturating_grid():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    # Blocks with magnitudes from 1e-20 to 1e20, plus one all-zero block.
    magnitudes = torch.logspace(-20, 20, 24).repeat_interleave(32)
    x = torch.randn(5, 24 * 32, generator=g) * magnitudes
    x[1, :32] = 0.0
    blocks, scales = quantize_mxfp4(x)
    assert blocks.shape == (5, 24, 16) and scales.shape == (5, 24)
    y = dequantize_mxfp4(blocks, scales, dtype=torch.float32)

    xb, yb = x.reshape(5, 24, 32), y.reshape(5, 24, 32)
    step = torch.ldexp(torch.ones(scales.shape), scales.to(torch.int32) - 127)  # 2**(scale-127)
    grid = torch.tensor(E2M1_VALUES).view(1, 1, 1, 16) * step[..., None, None]
    best = (grid - xb[..., None]).abs().amin(-1)
    assert torch.equal((yb - xb).abs(), best)  # nearest representable value in the block's grid
    amax = xb.abs().amax(-1)
    assert (amax <= 6 * step).all()  # nothing saturates ...
    nonzero = amax > 0
    assert (amax[nonzero] > 3 * step[nonzero]).all()  # ... and the scale is the smallest that does not
    assert torch.equal(yb[1, 0], torch.zeros(32))


def test_quantize_reproduces_representable_values():
    blocks, scales = _random_packed(int(torch.randint(0, 2**31 - 1, ()).item()))
    scales = scales % 60 + 100  # finite, normal range
    values = dequantize_mxfp4(blocks, scales, dtype=torch.float32)
    again = dequantize_mxfp4(*quantize_mxfp4(values), dtype=torch.float32)
    assert torch.equal(again, values)


def test_quantize_rejects_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.randn(4, 40))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_mxfp4(torch.tensor([float("inf")] + [1.0] * 31))
