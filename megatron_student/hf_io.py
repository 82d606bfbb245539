"""Streaming writer for HF safetensors checkpoints: tensors are flushed to shards as they are produced, so
peak memory is about one shard, and the whole directory appears atomically when complete.

Also the pieces every command that writes an output directory shares: temporary siblings named after the
process that owns them (``.<out>.tmp-<host>-<pid>-…``), swept by the next run when that process is gone, the
atomic replacement of the output, and the check that every written tensor is finite."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
TEMP_KINDS = ("tmp", "old")  # a directory being written, an output being replaced


class NonFiniteTensorError(ValueError):
    """A tensor about to be written holds NaN or Inf; the message names it."""


def require_finite(name: str, tensor: torch.Tensor, allow_nonfinite: bool = False) -> None:
    """Raise NonFiniteTensorError naming ``name`` when a floating-point ``tensor`` holds NaN/Inf (unless allowed)."""
    if allow_nonfinite or not tensor.is_floating_point():
        return
    bad = ~torch.isfinite(tensor)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise NonFiniteTensorError(f"tensor '{name}' {tuple(tensor.shape)} holds {int(bad.sum())} non-finite values "
                                   f"(first {float(tensor[first])} at index {first}); the source is damaged or "
                                   "training diverged. Pass --allow-nonfinite to write it anyway")


def _owner_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-"


def temp_sibling(out_dir: Path, kind: str = "tmp") -> Path:
    """A new empty directory next to ``out_dir`` (same filesystem, so it can be renamed onto it), named after
    this process so that :func:`sweep_temp_siblings` knows when it is abandoned."""
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{kind}-{_owner_tag()}", dir=out_dir.parent))


def sweep_temp_siblings(out_dir: Path) -> list[Path]:
    """Remove the temporary siblings of ``out_dir`` left by a killed run of this host (their process is gone);
    report (on stderr) the ones another host or a live process owns, or of unknown owner. Returns the removed."""
    host = socket.gethostname()
    removed = []
    for kind in TEMP_KINDS:
        for path in sorted(out_dir.parent.glob(f".{out_dir.name}.{kind}-*")):
            owner = path.name[len(f".{out_dir.name}.{kind}-"):].rsplit("-", 1)[0]  # host-pid
            owner_host, _, pid = owner.rpartition("-")
            if owner_host == host and pid.isdigit() and not _alive(int(pid)):
                if kind == "old" and (path / out_dir.name).is_dir() and not out_dir.exists():
                    (path / out_dir.name).rename(out_dir)  # killed between moving the old output aside and the swap
                    print(f"restored {out_dir} from {path}, left by an interrupted run", file=sys.stderr)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                print(f"removed {path}, left by an interrupted run (process {pid} is gone)", file=sys.stderr)
            else:
                print(f"warning: {path} is a temporary directory of another run ({owner or 'unknown owner'}); "
                      "remove it if no run is writing it", file=sys.stderr)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    return True


def replace_directory(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` onto ``out_dir``: the old output (if any) is moved aside first and removed after,
    so ``out_dir`` is at every moment either the complete old or the complete new one."""
    if out_dir.exists():
        old = temp_sibling(out_dir, "old")
        out_dir.rename(old / out_dir.name)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)


class StreamingCheckpointWriter:
    """Usage: ``with StreamingCheckpointWriter(out, force=...) as w: w.add(name, t); ...; w.write_json(...)``.
    On success the temporary directory is renamed to ``out``; on error it is removed and ``out`` is untouched.
    Every floating-point tensor must be finite unless ``allow_nonfinite``."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, force: bool = False,
                 allow_nonfinite: bool = False):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not force:
            raise FileExistsError(f"{self.out_dir}: already exists; pass --force to replace it")
        self.force = force
        self.allow_nonfinite = allow_nonfinite
        self.max_shard_bytes = max_shard_bytes
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        sweep_temp_siblings(self.out_dir)
        self.directory = temp_sibling(self.out_dir)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        require_finite(name, tensor, self.allow_nonfinite)
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
        replace_directory(self.directory, self.out_dir)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._finalise()
        else:
            shutil.rmtree(self.directory, ignore_errors=True)
        return False
