"""Megatron-LM's checkpoint directory layout and the safe reading of a ``torch_dist`` checkpoint: errors, the
iteration a save directory's tracker names, a one-process gloo group for Megatron's dist-checkpointing calls, and
reading the checkpoint's pickled files without running code.

A torch_dist directory holds three kinds of pickle: ``.metadata`` (torch DCP reads it with a plain
``pickle.load``), ``common.pt`` (``torch.save``) and the ``BYTE_IO`` items inside the ``.distcp`` files (Megatron's
``_extra_state`` entries, which DCP reads with ``torch.load(weights_only=False)``). :func:`verify_torch_dist`
reads each of them without running code (an allow-list unpickler for ``.metadata``, ``weights_only=True`` for
the others) and checks that every ``.distcp`` byte range the metadata names is present, before Megatron or DCP
touches the directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

TRACKER_NAME = "latest_checkpointed_iteration.txt"
RELEASE_NAME = "release"  # Megatron-LM's directory name for a converted (not trained) checkpoint


class ConversionError(ValueError):
    """A checkpoint that cannot be converted or loaded; the message names the tensor, field or file."""


class CheckpointFileError(ConversionError):
    """A checkpoint file that is damaged (empty, truncated) or would run code when loaded; the message names it."""


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
    if iteration != RELEASE_NAME and not iteration.isdigit():
        iterations = sorted(p.name for p in path.glob("iter_*") if (p / "metadata.json").is_file())
        raise CheckpointFileError(
            f"{tracker}: holds {iteration!r}, not an iteration number or {RELEASE_NAME!r} (an interrupted write?); "
            + (f"write the iteration to resume from into it (this directory holds {', '.join(iterations)})"
               if iterations else "this directory holds no complete iteration"))
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


def read_json_object(path: Path) -> dict:
    """A JSON object file (config.json, metadata.json); a damaged one is named."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFileError(f"{path}: not valid JSON ({e}); the file is truncated or damaged") from None
    if not isinstance(value, dict):
        raise CheckpointFileError(f"{path}: holds a JSON {type(value).__name__}, expected an object")
    return value


# What a torch_dist ``.metadata`` pickle may name: DCP's metadata and save-plan dataclasses (Megatron's save keeps
# every rank's plan in it) and the plain torch values inside them.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
     ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("collections", "OrderedDict")} | {
    ("torch", str(dtype).removeprefix("torch.")) for dtype in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
        torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}


class _Refused(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _METADATA_GLOBALS:
            raise _Refused(f"names {module}.{name}, which is not part of torch_dist metadata")
        return super().find_class(module, name)


def read_dcp_metadata(directory: Path) -> Metadata:
    """The DCP ``.metadata`` of ``directory``, unpickled with an allow-list (nothing in it can run code)."""
    path = directory / ".metadata"
    if not path.is_file():
        raise CheckpointFileError(f"{path}: missing; {directory} is not a complete torch_dist checkpoint")
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except _Refused as e:
        raise CheckpointFileError(f"{path}: refused, it {e}; a checkpoint from elsewhere must not run code") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointFileError(f"{path}: damaged or truncated ({type(e).__name__}: {e}); use another iteration or "
                                  "re-create the checkpoint") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointFileError(f"{path}: holds a {type(metadata).__name__}, not torch_dist metadata")
    return metadata


def load_common_state(directory: Path) -> dict:
    """``common.pt`` (Megatron's non-sharded state) with ``torch.load(weights_only=True)``: plain values only."""
    path = directory / "common.pt"
    if not path.is_file():
        raise CheckpointFileError(f"{path}: missing; {directory} is not a complete torch_dist checkpoint")
    return safe_torch_load(path)


def safe_torch_load(path: Path, source=None):
    """``torch.load(source or path, weights_only=True)`` with errors naming ``path``: a pickle that needs more
    than plain values and tensors is refused, a damaged one reported as such."""
    try:
        return torch.load(path if source is None else source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointFileError(f"{path}: damaged or truncated ({e}); use another iteration or re-create the "
                                      "checkpoint") from None
        reason = next((line.split("error: ")[-1].split(". Please")[0] for line in str(e).splitlines()
                       if "WeightsUnpickler error" in line), "not plain values and tensors")
        raise CheckpointFileError(f"{path}: refused, it holds objects that only load by running code ({reason}); "
                                  "only plain values and tensors are loaded from checkpoints") from None
    except (EOFError, RuntimeError, OSError) as e:
        raise CheckpointFileError(f"{path}: damaged or truncated ({type(e).__name__}: {e}); use another iteration or "
                                  "re-create the checkpoint") from None


def verify_torch_dist(directory: Path) -> Metadata:
    """Check a torch_dist checkpoint before anything unpickles it unsafely (see the module docstring): the
    ``.metadata`` read with an allow-list, ``common.pt`` and every BYTE_IO item with ``weights_only=True``, every
    ``.distcp`` file present and as long as the byte ranges recorded for it. Returns the metadata."""
    metadata = read_dcp_metadata(directory)
    load_common_state(directory)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = directory / name
        if not path.is_file():
            raise CheckpointFileError(f"{path}: missing, {directory / '.metadata'} records data in it; the checkpoint "
                                      "is incomplete: use another iteration or re-create it")
        actual = path.stat().st_size
        if actual < size:
            raise CheckpointFileError(f"{path}: truncated ({actual} bytes, the checkpoint's metadata records {size}); "
                                      "the checkpoint is damaged: use another iteration or re-create it")
    for index, info in (metadata.storage_data or {}).items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            if getattr(info, "transform_descriptors", None):
                raise CheckpointFileError(f"{directory / info.relative_path}: item '{index.fqn}' is stored with "
                                          f"transforms {info.transform_descriptors}, which this reader does not check")
            with open(directory / info.relative_path, "rb") as f:
                f.seek(info.offset)
                safe_torch_load(directory / f"{info.relative_path}[{index.fqn}]", io.BytesIO(f.read(info.length)))
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """torch's DCP reader with the ``.metadata`` read by :func:`read_dcp_metadata` instead of ``pickle.load``."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_dcp_metadata(Path(self.path))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
