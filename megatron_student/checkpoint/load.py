"""A Megatron-Core model of this rank from a checkpoint directory: HF (teacher or student) or Megatron torch_dist."""

from __future__ import annotations

from pathlib import Path

from megatron.core import dist_checkpointing

from ..megatron import ParallelConfig, build_student, build_teacher, load_hf_weights, restore_fp32_parameters
from .readers import LazyState, model_config, open_hf_checkpoint
from .record import METADATA_KEY, read_record
from .torch_dist import TRACKER_NAME, resolve_megatron_dir, verify_torch_dist


def is_megatron_checkpoint(path: Path) -> bool:
    """A torch_dist directory or a Megatron-LM save directory (with its tracker file)."""
    return (path / "metadata.json").is_file() or (path / TRACKER_NAME).is_file()


def load_model(path: str | Path, role: str, parallel: ParallelConfig):
    """(model, HF config, HF config dict) of ``role`` ("student"/"teacher") for this rank, from an HF directory or
    a Megatron torch_dist checkpoint carrying the record (``record.CheckpointRecord``)."""
    path = Path(path)
    build = build_student if role == "student" else build_teacher
    if is_megatron_checkpoint(path):
        directory = resolve_megatron_dir(path)
        verify_torch_dist(directory)  # before Megatron unpickles anything in it
        record = read_record(directory)
        if record.role != role:
            raise ValueError(f"{directory}: a {record.role!r} checkpoint where a {role} is expected")
        config_dict = record.hf_config
        config = model_config(role, config_dict)
        model = build(config, parallel)
        restore_fp32_parameters(model)
        state = dist_checkpointing.load(model.sharded_state_dict(), str(directory))
        state.pop(METADATA_KEY, None)  # the common state comes back with the tensors
        model.load_state_dict(state)
    elif (path / "config.json").is_file():
        reader, config, config_dict = open_hf_checkpoint(path, role)
        model = build(config, parallel)
        restore_fp32_parameters(model)
        load_hf_weights(model, LazyState(reader))
    else:
        raise FileNotFoundError(f"{path}: neither an HF checkpoint (config.json) nor a Megatron checkpoint "
                                f"(metadata.json or {TRACKER_NAME})")
    return model, config, config_dict
