"""Dtype names of the command lines and checkpoints, in one table."""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# What Megatron checkpoints and the tiny gpt-oss teacher are written in (fp16 would need loss scaling in training
# and is not a gpt-oss dtype); HF student surgery accepts every name above.
CHECKPOINT_DTYPES = ("bf16", "fp32")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 → "bfloat16", the spelling of config.json's ``dtype`` and of the surgery report."""
    return str(dtype).removeprefix("torch.")
