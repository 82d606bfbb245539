"""`megatron-student convert-hf-to-megatron`: an HF gpt-oss teacher (bf16 or MXFP4 experts) or an HF student
(from ``init-student``) → a Megatron-Core ``torch_dist`` checkpoint.

The checkpoint is written by one process at TP = EP = 1: dist checkpoints store every tensor in its global shape
and reshard on load, so one file set serves any TP/EP. The only layout-dependent quantity is the padded vocabulary
(Megatron pads to a multiple of 128·TP), so the embedding and output layer are padded for ``--tp`` and the
checkpoint loads at every TP whose padding agrees (padded_vocab_size equal). ``--tp``/``--ep`` are also
checked against the head and expert counts. The layout goes with the checkpoint's record in the common state
(``checkpoint.record.CheckpointRecord``: role, HF config, source, stage, tokens seen, dtype, layout) that the HF
export and the trainer read back.

Streaming: the model is built on the meta device, only for its ``sharded_state_dict`` (keys, global shapes,
sharding, dtypes). The tensors are made while ``checkpoint.save.StreamingSaveStrategy`` writes them, one unit at a
time (a decoder layer, the embedding, the final norm, the output layer): the unit's parameters are materialised on
CPU and filled by ``megatron.weights.hf_to_megatron_state_dict`` from a lazy HF reader (the other units' HF tensors
are shape-only meta placeholders), the model's ``sharded_state_dict`` cuts them into checkpoint shards, and the
parameters go back to meta; each unit gets its own ``.distcp`` file. Peak memory: one unit in the checkpoint dtype
plus the HF tensors it is made from (a layer's expert tensors, dequantised for MXFP4), whatever the model size. The
checkpoint equals Megatron's default save of the fully loaded model. Output: Megatron-LM's layout ``<out>/release/`` +
``latest_checkpointed_iteration.txt``, written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import apply_factories
from torch.distributed.checkpoint.api import CheckpointException
from torch.overrides import TorchFunctionMode

from ..checkpoint import (
    METADATA_KEY,
    MODEL_TYPES,
    RELEASE_NAME,
    TRACKER_NAME,
    VOCAB_DIVISIBLE_BY,
    CheckpointLayout,
    CheckpointRecord,
    ConversionError,
    LazyState,
    StreamingSaveStrategy,
    open_hf_checkpoint,
    single_process_group,
)
from ..dtypes import CHECKPOINT_DTYPES, DTYPES
from ..hf_io import replace_directory, require_finite, sweep_temp_siblings, temp_sibling
from ..megatron import ParallelConfig, build_student, build_teacher, hf_to_megatron_state_dict, initialize_parallel
from ..megatron import restore_fp32_parameters
from ..megatron.mapping import megatron_key


class _OnMetaDevice(TorchFunctionMode):
    """Sends tensors created on a named device to the meta device; ``torch.device("meta")`` covers the unnamed
    ones. Needed because our layers create their parameters on an explicit CPU/CUDA device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("device") is not None:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device():
    """Every tensor created inside is a meta tensor: a model of any size is built without memory or init time."""
    with torch.device("meta"), _OnMetaDevice():
        yield


_LAYER_UNIT = re.compile(r"^decoder\.layers\.\d+(?=\.)")


def unit_of(name: str) -> str:
    """The streaming unit (a module path) of a Megatron parameter name or checkpoint key: its decoder layer
    (``decoder.layers.N``), or outside the layers the module holding it (``embedding.word_embeddings``, …)."""
    match = _LAYER_UNIT.match(name)
    return match.group(0) if match else name.rsplit(".", 1)[0]


class UnitState(Mapping):
    """The HF checkpoint as ``hf_to_megatron_state_dict`` sees it while one unit is converted: the unit's tensors
    read lazily, every other tensor a shape-only meta placeholder, so the mapping runs over the whole model but
    reads and converts only this unit (whose parameters are the only ones off the meta device)."""

    def __init__(self, tensors: LazyState, placeholders: dict[str, torch.Tensor], unit_names: set[str]):
        self.tensors, self.placeholders, self.unit_names = tensors, placeholders, unit_names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name] if name in self.unit_names else self.placeholders[name]

    def __iter__(self):
        return iter(self.placeholders)

    def __len__(self) -> int:
        return len(self.placeholders)


def _replace_parameters(module: torch.nn.Module, make: Callable[[torch.nn.Parameter], torch.Tensor]) -> None:
    """Swap every parameter of ``module`` for ``make(parameter)`` (a meta parameter cannot take CPU data in
    place), keeping the attributes Megatron and our layers set on parameters (TP axis, keep_fp32, …)."""
    for sub in module.modules():
        for leaf, param in list(sub.named_parameters(recurse=False)):
            new = torch.nn.Parameter(make(param), requires_grad=param.requires_grad)
            new.__dict__.update(param.__dict__)
            setattr(sub, leaf, new)


class StreamedShards:
    """The checkpoint shards of a meta-device ``model``, made from the HF checkpoint one unit at a time (see the
    module docstring). ``pop(key, global_offset)`` hands each shard out once; asking for a shard of another unit
    builds that unit (the previous one is used up by then). Every shard must be finite unless ``allow_nonfinite``."""

    def __init__(self, model: torch.nn.Module, reader, allow_nonfinite: bool = False):
        self.model, self.reader, self.allow_nonfinite = model, reader, allow_nonfinite
        self.placeholders = {name: torch.empty(reader.shape(name), device="meta") for name in reader.tensor_names()}
        self.hf_names: dict[str, set[str]] = defaultdict(set)  # unit -> the HF tensors it is made from
        for name in self.placeholders:
            self.hf_names[unit_of(megatron_key(name)[1])].add(name)
        self.shards: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def pop(self, key: str, global_offset: tuple[int, ...]) -> torch.Tensor:
        if (key, global_offset) not in self.shards:
            self.shards = {}  # the previous unit is written: drop it before building the next
            self.shards = self._build(unit_of(key))
        shard = self.shards.pop((key, global_offset))
        require_finite(key, shard, self.allow_nonfinite)
        return shard

    def _build(self, unit: str) -> dict[tuple[str, tuple[int, ...]], torch.Tensor]:
        module = self.model.get_submodule(unit)
        _replace_parameters(module, lambda p: torch.empty(p.shape, dtype=p.dtype))  # CPU targets: converted for real
        hf_state = UnitState(LazyState(self.reader), self.placeholders, self.hf_names[unit])
        state = hf_to_megatron_state_dict(self.model, hf_state)
        for name, param in module.named_parameters(prefix=unit):
            param.data = state[name]
        sharded = self.model.sharded_state_dict()
        apply_factories(sharded)  # e.g. the [gate; up] split of the experts' linear_fc1
        shards = {(t.key, tuple(t.global_offset)): t.data.detach() for t in nested_values(sharded)
                  if isinstance(t, ShardedTensor) and unit_of(t.key) == unit}
        _replace_parameters(module, lambda p: torch.empty_like(p, device="meta"))
        return shards


def check_layout(config, tp: int, ep: int) -> None:
    for field in ("num_attention_heads", "num_key_value_heads"):
        if getattr(config, field) % tp:
            raise ConversionError(f"--tp {tp}: config field '{field}' ({getattr(config, field)}) is not divisible by it")
    if config.num_local_experts % ep:
        raise ConversionError(f"--ep {ep}: config field 'num_local_experts' ({config.num_local_experts}) is not "
                              "divisible by it")


def convert_hf_to_megatron(hf_dir: str | Path, output_dir: str | Path, role: str, tp: int = 1, ep: int = 1,
                           dtype: str = "bf16", force: bool = False, allow_nonfinite: bool = False) -> dict:
    """Write the Megatron checkpoint; returns its record (stored form) plus ``bytes`` and ``seconds``."""
    if role not in MODEL_TYPES:
        raise ConversionError(f"--role {role!r}: choose one of {sorted(MODEL_TYPES)}")
    if tp < 1 or ep < 1:
        raise ConversionError(f"--tp {tp} / --ep {ep}: parallel sizes must be positive")
    if dtype not in CHECKPOINT_DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {list(CHECKPOINT_DTYPES)}")
    output_dir = Path(output_dir)
    if output_dir.exists() and not force:
        raise FileExistsError(f"{output_dir}: already exists; pass --force to replace it")
    start = time.perf_counter()
    reader, config, config_dict = open_hf_checkpoint(hf_dir, role)
    check_layout(config, tp, ep)
    record = CheckpointRecord(role=role, hf_config=config_dict, source=str(Path(hf_dir).resolve()),
                              stage="converted from HF", tokens_seen=0, dtype=dtype,
                              layout=CheckpointLayout(written_tp=1, written_ep=1, target_tp=tp, target_ep=ep))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_temp_siblings(output_dir)
    tmp = temp_sibling(output_dir)
    try:
        with single_process_group():
            parallel = ParallelConfig(params_dtype=DTYPES[dtype], make_vocab_size_divisible_by=VOCAB_DIVISIBLE_BY * tp)
            initialize_parallel(parallel)
            with meta_device():  # structure only; StreamedShards makes the data unit by unit
                model = build_student(config, parallel) if role == "student" else build_teacher(config, parallel)
            restore_fp32_parameters(model)  # router and KDA decay parameters stay fp32, as in training
            nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t))
            sharded = model.sharded_state_dict()
            sharded[METADATA_KEY] = record.to_dict()
            (tmp / RELEASE_NAME).mkdir()
            strategy = StreamingSaveStrategy(StreamedShards(model, reader, allow_nonfinite).pop, unit_of)
            try:
                dist_checkpointing.save(sharded, str(tmp / RELEASE_NAME), sharded_strategy=strategy)
            except CheckpointException as e:  # DCP wraps what the data source raised; that error names the tensor
                raise next(iter(e.failures.values()))[0] from None
            del model, sharded
        (tmp / TRACKER_NAME).write_text(RELEASE_NAME + "\n")
        tmp.chmod(0o755)  # mkdtemp creates it 0700
        replace_directory(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**record.to_dict(), "bytes": nbytes, "seconds": time.perf_counter() - start}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, help="HF checkpoint dir: gpt-oss (teacher) or init-student output")
    parser.add_argument("--output", required=True, help="Megatron checkpoint dir to create (release/ + tracker)")
    parser.add_argument("--role", required=True, choices=sorted(MODEL_TYPES))
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size it will be loaded at (vocab padding)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size it will be loaded at (checked)")
    parser.add_argument("--dtype", choices=CHECKPOINT_DTYPES, default="bf16",
                        help="parameter dtype (router and KDA A_log/dt_bias stay fp32)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="write tensors holding NaN/Inf (default: stop, naming the first such tensor)")


def run(args: argparse.Namespace) -> int:
    result = convert_hf_to_megatron(args.hf, args.output, args.role, args.tp, args.ep, args.dtype, args.force,
                                    args.allow_nonfinite)
    mb = result["bytes"] / 2**20
    print(f"wrote {args.role} Megatron checkpoint {args.output} ({mb:.1f} MiB in {result['seconds']:.1f}s, "
          f"{mb / result['seconds']:.1f} MB/s); vocabulary padded for TP={args.tp}")
    return 0
