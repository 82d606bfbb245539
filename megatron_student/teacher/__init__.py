"""gpt-oss teacher in HF format: config validation, MXFP4, checkpoint reading/writing, tiny random teachers."""

from .checkpoint import TeacherCheckpoint, TeacherCheckpointError, load_teacher_model, save_hf_checkpoint
from .config import TeacherConfigError, load_teacher_config, validate_gpt_oss_config
from .mxfp4 import dequantize_mxfp4, quantize_mxfp4
from .tiny import make_tiny_teacher

__all__ = [
    "TeacherCheckpoint",
    "TeacherCheckpointError",
    "TeacherConfigError",
    "dequantize_mxfp4",
    "load_teacher_config",
    "load_teacher_model",
    "make_tiny_teacher",
    "quantize_mxfp4",
    "save_hf_checkpoint",
    "validate_gpt_oss_config",
]
