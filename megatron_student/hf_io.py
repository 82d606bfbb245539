"""Streaming writer for HF safetensors checkpoints: tensors are flushed to shards as they are produced, so
peak memory is about one shard, and the whole directory appears atomically when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


class StreamingCheckpointWriter:
    """Usage: ``with StreamingCheckpointWriter(out, force=...) as w: w.add(name, t); ...; w.write_json(...)``.
    On success the temporary directory is renamed to ``out``; on error it is removed and ``out`` is untouched."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, force: bool = False):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not force:
            raise FileExistsError(f"{self.out_dir}: already exists; pass --force to replace it")
        self.force = force
        self.max_shard_bytes = max_shard_bytes
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        save_file(self._pending, self.directory / f"shard-{len(self._shards):05d}.tmp", metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def write_json(self, name: str, obj) -> None:
        (self.directory / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def write_text(self, name: str, text: str) -> None:
        (self.directory / name).write_text(text)

    def _finalise(self) -> None:
        self._flush()
        count = len(self._shards)
        if count == 1:
            (self.directory / "shard-00000.tmp").rename(self.directory / SAFETENSORS_NAME)
        else:
            weight_map = {}
            for i, names in enumerate(self._shards):
                final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                (self.directory / f"shard-{i:05d}.tmp").rename(self.directory / final)
                weight_map.update(dict.fromkeys(names, final))
            self.write_json(SAFETENSORS_INDEX_NAME, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        if self.out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.old-", dir=self.out_dir.parent))
            self.out_dir.rename(old / self.out_dir.name)
            self.directory.rename(self.out_dir)
            shutil.rmtree(old)
        else:
            self.directory.rename(self.out_dir)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._finalise()
        else:
            shutil.rmtree(self.directory, ignore_errors=True)
        return False
