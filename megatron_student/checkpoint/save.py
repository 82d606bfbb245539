"""Megatron ``torch_dist`` saves written in this process: ``InProcessSaveStrategy`` (training checkpoints) and
``StreamingSaveStrategy`` (the HF → Megatron converter), whose tensor bytes are produced while the checkpoint is
written, one unit at a time, so a model far larger than memory can be saved from its structure alone (a
meta-device model).

Megatron's own ``TorchDistSaveShardedStrategy`` turns the ShardedTensors into DCP write items with
``mcore_to_pyt_state_dict`` and then resolves *every* item before its writer processes start
(``FileSystemWriterAsync.prepare_write_data``): the whole model is in memory. ``StreamingSaveStrategy`` keeps
Megatron's translation (same keys, global shapes, chunks, dtypes, hence the same ``.metadata``) and Megatron's
``dist_checkpointing.save`` around it (``common.pt``, ``metadata.json``), but

- its planner asks ``shard_data(key, global_offset)`` for each item's tensor instead of the state dict (whose
  ShardedTensors may hold meta tensors);
- its writer is torch's ``FileSystemWriter`` resolving each item just before writing it, in one thread, with the
  items grouped by ``unit_of(key)`` (so a data source can build one unit, e.g. a decoder layer, hand out its shards
  and move on) and one ``.distcp`` file per unit: torch keeps every tensor written to a file referenced until the
  file is closed (``filesystem._write_files_from_queue``), so one file per rank would hold the whole model again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StoragePrefix
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

ShardData = Callable[[str, tuple[int, ...]], torch.Tensor]


class StreamingSavePlanner(MCoreSavePlanner):
    """Megatron's save planner with each tensor taken from ``shard_data`` instead of the state dict."""

    def __init__(self, shard_data: ShardData):
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)  # as Megatron's torch_dist save
        self.shard_data = shard_data

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:  # ShardedObjects (extra states) are in the state dict
            return super().resolve_data(write_item)
        planned = write_item.tensor_data
        tensor = self.shard_data(write_item.index.fqn, tuple(write_item.index.offset))
        if tensor.dtype != planned.properties.dtype or tensor.numel() != planned.chunk.sizes.numel():
            raise RuntimeError(f"{write_item.index.fqn} at {tuple(write_item.index.offset)}: the data source gave "
                               f"{tensor.dtype} {tuple(tensor.shape)}, the checkpoint plans "
                               f"{planned.properties.dtype} {tuple(planned.chunk.sizes)}")
        return tensor.reshape(planned.chunk.sizes)  # adds the leading 1s of Megatron's prepended (expert) axes


class FilePerUnitWriter(FileSystemWriter):
    """torch's one-thread ``FileSystemWriter``, called once per unit (units in the order the plan first names
    them), each unit into its own file."""

    def __init__(self, path: str | Path, unit_of: Callable[[str], Hashable]):
        super().__init__(path, thread_count=1)
        self.unit_of = unit_of

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        units: dict[Hashable, list[WriteItem]] = {}
        for item in plan.items:
            units.setdefault(self.unit_of(item.index.fqn), []).append(item)
        results: list[WriteResult] = []
        for index, items in enumerate(units.values()):
            prefix = _StoragePrefix(f"{plan.storage_data.prefix}{index}_")  # file __<rank>_<unit>_0.distcp
            results += super().write_data(dataclasses.replace(plan, items=items, storage_data=prefix), planner).wait()
        written: Future[list[WriteResult]] = Future()
        written.set_result(results)
        return written


class InProcessSaveStrategy(SaveShardedStrategy):
    """Megatron's ``torch_dist`` v1 save (its planner, keys and metadata) written by torch's ``FileSystemWriter``
    in this process. Megatron's default strategy writes through ``FileSystemWriterAsync``, whose first use starts a
    ``multiprocessing`` Manager server (and a resource tracker) that outlive a process killed with SIGKILL."""

    def __init__(self):
        super().__init__("torch_dist", 1)  # what metadata.json records, as for Megatron's default strategy

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def planner(self) -> SavePlanner:
        return MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False)

    def writer(self, checkpoint_dir: str | Path) -> FileSystemWriter:
        return FileSystemWriter(checkpoint_dir, thread_count=1)

    def save(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: str | Path) -> None:
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        dcp.save(mcore_to_pyt_state_dict(by_key, is_loading=False), planner=self.planner(),
                 storage_writer=self.writer(checkpoint_dir))


class StreamingSaveStrategy(InProcessSaveStrategy):
    """``torch_dist`` v1 save strategy for ``dist_checkpointing.save(..., sharded_strategy=...)`` that streams the
    tensor data from ``shard_data`` (see the module docstring)."""

    def __init__(self, shard_data: ShardData, unit_of: Callable[[str], Hashable]):
        super().__init__()
        self.shard_data, self.unit_of = shard_data, unit_of

    def planner(self) -> SavePlanner:
        return StreamingSavePlanner(self.shard_data)

    def writer(self, checkpoint_dir: str | Path) -> FileSystemWriter:
        return FilePerUnitWriter(checkpoint_dir, self.unit_of)
