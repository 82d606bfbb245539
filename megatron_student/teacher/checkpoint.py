"""Read (and write) local gpt-oss checkpoints in HF format with our own reader.

A checkpoint dir holds ``config.json`` and either ``model.safetensors`` or ``model.safetensors.index.json``
plus its shards. Weights are bf16 (or fp32), or, for gpt-oss's released checkpoints, MXFP4 experts stored
as ``<name>_blocks`` / ``<name>_scales`` in the packed [E, out, in/32, 16] layout; those are dequantised
by ``mxfp4.dequantize_mxfp4`` and transposed to HF's in-memory [E, in, out] parameter layout. Tensors are
read one at a time (``safe_open``), so a converter can stream a 120b checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers.initialization import no_init_weights

from ..hf_io import SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME, StreamingCheckpointWriter
from .config import CONFIG_NAME, read_config_dict, validate_gpt_oss_config
from .mxfp4 import BLOCK_SIZE, dequantize_mxfp4

GENERATION_CONFIG_NAME = "generation_config.json"
MXFP4_BLOCKS_SUFFIX = "_blocks"
MXFP4_SCALES_SUFFIX = "_scales"


class TeacherCheckpointError(ValueError):
    """A checkpoint whose tensors or files do not match what a gpt-oss model needs."""


def safetensors_names(path: Path) -> set[str]:
    """The tensor names of a safetensors file, opening it (which checks that its header is complete and its data
    covers every tensor); a damaged or truncated file is named."""
    try:
        with safe_open(path, framework="pt") as f:
            return set(f.keys())
    except SafetensorError as e:
        raise TeacherCheckpointError(f"{path}: not a readable safetensors file ({e}; {path.stat().st_size} bytes): it is "
                                     "truncated or damaged, copy or download it again") from None


def stored_tensor_files(directory: Path) -> dict[str, Path]:
    """Stored tensor name -> safetensors file, checking that the index and its shards agree and that every file
    is complete."""
    single, index = directory / SAFETENSORS_NAME, directory / SAFETENSORS_INDEX_NAME
    if single.is_file() and index.is_file():
        raise TeacherCheckpointError(
            f"{directory}: holds both {SAFETENSORS_NAME} and {SAFETENSORS_INDEX_NAME}; remove the stale one"
        )
    if single.is_file():
        return dict.fromkeys(safetensors_names(single), single)
    if not index.is_file():
        raise FileNotFoundError(f"{directory}: no {SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME}")
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except json.JSONDecodeError as e:
        raise TeacherCheckpointError(f"{index}: invalid JSON ({e}); the index is truncated or damaged") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise TeacherCheckpointError(f"{index}: has no 'weight_map'")
    files: dict[str, Path] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = directory / shard_name
        if not shard.is_file():
            raise FileNotFoundError(f"{shard}: shard listed in {index} is missing")
        present = safetensors_names(shard)
        for name in (n for n, s in weight_map.items() if s == shard_name):
            if name not in present:
                raise TeacherCheckpointError(f"{index}: maps tensor '{name}' to {shard_name}, which does not hold it")
            files[name] = shard
    return files


class TeacherCheckpoint:
    """Lazy view of a local gpt-oss checkpoint under its logical HF tensor names (after dequantisation)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.config_dict, self.config_file = read_config_dict(self.directory)
        self.config: transformers.GptOssConfig = transformers.GptOssConfig.from_dict(self.config_dict)
        quant = self.config_dict.get("quantization_config")
        self.quantization: str | None = quant["quant_method"] if quant else None
        self._files = stored_tensor_files(self.directory)
        self._packed: dict[str, tuple[str, str]] = {}  # logical name -> (blocks name, scales name)
        self._plain: list[str] = []
        for name in self._files:
            if name.endswith(MXFP4_SCALES_SUFFIX) and name[: -len(MXFP4_SCALES_SUFFIX)] + MXFP4_BLOCKS_SUFFIX in self._files:
                continue  # the partner of a *_blocks tensor
            if not name.endswith(MXFP4_BLOCKS_SUFFIX):
                self._plain.append(name)
                continue
            logical = name[: -len(MXFP4_BLOCKS_SUFFIX)]
            scales = logical + MXFP4_SCALES_SUFFIX
            if self.quantization != "mxfp4":
                raise TeacherCheckpointError(
                    f"{self._files[name]}: tensor '{name}' is MXFP4-packed but {self.config_file} has no "
                    "quantization_config with quant_method 'mxfp4'"
                )
            if scales not in self._files:
                raise TeacherCheckpointError(f"{self._files[name]}: tensor '{name}' has no matching '{scales}'")
            if logical in self._files:
                raise TeacherCheckpointError(f"{self._files[name]}: '{logical}' is stored both packed and unpacked")
            self._packed[logical] = (name, scales)

    def tensor_names(self) -> list[str]:
        """Logical HF tensor names, e.g. ``model.layers.0.mlp.experts.gate_up_proj`` for a packed expert weight."""
        return sorted([*self._plain, *self._packed])

    def __contains__(self, name: str) -> bool:
        return name in self._packed or name in self._plain

    def _check_name(self, name: str) -> None:
        if name not in self:
            raise KeyError(f"{self.directory}: no tensor '{name}' in the checkpoint")

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self._files[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``get(name)`` from the safetensors headers, without reading the data."""
        self._check_name(name)
        if name not in self._packed:
            return self._stored_shape(name)
        blocks_shape = self._stored_shape(self._packed[name][0])
        *lead, rows, groups, _ = blocks_shape
        return (*lead, groups * BLOCK_SIZE, rows)

    def _read(self, name: str) -> torch.Tensor:
        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name)

    def get(self, name: str) -> torch.Tensor:
        """One tensor; MXFP4 experts come back dequantised to bf16 in HF's [E, in, out] layout."""
        self._check_name(name)
        if name not in self._packed:
            return self._read(name)
        blocks_name, scales_name = self._packed[name]
        blocks, scales = self._read(blocks_name), self._read(scales_name)
        if blocks.dim() != 4 or tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != BLOCK_SIZE // 2:
            raise TeacherCheckpointError(
                f"{self._files[blocks_name]}: '{blocks_name}' {tuple(blocks.shape)} / '{scales_name}' "
                f"{tuple(scales.shape)} are not MXFP4 expert tensors [E, out, G, 16] / [E, out, G]"
            )
        return dequantize_mxfp4(blocks, scales, torch.bfloat16).transpose(1, 2).contiguous()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor under its logical name (for small models)."""
        return {name: self.get(name) for name in self.tensor_names()}


def _summarise(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_teacher_model(
    directory: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> transformers.GptOssForCausalLM:
    """A ``GptOssForCausalLM`` built from the checkpoint's config with weights read by ``TeacherCheckpoint``.

    Strict: every model tensor must be present with the right shape and nothing else may be stored.
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"load_teacher_model supports torch.float32 or torch.bfloat16, got {dtype}")
    ckpt = TeacherCheckpoint(directory)
    config = copy.deepcopy(ckpt.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are dequantised by us: build a plain model
    with no_init_weights(), torch.device(device):
        model = transformers.GptOssForCausalLM._from_config(config, dtype=dtype)
    params = model.state_dict()
    stored = set(ckpt.tensor_names())
    missing = sorted(set(params) - stored)
    if missing:
        raise TeacherCheckpointError(f"{ckpt.directory}: missing tensors {_summarise(missing)}")
    unexpected = sorted(stored - set(params))
    if unexpected:
        raise TeacherCheckpointError(f"{ckpt.directory}: unexpected tensors {_summarise(unexpected)}")
    for name, param in params.items():
        if ckpt.shape(name) != tuple(param.shape):
            raise TeacherCheckpointError(
                f"{ckpt.directory}: tensor '{name}' has shape {ckpt.shape(name)}, the model expects {tuple(param.shape)}"
            )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(ckpt.get(name))
    if (ckpt.directory / GENERATION_CONFIG_NAME).is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(ckpt.directory)
    return model.eval()


def save_hf_checkpoint(
    state_dict: dict[str, torch.Tensor],
    config: transformers.PreTrainedConfig | dict,
    out_dir: str | os.PathLike,
    max_shard_bytes: int | None = None,
    generation_config: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``state_dict`` (stored names, e.g. MXFP4 ``*_blocks``/``*_scales``) + config.json as an HF checkpoint.

    One ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``
    when the tensors exceed ``max_shard_bytes``. Everything is written to a temporary sibling dir which is then
    renamed to ``out_dir``, so a reader never sees a half-written checkpoint.
    """
    out_dir = Path(out_dir)
    config_dict = config.to_dict() if isinstance(config, transformers.PreTrainedConfig) else dict(config)
    validate_gpt_oss_config(config_dict, out_dir / CONFIG_NAME)
    writer = StreamingCheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes or 2**62, force=overwrite)
    with writer:
        for name, tensor in state_dict.items():
            writer.add(name, tensor)
        writer.write_json(CONFIG_NAME, config_dict)
        if generation_config is not None:
            writer.write_json(GENERATION_CONFIG_NAME, generation_config)
    return out_dir
