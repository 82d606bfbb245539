"""Shared pieces of the converters: the metadata record, Megatron-LM's checkpoint directory layout, errors,
and a one-process gloo group for Megatron's dist-checkpointing calls."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

METADATA_KEY = "megatron_student"  # non-tensor entry of the checkpoint's common state (common.pt)
FORMAT_VERSION = 1
TRACKER_NAME = "latest_checkpointed_iteration.txt"
RELEASE_NAME = "release"  # Megatron-LM's directory name for a converted (not trained) checkpoint


class ConversionError(ValueError):
    """A source checkpoint that cannot be converted; the message names the tensor, field or file."""


def resolve_megatron_dir(path: str | Path) -> Path:
    """The torch_dist directory of a checkpoint: ``path`` itself when it holds ``metadata.json``, else the
    iteration Megatron-LM's tracker file names (``release`` or ``iter_0000100``)."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    tracker = path / TRACKER_NAME
    if not tracker.is_file():
        raise FileNotFoundError(f"{path}: neither a torch_dist checkpoint (metadata.json) nor a save dir ({TRACKER_NAME})")
    iteration = tracker.read_text().strip()
    name = RELEASE_NAME if iteration == RELEASE_NAME else f"iter_{int(iteration):07d}"
    directory = path / name
    if not (directory / "metadata.json").is_file():
        raise FileNotFoundError(f"{tracker} names {name}, but {directory} holds no torch_dist checkpoint (metadata.json)")
    return directory


@contextlib.contextmanager
def single_process_group(backend: str = "gloo"):
    """A world-size-1 process group (gloo: enough for Megatron's dist-checkpointing APIs; nccl: for GPU training,
    whose reduce-scatters gloo lacks); reuses an existing group."""
    owned = not torch.distributed.is_initialized()
    if owned:
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if owned:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            torch.distributed.destroy_process_group()
