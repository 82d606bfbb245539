"""The one HF ↔ Megatron-Core mapping: a table of rows that both directions iterate.

- ``megatron.weights.hf_to_megatron_state_dict`` (training, ``convert-hf-to-megatron``): for each of this rank's
  Megatron parameters, the row that names its HF tensor; ``to_megatron`` gives the global Megatron tensor, which
  is then split on the parameter's TP axis (expert rows: this EP rank's experts, never TP).
- ``convert.megatron_to_hf.megatron_source`` (``convert-megatron-to-hf``): for each HF tensor, the row that names
  its global dist-checkpoint key; ``to_hf`` turns that tensor into the HF one.

| HF | Megatron parameter (checkpoint key where it differs) | to Megatron / to HF |
|---|---|---|
| ``model.embed_tokens.weight`` / ``lm_head.weight`` | ``embedding.word_embeddings.weight`` / ``output_layer.weight`` | zero-pad to the padded vocabulary / drop the padding |
| ``model.norm.weight`` | ``decoder.final_layernorm.weight`` | copy |
| ``model.layers.N.input_layernorm.weight`` / ``post_attention_layernorm.weight`` | ``decoder.layers.N.input_layernorm.weight`` / ``pre_mlp_layernorm.weight`` | copy |
| ``model.layers.N.mlp.router.{weight,bias}`` | ``decoder.layers.N.mlp.router.{weight,bias}`` | copy |
| ``model.layers.N.self_attn.<p>`` | ``decoder.layers.N.self_attention.<p>`` | reshape to the other side's shape (``o_proj.weight`` splits its input axis over TP) |
| ``mlp.experts.gate_up_proj`` [E, H, 2I] interleaved, ``gate_up_proj_bias`` | ``mlp.experts.local_experts.j.linear_fc1.{weight [2I, H], bias}`` (``mlp.experts.experts.linear_fc1.*`` [E, …]) | transpose, de-interleave to [gate; up] / re-interleave (gate even, up odd), transpose |
| ``mlp.experts.down_proj`` [E, I, H], ``down_proj_bias`` | ``linear_fc2.{weight [H, I], bias}`` | transpose |

Layer numbers are global on both sides of the table (a pipeline stage's local layer i is N = i + its offset).
The GQA layout needs no regrouping: q, k and v stay separate projections whose heads are contiguous, so a
contiguous TP split gives each rank whole query groups with their key/value heads.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

SPLITS = ("replicated", "rows", "declared", "experts")
Transform = Callable[[torch.Tensor, torch.Size], torch.Tensor]  # (source tensor, target shape) → target tensor


def _copy(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return tensor


def _reshape(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return tensor.reshape(shape)


def _pad_vocab(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if tensor.shape[0] > shape[0]:
        raise ValueError(f"{tensor.shape[0]} rows exceed the padded vocabulary {shape[0]}")
    return torch.cat([tensor, tensor.new_zeros(shape[0] - tensor.shape[0], *tensor.shape[1:])])


def _drop_vocab_padding(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return tensor[: shape[0]]


def deinterleave_gate_up(weight_or_bias: torch.Tensor) -> torch.Tensor:
    """HF interleaved rows (gate even, up odd) → Megatron [gate; up] along dim 0."""
    return torch.cat([weight_or_bias[0::2], weight_or_bias[1::2]], dim=0)


def interleave_gate_up(stacked: torch.Tensor, dim: int) -> torch.Tensor:
    """Megatron [gate; up] along ``dim`` → HF interleaved (gate even, up odd); inverse of
    :func:`deinterleave_gate_up`."""
    gate, up = stacked.chunk(2, dim=dim)
    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)


def _pattern(template: str) -> re.Pattern:
    """``{layer}``/``{expert}`` match an index, ``{param}`` a dotted parameter path; the rest literally."""
    parts = re.split(r"\{(\w+)\}", template)
    groups = {"layer": r"\d+", "expert": r"\d+", "param": r".+"}
    regex = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{groups[part]})" for i, part in enumerate(parts))
    return re.compile(f"^{regex}$")


@dataclass(frozen=True)
class TensorMapping:
    """One row: an HF name pattern and a Megatron parameter pattern, the transform of each direction, and how the
    global Megatron tensor is split over ranks (``split``):

    - ``replicated``: every rank holds it whole;
    - ``rows``: split on axis 0 over TP (the vocabulary of the embedding and the output layer);
    - ``declared``: split on the TP axis the parameter declares (``partition_dim``), whole when it declares none;
    - ``experts``: the HF tensor stacks every expert [E, …] while Megatron holds one parameter per local expert
      (``{expert}``), split over expert parallelism (expert TP is 1); ``to_megatron`` then maps one expert's
      slice, ``to_hf`` the stacked checkpoint tensor (``checkpoint``: ``SequentialMLP`` saves its experts
      stacked)."""

    hf: str
    megatron: str
    to_megatron: Transform
    to_hf: Transform
    split: str = "replicated"
    checkpoint: str | None = None  # the dist-checkpoint key pattern where it differs from ``megatron``
    _hf_regex: re.Pattern = field(init=False, repr=False, compare=False)
    _megatron_regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"{self.hf}: split {self.split!r} is not one of {SPLITS}")
        object.__setattr__(self, "_hf_regex", _pattern(self.hf))
        object.__setattr__(self, "_megatron_regex", _pattern(self.megatron))


_LAYER = "model.layers.{layer}."
_DECODER = "decoder.layers.{layer}."
_EXPERTS = _DECODER + "mlp.experts.local_experts.{expert}."
_STACKED = _DECODER + "mlp.experts.experts."

MAPPINGS: tuple[TensorMapping, ...] = (
    TensorMapping("model.embed_tokens.weight", "embedding.word_embeddings.weight", _pad_vocab, _drop_vocab_padding,
                  split="rows"),
    TensorMapping("lm_head.weight", "output_layer.weight", _pad_vocab, _drop_vocab_padding, split="rows"),
    TensorMapping("model.norm.weight", "decoder.final_layernorm.weight", _copy, _copy),
    TensorMapping(_LAYER + "input_layernorm.weight", _DECODER + "input_layernorm.weight", _copy, _copy),
    TensorMapping(_LAYER + "post_attention_layernorm.weight", _DECODER + "pre_mlp_layernorm.weight", _copy, _copy),
    TensorMapping(_LAYER + "mlp.router.weight", _DECODER + "mlp.router.weight", _copy, _copy),
    TensorMapping(_LAYER + "mlp.router.bias", _DECODER + "mlp.router.bias", _copy, _copy),
    TensorMapping(_LAYER + "self_attn.{param}", _DECODER + "self_attention.{param}", _reshape, _reshape,
                  split="declared"),
    TensorMapping(_LAYER + "mlp.experts.gate_up_proj", _EXPERTS + "linear_fc1.weight",
                  lambda t, shape: deinterleave_gate_up(t.t()),
                  lambda t, shape: interleave_gate_up(t, 1).transpose(1, 2),
                  split="experts", checkpoint=_STACKED + "linear_fc1.weight"),
    TensorMapping(_LAYER + "mlp.experts.gate_up_proj_bias", _EXPERTS + "linear_fc1.bias",
                  lambda t, shape: deinterleave_gate_up(t), lambda t, shape: interleave_gate_up(t, 1),
                  split="experts", checkpoint=_STACKED + "linear_fc1.bias"),
    TensorMapping(_LAYER + "mlp.experts.down_proj", _EXPERTS + "linear_fc2.weight",
                  lambda t, shape: t.t(), lambda t, shape: t.transpose(1, 2),
                  split="experts", checkpoint=_STACKED + "linear_fc2.weight"),
    TensorMapping(_LAYER + "mlp.experts.down_proj_bias", _EXPERTS + "linear_fc2.bias", _copy, _copy,
                  split="experts", checkpoint=_STACKED + "linear_fc2.bias"),
)


def hf_source(megatron_name: str) -> tuple[TensorMapping, dict[str, str]]:
    """The row of a Megatron parameter name and the fields (``layer``, ``expert``, ``param``) it matched."""
    for row in MAPPINGS:
        match = row._megatron_regex.match(megatron_name)
        if match:
            return row, match.groupdict()
    raise KeyError(f"no HF source for Megatron parameter {megatron_name}")


def megatron_key(hf_name: str) -> tuple[TensorMapping, str]:
    """The row of an HF tensor name and the global dist-checkpoint key that holds it."""
    for row in MAPPINGS:
        match = row._hf_regex.match(hf_name)
        if match:
            return row, (row.checkpoint or row.megatron).format(**match.groupdict())
    raise KeyError(f"no Megatron source for HF tensor '{hf_name}'")
