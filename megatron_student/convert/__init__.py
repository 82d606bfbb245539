"""Checkpoint converters: HF gpt-oss teacher / HF student → Megatron torch_dist, Megatron student → HF bundle.
The checkpoint format itself (record, readers, safe reading) lives in ``megatron_student.checkpoint``."""

from ..checkpoint import ConversionError
from .hf_to_megatron import convert_hf_to_megatron
from .megatron_to_hf import convert_megatron_to_hf

__all__ = ["ConversionError", "convert_hf_to_megatron", "convert_megatron_to_hf"]
