"""Distillation training on Megatron-Core: the stage config schema (``config``), the trainer loop (``trainer``)
and its components (``batches``, ``teacher_signal``, ``checkpointer``, ``activations``, ``optim``, ``metrics``),
and the ``megatron-student train`` command (``cli``)."""

from .config import ConfigError, TrainConfig, config_from_dict, load_config
from .trainer import Trainer, TrainingStopped, train

__all__ = ["ConfigError", "TrainConfig", "Trainer", "TrainingStopped", "config_from_dict", "load_config", "train"]
