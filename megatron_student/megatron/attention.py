"""Tensor-parallel Megatron-Core ``self_attention`` modules: softmax attention with sinks (teacher and kept
student layers), SWA + TPA with sinks, and Kimi Delta Attention. The math is ``megatron_student.ops``.

Module contract (megatron.md §2): built with ``(config, layer_number, pg_collection, settings=...)``; forward takes
``hidden_states [s, b, h]`` (``s`` is this rank's shard under sequence parallelism) and returns ``(out, bias)`` for
the layer's bias-dropout-add. Heads are split contiguously over TP. Each module gathers the sequence once on entry
(``gather_from_sequence_parallel_region`` under SP, ``copy_to_tensor_model_parallel_region`` otherwise, whose
backward reduces the input gradient over TP), applies its local projections to the full sequence and leaves
through a ``RowParallelLinear`` ``o_proj`` (reduce-scatter under SP, all-reduce otherwise).

Positions restart in every packed document (``packed_seq_params.cu_seqlens_q``, batch 1), as in the HF student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from ..ops.attention import sink_attention
from ..ops.kda import causal_short_conv, gated_rms_norm, kda_from_logits
from ..ops.rope import YarnRope, apply_grape_m, apply_rotary, orthogonal_from_skew, rope_cos_sin, token_positions
from ..ops.tpa import tpa_combine
from .layers import Projection, new_parameter

KINDS = ("swa_tpa", "kda", "softmax_sliding", "softmax_full")


@dataclass(frozen=True)
class AttentionSettings:
    """Everything one layer's attention needs beyond the TransformerConfig (from the HF student/teacher config)."""

    kind: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: YarnRope
    window: int | None = None
    attention_bias: bool = True
    backend: str = "auto"
    # swa_tpa
    q_rank: int | None = None
    k_rank: int | None = None
    v_rank: int | None = None
    tpa_contextual: bool = True
    grape: bool = False
    grape_learned_basis: bool = False
    # kda
    kda_num_heads: int | None = None
    kda_num_v_heads: int | None = None
    kda_conv_size: int = 4
    kda_lower_bound: float | None = None
    norm_eps: float = 1e-5


def _local(count: int, tp_size: int, what: str) -> int:
    if count % tp_size:
        raise ValueError(f"{what}={count} is not divisible by the tensor-parallel size {tp_size}")
    return count // tp_size


class _TensorParallelAttention(MegatronModule):
    """Shared plumbing: process group, sequence gather on entry, row-parallel o_proj on exit, positions, and a
    ``sharded_state_dict`` that declares the TP axis of every sharded parameter."""

    def __init__(self, config, layer_number: int, pg_collection=None, settings: AttentionSettings | None = None,
                 cp_comm_type=None):
        super().__init__(config=config)
        if settings is None:
            raise ValueError("attention modules need `settings` (AttentionSettings) in their ModuleSpec params")
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism is not supported by the student/teacher attention modules")
        self.settings = settings
        self.layer_number = layer_number
        self.tp_group = pg_collection.tp if pg_collection is not None else parallel_state.get_tensor_model_parallel_group()
        self.tp_size = self.tp_group.size()
        self.tp_rank = self.tp_group.rank()
        # Plain attribute, not a buffer: a bf16 cast of the module must not round the frequencies.
        self._inv_freq = settings.rope.inv_freq()

    def _build_o_proj(self, local_in: int) -> None:
        self.o_proj = RowParallelLinear(
            local_in * self.tp_size, self.config.hidden_size, config=self.config,
            init_method=self.config.output_layer_init_method, bias=self.settings.attention_bias,
            input_is_parallel=True, skip_bias_add=True, is_expert=False, tp_group=self.tp_group)

    def _enter(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[s, b, h] (sequence shard under SP) → [b, S, h], the full sequence on every TP rank."""
        if self.config.sequence_parallel:
            x = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True, group=self.tp_group)
        else:
            x = copy_to_tensor_model_parallel_region(hidden_states, group=self.tp_group)
        return x.transpose(0, 1)

    def _exit(self, o: torch.Tensor):
        """o [b, S, local features] → (out [s, b, h], bias)."""
        return self.o_proj(o.transpose(0, 1).contiguous())

    @staticmethod
    def _cu_seqlens(packed_seq_params, batch: int):
        if packed_seq_params is None:
            return None
        if packed_seq_params.qkv_format != "thd" or batch != 1:
            raise ValueError(f"packed sequences need qkv_format='thd' and batch 1, got "
                             f"{packed_seq_params.qkv_format!r} and batch {batch}")
        cu = packed_seq_params.cu_seqlens_q
        if packed_seq_params.cu_seqlens_kv is not None and not torch.equal(cu, packed_seq_params.cu_seqlens_kv):
            raise ValueError("self-attention needs cu_seqlens_q == cu_seqlens_kv")
        return cu

    def _cos_sin(self, ids: torch.Tensor, inv_freq: torch.Tensor | None = None):
        inv_freq = self._inv_freq.to(ids.device) if inv_freq is None else inv_freq
        return rope_cos_sin(ids[None], inv_freq, self.settings.rope.concentration)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {name: p for name, p in self.state_dict(keep_vars=True).items() if not name.startswith("o_proj.")}
        axes = {}
        for name, p in own.items():
            if getattr(p, "tensor_model_parallel", False):
                axes[name] = p.partition_dim
        sharded = make_sharded_tensors_for_checkpoint(
            own, prefix, axes, sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        sharded.update(self.o_proj.sharded_state_dict(f"{prefix}o_proj.", sharded_offsets, metadata))
        return sharded


class SoftmaxSinkAttention(_TensorParallelAttention):
    """gpt-oss attention: GQA + learned sinks + YaRN RoPE, sliding (``settings.window`` keys) or full causal.
    Query and key/value heads are split over TP (needs KV heads divisible by TP)."""

    def __init__(self, config, layer_number, pg_collection=None, settings=None, cp_comm_type=None):
        super().__init__(config, layer_number, pg_collection, settings)
        s = settings
        self.heads = _local(s.num_heads, self.tp_size, "num_attention_heads")
        self.kv_heads = _local(s.num_kv_heads, self.tp_size, "num_key_value_heads")
        D, hidden = s.head_dim, config.hidden_size
        self.q_proj = Projection(config, hidden, (self.heads * D,), bias=s.attention_bias, tp_axis=0)
        self.k_proj = Projection(config, hidden, (self.kv_heads * D,), bias=s.attention_bias, tp_axis=0)
        self.v_proj = Projection(config, hidden, (self.kv_heads * D,), bias=s.attention_bias, tp_axis=0)
        self.sinks = new_parameter(config, (self.heads,), tp_axis=0)
        self._build_o_proj(self.heads * D)

    def forward(self, hidden_states, attention_mask=None, packed_seq_params=None, **kwargs):
        x = self._enter(hidden_states)
        B, S, _ = x.shape
        D = self.settings.head_dim
        cu_seqlens = self._cu_seqlens(packed_seq_params, B)
        cos, sin = self._cos_sin(token_positions(S, x.device, cu_seqlens))
        q = apply_rotary(self.q_proj(x).view(B, S, self.heads, D), cos, sin)
        k = apply_rotary(self.k_proj(x).view(B, S, self.kv_heads, D), cos, sin)
        v = self.v_proj(x).view(B, S, self.kv_heads, D)
        o = sink_attention(q, k, v, self.sinks, window=self.settings.window, cu_seqlens=cu_seqlens,
                           backend=self.settings.backend)
        return self._exit(o.reshape(B, S, self.heads * D))


class SwaTpaAttention(_TensorParallelAttention):
    """Sliding-window attention with sinks whose K, V (and Q when ``q_rank`` is set) are tensor products
    (1/R)·Σ_r a_r(x) ⊗ b_r(x), a(x) = A0 + W_A·x; RoPE (or GRAPE-M) rotates the B factors.

    TP: the head factors (A0 [R, H], W_A [R, H, hidden]) are split on the head axis; the token factors
    (W_B [R·D, hidden], b_B) are replicated, so their gradient from this rank's heads is partial and summed over TP;
    GRAPE-M's plane frequencies and basis are replicated the same way."""

    def __init__(self, config, layer_number, pg_collection=None, settings=None, cp_comm_type=None):
        super().__init__(config, layer_number, pg_collection, settings)
        s = settings
        if s.window is None:
            raise ValueError("swa_tpa needs a sliding window (settings.window)")
        self.heads = _local(s.num_heads, self.tp_size, "num_attention_heads")
        D, hidden = s.head_dim, config.hidden_size
        self.ranks = {"q": s.q_rank, "k": s.k_rank, "v": s.v_rank}
        if s.k_rank is None or s.v_rank is None:
            raise ValueError("swa_tpa needs k_rank and v_rank")
        if s.q_rank is None:
            self.q_proj = Projection(config, hidden, (self.heads * D,), bias=s.attention_bias, tp_axis=0)
        for name, rank in self.ranks.items():
            if rank is None:
                continue
            self.register_parameter(f"{name}_a0", new_parameter(config, (rank, self.heads), tp_axis=1))
            a_proj = Projection(config, hidden, (rank, self.heads), bias=False, tp_axis=1) if s.tpa_contextual else None
            self.add_module(f"{name}_a_proj", a_proj)
            self.add_module(f"{name}_b_proj", Projection(config, hidden, (rank * D,), bias=s.attention_bias, tp_axis=None))
        self.sinks = new_parameter(config, (self.heads,), tp_axis=0)
        if s.grape:
            self.rope_freq = new_parameter(config, (D // 2,), tp_axis=None, dtype=torch.float32)
            with torch.no_grad():
                self.rope_freq.copy_(self._inv_freq)
            self.plane_skew = new_parameter(config, (D, D), tp_axis=None, init="zeros") if s.grape_learned_basis else None
        self._build_o_proj(self.heads * D)

    def _rotation(self, ids):
        """This forward's position map (YaRN RoPE or this layer's GRAPE-M), built once for q and the K factors."""
        if not self.settings.grape:
            cos, sin = self._cos_sin(ids)
            return lambda x: apply_rotary(x, cos, sin)
        cos, sin = self._cos_sin(ids, self.rope_freq)
        basis = orthogonal_from_skew(self.plane_skew) if self.plane_skew is not None else None
        return lambda x: apply_grape_m(x, cos, sin, basis)

    def _factors(self, name: str, x):
        B, S, _ = x.shape
        rank = self.ranks[name]
        a = getattr(self, f"{name}_a0").to(x.dtype).expand(B, S, rank, self.heads)
        a_proj = getattr(self, f"{name}_a_proj")
        if a_proj is not None:
            a = a + a_proj(x).view(B, S, rank, self.heads)
        return a, getattr(self, f"{name}_b_proj")(x).view(B, S, rank, self.settings.head_dim)

    def forward(self, hidden_states, attention_mask=None, packed_seq_params=None, **kwargs):
        x = self._enter(hidden_states)
        B, S, _ = x.shape
        D = self.settings.head_dim
        cu_seqlens = self._cu_seqlens(packed_seq_params, B)
        rotate = self._rotation(token_positions(S, x.device, cu_seqlens))
        if self.ranks["q"] is None:
            q = rotate(self.q_proj(x).view(B, S, self.heads, D))
        else:
            q_a, q_b = self._factors("q", x)
            q = tpa_combine(q_a, rotate(q_b))
        k_a, k_b = self._factors("k", x)
        v_a, v_b = self._factors("v", x)
        k = tpa_combine(k_a, rotate(k_b))
        v = tpa_combine(v_a, v_b)
        o = sink_attention(q, k, v, self.sinks, window=self.settings.window, cu_seqlens=cu_seqlens,
                           backend=self.settings.backend)
        return self._exit(o.reshape(B, S, self.heads * D))


class KdaAttention(_TensorParallelAttention):
    """Kimi Delta Attention with the teacher's q/k/v/o biases (layout of the HF student's KdaAttention).

    TP: q/k heads and value heads are split contiguously (value head i of a rank uses its q/k head i // G, as the
    global GVA map); projections, short-conv weights, f_b/g_b, b_proj, A_log and dt_bias are sharded on their
    head axis. The low-rank down-projections f_a, g_a and the per-head norm weight are replicated (partial
    gradients, summed over TP). A_log and dt_bias stay fp32 (``keep_fp32``); the decay is computed in fp32."""

    def __init__(self, config, layer_number, pg_collection=None, settings=None, cp_comm_type=None):
        super().__init__(config, layer_number, pg_collection, settings)
        s = settings
        self.heads = _local(s.kda_num_heads, self.tp_size, "KDA q/k heads")
        self.v_heads = _local(s.kda_num_v_heads, self.tp_size, "KDA value heads")
        if self.v_heads % self.heads:
            raise ValueError(f"KDA value heads {s.kda_num_v_heads} must be a multiple of q/k heads {s.kda_num_heads}")
        H, HV, K, W, hidden = self.heads, self.v_heads, s.head_dim, s.kda_conv_size, config.hidden_size
        bias = s.attention_bias
        self.q_proj = Projection(config, hidden, (H * K,), bias=bias, tp_axis=0)
        self.k_proj = Projection(config, hidden, (H * K,), bias=bias, tp_axis=0)
        self.v_proj = Projection(config, hidden, (HV * K,), bias=bias, tp_axis=0)
        self.q_conv_weight = new_parameter(config, (H * K, W), tp_axis=0)
        self.k_conv_weight = new_parameter(config, (H * K, W), tp_axis=0)
        self.v_conv_weight = new_parameter(config, (HV * K, W), tp_axis=0)
        self.f_a_proj = Projection(config, hidden, (K,), bias=False, tp_axis=None)
        self.f_b_proj = Projection(config, K, (HV * K,), bias=False, tp_axis=0)
        self.b_proj = Projection(config, hidden, (HV,), bias=False, tp_axis=0)
        self.A_log = new_parameter(config, (HV,), tp_axis=0, init="zeros", dtype=torch.float32)
        self.dt_bias = new_parameter(config, (HV * K,), tp_axis=0, init="zeros", dtype=torch.float32)
        for p in (self.A_log, self.dt_bias):
            p.keep_fp32 = True
        self.g_a_proj = Projection(config, hidden, (K,), bias=False, tp_axis=None)
        self.g_b_proj = Projection(config, K, (HV * K,), bias=True, tp_axis=0)
        self.o_norm_weight = new_parameter(config, (K,), tp_axis=None, init="ones")
        self._build_o_proj(HV * K)

    def forward(self, hidden_states, attention_mask=None, packed_seq_params=None, **kwargs):
        x = self._enter(hidden_states)
        B, S, _ = x.shape
        H, HV, K = self.heads, self.v_heads, self.settings.head_dim
        cu_seqlens = self._cu_seqlens(packed_seq_params, B)

        def conv(projected, weight):
            return causal_short_conv(projected, weight, activation="silu", cu_seqlens=cu_seqlens)[0]

        q = conv(self.q_proj(x), self.q_conv_weight)
        k = conv(self.k_proj(x), self.k_conv_weight)
        v = conv(self.v_proj(x), self.v_conv_weight)
        o, _ = kda_from_logits(
            q.view(B, S, H, K), k.view(B, S, H, K), v.view(B, S, HV, K), self.f_b_proj(self.f_a_proj(x)),
            self.b_proj(x), self.A_log, self.dt_bias, lower_bound=self.settings.kda_lower_bound, cu_seqlens=cu_seqlens)
        gate = self.g_b_proj(self.g_a_proj(x)).view(B, S, HV, K)
        o = gated_rms_norm(o, self.o_norm_weight, gate, self.settings.norm_eps)
        return self._exit(o.reshape(B, S, HV * K).to(x.dtype))


ATTENTION_CLASSES = {
    "swa_tpa": SwaTpaAttention,
    "kda": KdaAttention,
    "softmax_sliding": SoftmaxSinkAttention,
    "softmax_full": SoftmaxSinkAttention,
}
