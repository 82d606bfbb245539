"""Checkpoint converters: HF gpt-oss teacher / HF student → Megatron torch_dist, Megatron student → HF bundle."""

from .common import METADATA_KEY, ConversionError, resolve_megatron_dir
from .hf_to_megatron import convert_hf_to_megatron
from .megatron_to_hf import convert_megatron_to_hf

__all__ = ["METADATA_KEY", "ConversionError", "convert_hf_to_megatron", "convert_megatron_to_hf", "resolve_megatron_dir"]
