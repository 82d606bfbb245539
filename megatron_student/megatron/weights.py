"""HF → Megatron weights, in memory, for this rank's tensor- and expert-parallel shard.

The HF side is the teacher (transformers ``GptOssForCausalLM`` names) or the HF student (``StudentForCausalLM``,
same names plus its attention parameters). Rules:

| HF | Megatron (local module names) | rule |
|---|---|---|
| ``model.embed_tokens.weight`` / ``lm_head.weight`` | ``embedding.word_embeddings.weight`` / ``output_layer.weight`` | zero-padded to the padded vocabulary, rows split over TP |
| ``model.norm.weight`` | ``decoder.final_layernorm.weight`` | copy |
| ``model.layers.N.input_layernorm.weight`` / ``post_attention_layernorm.weight`` | ``decoder.layers.i.input_layernorm.weight`` / ``pre_mlp_layernorm.weight`` | copy (i = N − PP offset) |
| ``model.layers.N.self_attn.<p>`` | ``decoder.layers.i.self_attention.<p>`` | reshaped to the Megatron parameter's global shape, then split on its TP axis (``partition_dim``); replicated parameters copied. ``o_proj.weight`` splits its input axis |
| ``model.layers.N.mlp.router.{weight,bias}`` | ``decoder.layers.i.mlp.router.{weight,bias}`` | copy |
| ``mlp.experts.gate_up_proj[e]`` [H, 2I] interleaved, ``gate_up_proj_bias[e]`` | ``mlp.experts.local_experts.j.linear_fc1.{weight [2I, H], bias}`` | transpose, de-interleave to [gate; up]; e = EP rank · local experts + j |
| ``mlp.experts.down_proj[e]`` [I, H], ``down_proj_bias[e]`` | ``linear_fc2.{weight [H, I], bias}`` | transpose |

The GQA layout needs no regrouping: q, k and v stay separate projections whose heads are contiguous, so a
contiguous TP split gives each rank whole query groups with their key/value heads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.(weight|bias)$")


def _tp_split(tensor: torch.Tensor, axis: int, rank: int, size: int, what: str) -> torch.Tensor:
    if tensor.shape[axis] % size:
        raise ValueError(f"{what}: axis {axis} of {tuple(tensor.shape)} is not divisible by TP={size}")
    return tensor.chunk(size, dim=axis)[rank]


def _vocab(hf: torch.Tensor, padded: int, rank: int, size: int, what: str) -> torch.Tensor:
    if hf.shape[0] > padded:
        raise ValueError(f"{what}: {hf.shape[0]} rows exceed the padded vocabulary {padded}")
    full = torch.cat([hf, hf.new_zeros(padded - hf.shape[0], *hf.shape[1:])])
    return _tp_split(full, 0, rank, size, what)


def deinterleave_gate_up(weight_or_bias: torch.Tensor) -> torch.Tensor:
    """HF interleaved rows (gate even, up odd) → Megatron [gate; up] along dim 0."""
    return torch.cat([weight_or_bias[0::2], weight_or_bias[1::2]], dim=0)


def _expert(hf_state, hf_layer: str, expert: int, linear: str, kind: str) -> torch.Tensor:
    p = f"{hf_layer}.mlp.experts."
    if linear == "linear_fc1":
        tensor = hf_state[p + "gate_up_proj"][expert].t() if kind == "weight" else hf_state[p + "gate_up_proj_bias"][expert]
        return deinterleave_gate_up(tensor)
    return hf_state[p + "down_proj"][expert].t() if kind == "weight" else hf_state[p + "down_proj_bias"][expert]


def _attention(hf_tensor: torch.Tensor, param: torch.Tensor, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Reshape the HF tensor to the Megatron parameter's global shape and take this rank's part."""
    tp_axis = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
    global_shape = list(param.shape)
    if tp_axis is not None:
        global_shape[tp_axis] *= tp_size
    if hf_tensor.numel() != torch.Size(global_shape).numel():
        raise ValueError(f"{name}: HF tensor {tuple(hf_tensor.shape)} does not fit the global shape {global_shape}")
    tensor = hf_tensor.reshape(global_shape)
    return tensor if tp_axis is None else _tp_split(tensor, tp_axis, tp_rank, tp_size, name)


def hf_to_megatron_state_dict(model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's Megatron state dict (keys of ``model.state_dict()``) from a full HF state dict. ``model`` is a
    model from ``build_student``/``build_teacher`` (it supplies local shapes, TP axes and the padded vocabulary);
    the TP/EP ranks and the PP layer offset come from Megatron's initialised process groups."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    layer_offset = get_transformer_layer_offset(model.config)
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for name, target in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            hf_name = "model.embed_tokens.weight" if name.startswith("embedding") else "lm_head.weight"
            tensor = _vocab(hf_state[hf_name], target.shape[0] * tp_size, tp_rank, tp_size, name)
        elif name == "decoder.final_layernorm.weight":
            tensor = hf_state["model.norm.weight"]
        else:
            match = _LAYER.match(name)
            if match is None:
                raise KeyError(f"no HF source for Megatron parameter {name}")
            hf_layer = f"model.layers.{int(match.group(1)) + layer_offset}"
            rest = match.group(2)
            expert = _EXPERT.match(rest)
            if rest == "input_layernorm.weight":
                tensor = hf_state[f"{hf_layer}.input_layernorm.weight"]
            elif rest == "pre_mlp_layernorm.weight":
                tensor = hf_state[f"{hf_layer}.post_attention_layernorm.weight"]
            elif rest in ("mlp.router.weight", "mlp.router.bias"):
                tensor = hf_state[f"{hf_layer}.{rest}"]
            elif expert is not None:
                local_experts = len(model.decoder.layers[int(match.group(1))].mlp.experts.local_experts)
                tensor = _expert(hf_state, hf_layer, ep_rank * local_experts + int(expert.group(1)),
                                 expert.group(2), expert.group(3))
            elif rest.startswith("self_attention."):
                hf_name = f"{hf_layer}.self_attn.{rest[len('self_attention.'):]}"
                if hf_name not in hf_state:
                    raise KeyError(f"{name}: HF state has no {hf_name}")
                tensor = _attention(hf_state[hf_name], params[name], name, tp_rank, tp_size)
            else:
                raise KeyError(f"no HF source for Megatron parameter {name}")
        if tensor.shape != target.shape:
            raise ValueError(f"{name}: mapped shape {tuple(tensor.shape)} != Megatron shape {tuple(target.shape)}")
        out[name] = tensor.to(dtype=target.dtype, device=target.device)
    return out


def load_hf_weights(model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor]) -> None:
    """Copy a full HF state dict into this rank's shard of ``model`` (strict: every Megatron tensor is set)."""
    model.load_state_dict(hf_to_megatron_state_dict(model, hf_state), strict=True)
