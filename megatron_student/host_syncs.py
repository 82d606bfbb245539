"""Host synchronisations of CUDA work: count them, and copy to the GPU without one.

Count: every call that makes the host wait for the GPU (``.item()``,
``.tolist()``, ``.cpu()``, ``nonzero``, ``masked_select``, a blocking host-to-device copy, …) stalls the launch
queue, and the GPU idles until the host has queued the next kernels.

``HostSyncs`` switches on torch's CUDA sync debug mode ("warn": each synchronising call warns) and counts those
warnings by the line that made them: the innermost frame of this project (``megatron_student``) and the frame that
called torch, when that is elsewhere (Megatron-Core, fla, torch's own Python). Warnings raised in the autograd
engine's threads are replayed by ``backward`` and so count at its line. Explicit waits (``torch.cuda.synchronize``,
``Event.synchronize``) are not counted: torch's debug mode does not flag them.

Copy: a plain ``.to("cuda")`` of a host tensor is a blocking copy that first waits for every kernel queued before
it; :func:`to_device_async` stages the tensor in pinned memory and queues the copy instead.
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

SYNC_WARNING = "called a synchronizing CUDA operation"
_PACKAGE = Path(__file__).resolve().parent


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the host) on ``device``; to a GPU through pinned memory without waiting for it (the pinned block
    is kept until the copy has run: torch's pinned-memory allocator tracks it)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _short(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("megatron_student", "megatron", "fla", "torch", "tests", "benchmarks"):
        if anchor in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(anchor) - 1:])
    return Path(filename).name


class HostSyncs:
    """``with HostSyncs() as syncs: ...`` → ``syncs.total`` and ``syncs.sites`` (a Counter of "where (via)" lines);
    ``str(syncs)`` is a table. Needs CUDA."""

    def __init__(self):
        self.sites: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def __enter__(self) -> HostSyncs:
        if not torch.cuda.is_available():
            raise RuntimeError("HostSyncs counts CUDA synchronisations: no CUDA device")
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.filterwarnings("always", message=SYNC_WARNING)
        self._show = warnings.showwarning
        warnings.showwarning = self._record
        self._mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.set_sync_debug_mode(self._mode)
        warnings.showwarning = self._show
        self._catch.__exit__(*exc)

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING not in str(message):
            self._show(message, category, filename, lineno, file, line)
            return
        site = f"{_short(filename)}:{lineno}"
        ours = next((f for f in reversed(traceback.extract_stack()[:-1])
                     if Path(f.filename).resolve().is_relative_to(_PACKAGE)), None)
        if ours is not None and (ours.filename, ours.lineno) != (filename, lineno):
            site += f" (via {_short(ours.filename)}:{ours.lineno} {ours.name})"
        self.sites[site] += 1

    def __str__(self) -> str:
        lines = [f"{self.total} host synchronisation(s)"]
        lines += [f"  {count:4d}  {site}" for site, count in self.sites.most_common()]
        return "\n".join(lines)
