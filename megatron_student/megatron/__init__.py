"""Megatron-Core realization of the student and the gpt-oss teacher (tensor, sequence and expert parallel)."""

from .layers import restore_fp32_parameters
from .model import ParallelConfig, build_student, build_teacher, initialize_parallel
from .weights import hf_to_megatron_state_dict, load_hf_weights

__all__ = [
    "ParallelConfig",
    "build_student",
    "build_teacher",
    "hf_to_megatron_state_dict",
    "initialize_parallel",
    "load_hf_weights",
    "restore_fp32_parameters",
]
