"""Per-tensor readers of the checkpoints the project loads: an HF gpt-oss teacher or HF student directory
(checked against the model its config describes) and a Megatron torch_dist checkpoint with its record.

HF teacher tensors come from ``teacher.checkpoint.TeacherCheckpoint`` (MXFP4 experts dequantised); HF student
tensors from :class:`StudentCheckpoint`; both are read one tensor at a time. Megatron checkpoints store every
tensor in its global shape, so :class:`MegatronCheckpoint` reads global tensors by key without a process group.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import transformers
from safetensors import safe_open

from ..student.config import StudentConfig
from ..student.modeling import StudentForCausalLM
from ..teacher import TeacherCheckpoint
from ..teacher.checkpoint import stored_tensor_files
from ..teacher.config import CONFIG_NAME
from .record import read_record
from .torch_dist import (
    CheckpointFileError,
    ConversionError,
    SafeFileSystemReader,
    read_json_object,
    resolve_megatron_dir,
    verify_torch_dist,
)

MODEL_TYPES = {"teacher": "gpt_oss", "student": StudentConfig.model_type}


def model_config(role: str, config_dict: dict):
    """The HF config object of ``role`` from its config dict: a ``StudentConfig``, or a ``GptOssConfig`` without
    the quantisation (weights are dequantised on reading)."""
    if role == "student":
        return StudentConfig.from_dict(config_dict)
    return transformers.GptOssConfig.from_dict({k: v for k, v in config_dict.items() if k != "quantization_config"})


class StudentCheckpoint:
    """Lazy per-tensor reader of an HF student directory (safetensors, single or sharded)."""

    def __init__(self, directory: Path, config_dict: dict):
        self.directory = directory
        self.config = StudentConfig.from_dict(config_dict)
        self._files = stored_tensor_files(directory)

    def tensor_names(self) -> list[str]:
        return sorted(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self._files[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name)


class LazyState(Mapping):
    """Mapping view of a checkpoint reader for ``hf_to_megatron_state_dict``; keeps the last few tensors (a layer's
    four expert tensors are indexed once per expert)."""

    def __init__(self, reader, keep: int = 4):
        self.reader, self.keep = reader, keep
        self._names = set(reader.tensor_names())
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(f"{self.reader.directory}: missing tensor '{name}'")
        if name not in self._cache:
            self._cache[name] = self.reader.get(name)
            if len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        self._cache.move_to_end(name)
        return self._cache[name]

    def __contains__(self, name) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(sorted(self._names))

    def __len__(self) -> int:
        return len(self._names)


def open_hf_checkpoint(directory: str | Path, role: str):
    """(reader, HF config, config dict) after checking model_type, quantisation and every tensor name and shape
    against the model the config describes."""
    directory = Path(directory)
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no config.json")
    config_dict = read_json_object(config_file)
    model_type = config_dict.get("model_type")
    if model_type != MODEL_TYPES[role]:
        raise ConversionError(f"{config_file}: field 'model_type' is {model_type!r}; --role {role} needs "
                              f"{MODEL_TYPES[role]!r}")
    if role == "teacher":
        reader = TeacherCheckpoint(directory)  # validates the config, including the quantisation method
        model_class = transformers.GptOssForCausalLM
    else:
        quant = config_dict.get("quantization_config")
        if quant is not None:
            raise ConversionError(f"{config_file}: field 'quantization_config' ({quant!r}) is an unknown quantisation "
                                  "for a student; students are stored unquantised")
        reader = StudentCheckpoint(directory, config_dict)
        model_class = StudentForCausalLM
    config = model_config(role, config_dict)
    with torch.device("meta"):
        expected = {n: tuple(t.shape) for n, t in model_class(config).state_dict().items()}
    stored = set(reader.tensor_names())
    for name in sorted(set(expected) - stored):
        raise ConversionError(f"{directory}: missing tensor '{name}' (shape {expected[name]})")
    for name in sorted(stored - set(expected)):
        raise ConversionError(f"{directory}: unexpected tensor '{name}'")
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise ConversionError(f"{directory}: tensor '{name}' has shape {reader.shape(name)}, the {role} "
                                  f"config needs {shape}")
    return reader, config, config_dict


class MegatronCheckpoint:
    """One torch_dist checkpoint directory: global tensor metadata, its record (``record.CheckpointRecord``), and
    single-tensor reads. Every file is checked (``verify_torch_dist``) before anything in it is unpickled."""

    def __init__(self, path: str | Path):
        self.directory = resolve_megatron_dir(path)
        backend = read_json_object(self.directory / "metadata.json").get("sharded_backend")
        if backend != "torch_dist":
            raise ConversionError(f"{self.directory}/metadata.json: sharded_backend is {backend!r}, expected 'torch_dist'")
        self.tensors = {k: v for k, v in verify_torch_dist(self.directory).state_dict_metadata.items()
                        if hasattr(v, "size") and "_extra_state" not in k}
        self.record = read_record(self.directory)

    @property
    def metadata(self) -> dict:
        """The record as stored (what a re-save of these tensors puts under ``METADATA_KEY``)."""
        return self.record.to_dict()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def get_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Global tensors for ``keys`` in one DCP read (no process group)."""
        out = {k: torch.empty(self.tensors[k].size, dtype=self.tensors[k].properties.dtype) for k in keys}
        try:
            dcp.load(out, storage_reader=SafeFileSystemReader(str(self.directory)), no_dist=True)
        except CheckpointFileError:
            raise
        except Exception as e:  # noqa: BLE001 - DCP wraps the reader's errors (EOFError, unpickling) in its own types
            raise CheckpointFileError(f"{self.directory}: reading tensor '{keys[0]}'"
                                      + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")
                                      + f" failed, a .distcp file is damaged: {e}") from e
        return out

    def get(self, key: str) -> torch.Tensor:
        return self.get_many([key])[key]
