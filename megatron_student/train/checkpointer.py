"""Training checkpoints: save and resume.

``checkpoint.dir`` holds Megatron-LM's layout, ``iter_NNNNNNN/`` + ``latest_checkpointed_iteration.txt``. An
iteration holds the student as torch_dist (reshardable; it carries the checkpoint record, ``checkpoint.record``,
so ``convert-megatron-to-hf`` exports it and a next stage starts from it with ``student.megatron``),
``trainer/rank_NNNNN.pt`` per rank (the trainer's state: step, sampler position, guard counters, optimizer state;
plus RNG states and the layout; plain values and tensors only, loaded with ``weights_only=True``),
``trainer/layout.json`` (the layout a resume must match: world size, TP, CP, EP and optimizer implementation),
``trainer/ranks.json`` (each rank's TP, CP, DP and EP coordinates) and ``config.yaml`` (the resolved config).

A resume may change the context-parallel size, nothing else: CP shards no weight and CP ranks hold identical
trainer state (they step on the same DP × CP-reduced gradients and read the same samples), so a rank reads the
state of the written rank at its TP, DP and EP coordinates (CP rank 0). The data-parallel size must stay (the
sampler is split over DP; the world size changes with CP), and so must the optimizer's sharding: Megatron's
distributed optimizer shards its state over DP × CP, so it refuses a CP change. Written in this process (no writer processes to outlive a killed run) to
``.tmp-iter_…`` and renamed; the tracker is replaced atomically. Every file of a checkpoint is checked before
anything in it is unpickled (``checkpoint.verify_torch_dist``, ``checkpoint.safe_torch_load``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

from ..checkpoint import (
    METADATA_KEY,
    TRACKER_NAME,
    CheckpointRecord,
    InProcessSaveStrategy,
    resolve_megatron_dir,
    safe_torch_load,
)
from .config import TrainConfig, dump_config

LAYOUT_FILE = "layout.json"  # in a checkpoint's trainer/: the layout a resume must match
RANKS_FILE = "ranks.json"  # in a checkpoint's trainer/: each rank's parallel coordinates
COORDINATES = ("tp", "cp", "dp", "ep")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Checkpointer:
    """Saves and resumes one rank's share of a stage's checkpoints; ``layout`` is what a resume must share with
    the run that wrote them (the per-rank files and the optimizer state depend on it)."""

    def __init__(self, config: TrainConfig, rank: int, layout: dict):
        self.config, self.rank, self.layout = config, rank, layout
        self.root = Path(config.checkpoint.dir)
        self.coordinates = {"tp": parallel_state.get_tensor_model_parallel_rank(),
                            "cp": parallel_state.get_context_parallel_rank(),
                            "dp": parallel_state.get_data_parallel_rank(),
                            "ep": parallel_state.get_expert_model_parallel_rank()}

    def resume_directory(self) -> Path | None:
        """The iteration to resume from: the tracker's, when ``checkpoint.resume`` and a tracker exists."""
        if self.config.checkpoint.resume and (self.root / TRACKER_NAME).is_file():
            return resolve_megatron_dir(self.root)
        return None

    def check_layout(self, directory: Path) -> None:
        """Refuse a resume at another layout before any model is built (a checkpoint of another TP does not even
        fit this run's vocabulary padding): the checkpoint's trainer/layout.json against this run's."""
        path = directory / "trainer" / LAYOUT_FILE
        if path.is_file():
            self._require_layout(path, json.loads(path.read_text()))

    def _require_layout(self, path: Path, written: dict) -> None:
        """Refuse a resume whose layout differs from the written one in anything but the context-parallel size
        (and the world size that follows from it), or changes CP where the trainer state is not CP-replicated."""
        # layouts written before context parallelism: CP 1, the optimizer sharding as in this run
        written = {"cp": 1, "distributed_optimizer": self.layout["distributed_optimizer"], **written}
        fixed = [k for k in sorted(set(written) | set(self.layout)) if k not in ("world", "cp")]
        if any(written.get(k) != self.layout.get(k) for k in fixed) or (
                written["cp"] == self.layout["cp"] and written["world"] != self.layout["world"]):
            raise ValueError(f"{path}: written with {written}, resuming with {self.layout}; resume needs the same "
                             "layout, except the context-parallel size (start a new stage from it with "
                             "student.megatron to change the rest)")
        if written["cp"] == self.layout["cp"]:
            return
        dp_written = written["world"] // (written["tp"] * written["cp"])
        dp_now = self.layout["world"] // (self.layout["tp"] * self.layout["cp"])
        if dp_written != dp_now:
            raise ValueError(f"{path}: written at CP {written['cp']} with data-parallel size {dp_written}, resuming at "
                             f"CP {self.layout['cp']} with data-parallel size {dp_now}; a resume may change CP only "
                             f"with the same DP (world size {dp_written * self.layout['tp'] * self.layout['cp']})")
        if self.layout["distributed_optimizer"]:
            raise ValueError(f"{path}: written at CP {written['cp']}, resuming at CP {self.layout['cp']}: the "
                             "distributed optimizer shards its state over DP × CP; resume at the written CP or "
                             "start a new stage from the checkpoint (student.megatron)")

    def _source_rank(self, directory: Path) -> int:
        """The written rank whose trainer state this rank resumes: itself at the written CP; otherwise the one at
        this rank's TP, DP and EP coordinates and CP rank 0 (CP ranks hold the same state)."""
        ranks_path = directory / "trainer" / RANKS_FILE
        if not ranks_path.is_file():  # written before the coordinates were recorded: at CP 1
            if self.layout["cp"] != 1:
                raise ValueError(f"{ranks_path}: missing (a checkpoint from before context parallelism); resume it "
                                 "at CP 1")
            return self.rank
        written = json.loads(ranks_path.read_text())
        if len(written) == self.layout["world"] and written[self.rank] == self.coordinates:
            return self.rank
        wanted = {**self.coordinates, "cp": 0}
        for rank, coordinates in enumerate(written):
            if coordinates == wanted:
                return rank
        raise ValueError(f"{ranks_path}: no written rank has this rank's coordinates {wanted} (TP, DP and EP ranks "
                         "differ at the new CP size); resume at the written CP")

    def save(self, step: int, model: torch.nn.Module, record: CheckpointRecord, state: Stateful) -> Path:
        """Collective: write iteration ``step`` (the model with ``record``, then ``state.state_dict()`` of every
        rank) and point the tracker at it; returns its directory."""
        name = f"iter_{step:07d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        sharded = model.sharded_state_dict()
        sharded[METADATA_KEY] = record.to_dict()
        dist_checkpointing.save(sharded, str(tmp), sharded_strategy=InProcessSaveStrategy())
        (tmp / "trainer").mkdir(exist_ok=True)
        torch.save({**state.state_dict(), "layout": self.layout, "rng": _rng_state()},
                   tmp / "trainer" / f"rank_{self.rank:05d}.pt")
        mine = torch.tensor([self.coordinates[k] for k in COORDINATES], device=_collective_device())
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        dist.barrier()
        if self.rank == 0:
            (tmp / "config.yaml").write_text(dump_config(self.config))
            (tmp / "trainer" / LAYOUT_FILE).write_text(json.dumps(self.layout, sort_keys=True) + "\n")
            ranks = [dict(zip(COORDINATES, c.tolist())) for c in every]
            (tmp / "trainer" / RANKS_FILE).write_text(json.dumps(ranks) + "\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            tracker = self.root / (TRACKER_NAME + ".tmp")
            tracker.write_text(f"{step}\n")
            os.replace(tracker, self.root / TRACKER_NAME)
        dist.barrier()
        return final

    def load(self, directory: Path, state: Stateful) -> None:
        """This rank's trainer state of the checkpoint ``directory`` into ``state``, and the RNG states (at another
        CP size: those of the written rank at this rank's coordinates, see :meth:`_source_rank`)."""
        source = self._source_rank(directory)
        path = directory / "trainer" / f"rank_{source:05d}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no trainer state for rank {source} (was the checkpoint written with "
                                    "a different world size?)")
        saved = safe_torch_load(path)
        self._require_layout(path, saved.pop("layout"))
        rng = saved.pop("rng")
        state.load_state_dict(saved)
        _set_rng_state(rng)


def _collective_device() -> torch.device:
    """Where this backend's collectives take tensors (NCCL: the current GPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _rng_state() -> dict:
    rng = {"python": random.getstate(), "numpy": _numpy_rng_plain(np.random.get_state()),
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
        rng["cuda_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return rng


def _set_rng_state(rng: dict) -> None:
    random.setstate(rng["python"])
    name, keys, position, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["cuda_tracker"])


def _numpy_rng_plain(state: tuple) -> tuple:
    """numpy's MT19937 state with its key array as a tensor: loadable with ``weights_only=True``."""
    name, keys, position, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)
