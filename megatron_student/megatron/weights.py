"""HF → Megatron weights, in memory, for this rank's tensor- and expert-parallel shard.

The HF side is the teacher (transformers ``GptOssForCausalLM`` names) or the HF student (``StudentForCausalLM``,
same names plus its attention parameters). Which HF tensor feeds which Megatron parameter, and how, is the
mapping table of ``megatron.mapping`` (shared with the HF export); this module adds the parallel layout: the
pipeline layer offset, the split on each parameter's TP axis, and this EP rank's experts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from .mapping import hf_source


def _tp_split(tensor: torch.Tensor, axis: int, rank: int, size: int, what: str) -> torch.Tensor:
    if tensor.shape[axis] % size:
        raise ValueError(f"{what}: axis {axis} of {tuple(tensor.shape)} is not divisible by TP={size}")
    return tensor.chunk(size, dim=axis)[rank]


def hf_to_megatron_state_dict(model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's Megatron state dict (keys of ``model.state_dict()``) from a full HF state dict. ``model`` is a
    model from ``build_student``/``build_teacher`` (it supplies local shapes, TP axes and the padded vocabulary);
    the TP/EP ranks and the PP layer offset come from Megatron's initialised process groups."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    local_experts = model.config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
    layer_offset = get_transformer_layer_offset(model.config)
    out: dict[str, torch.Tensor] = {}
    for name, target in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        row, fields = hf_source(name)
        if "layer" in fields:
            fields["layer"] = int(fields["layer"]) + layer_offset
        hf_name = row.hf.format(**fields)
        if hf_name not in hf_state:
            raise KeyError(f"{name}: HF state has no {hf_name}")
        hf = hf_state[hf_name]
        tp_axis = None
        if row.split == "experts":
            hf = hf[ep_rank * local_experts + int(fields["expert"])]
        elif row.split == "rows":
            tp_axis = 0
        elif row.split == "declared" and getattr(target, "tensor_model_parallel", False):
            tp_axis = target.partition_dim
        global_shape = list(target.shape)
        if tp_axis is not None:
            global_shape[tp_axis] *= tp_size
        global_shape = torch.Size(global_shape)
        try:
            tensor = row.to_megatron(hf, global_shape)
        except RuntimeError as e:  # a reshape of the wrong element count
            raise ValueError(f"{name}: HF tensor {tuple(hf.shape)} does not fit the global shape "
                             f"{list(global_shape)}") from e
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
        if tp_axis is not None:
            tensor = _tp_split(tensor, tp_axis, tp_rank, tp_size, name)
        if tensor.shape != target.shape:
            raise ValueError(f"{name}: mapped shape {tuple(tensor.shape)} != Megatron shape {tuple(target.shape)}")
        out[name] = tensor.to(dtype=target.dtype, device=target.device)
    return out


def load_hf_weights(model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor]) -> None:
    """Copy a full HF state dict into this rank's shard of ``model`` (strict: every Megatron tensor is set)."""
    model.load_state_dict(hf_to_megatron_state_dict(model, hf_state), strict=True)
