"""Tensor-parallel Megatron-Core ``self_attention`` modules: softmax attention with sinks (teacher and kept
student layers), SWA + TPA with sinks, and Kimi Delta Attention. Each holds this rank's parameters and the TP
entry/exit; the layer itself is composed once in ``ops.layers`` (shared with the HF student).

Module contract (Megatron-Core's ``TransformerLayer`` builds ``submodules.self_attention``): built with
``(config, layer_number, pg_collection, attention_spec=..., backend=...)`` (``student.spec``); forward takes
``hidden_states [s, b, h]`` (``s`` is this rank's shard under sequence parallelism) and returns ``(out, bias)`` for
the layer's bias-dropout-add. Heads are split contiguously over TP. Each module gathers the sequence once on entry
(``gather_from_sequence_parallel_region`` under SP, ``copy_to_tensor_model_parallel_region`` otherwise, whose
backward reduces the input gradient over TP), applies its local projections to the full sequence and leaves
through a ``RowParallelLinear`` ``o_proj`` (reduce-scatter under SP, all-reduce otherwise).

Positions restart in every packed document (``packed_seq_params.cu_seqlens_q``, batch 1), as in the HF student.
Given as :class:`PackedDocuments` (what the trainer's batches carry), the boundaries are also on the host
(``cu_seqlens_cpu``, read once per micro-batch), and no layer reads ``cu_seqlens_q`` back from the GPU; a plain
``PackedSeqParams`` works too, at one host read per use.

Context parallelism (``config.context_parallel_size`` > 1): each CP rank holds one contiguous chunk of a batch-1
packed sequence (``ops.context_parallel``); ``packed_seq_params`` (None: one document) describes the documents of
the whole sequence, so positions and document boundaries are the global ones. Sliding windows (SWA + TPA, softmax
sliding) exchange a halo with the previous CP rank, KDA chains its state over the CP ranks, full causal softmax
attention (the teacher's full_attention layers) all-gathers keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from ..host_syncs import to_device_async
from ..ops.context_parallel import ContextParallel, context_parallel_split
from ..ops.layers import kda_layer, softmax_sink_layer, swa_tpa_layer
from ..ops.rope import rope_cos_sin, token_positions
from ..ops.tpa import named_projection
from ..student.spec import AttentionSpec, KdaSpec, SoftmaxSpec, SwaTpaSpec
from .layers import Projection, new_parameter


@dataclass
class PackedDocuments(PackedSeqParams):
    """Megatron's ``PackedSeqParams`` (THD, batch 1, self-attention: one ``cu_seqlens`` for queries and keys) that
    also keeps the boundaries on the host, ``cu_seqlens_cpu`` (int64): the checks, the attention block mask and
    fla's chunk tables read that copy instead of the device tensor (a host sync per read)."""

    cu_seqlens_cpu: torch.Tensor | None = None

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor, device: torch.device) -> PackedDocuments:
        """From host boundaries [0, …, N]: the device copy is made without waiting for the GPU."""
        if cu_seqlens.device.type != "cpu":
            raise ValueError(f"PackedDocuments.of takes the boundaries on the host, got a tensor on {cu_seqlens.device}")
        host = cu_seqlens.to(torch.int64)
        on_device = to_device_async(cu_seqlens.to(torch.int32), device)
        longest = int((host[1:] - host[:-1]).max()) if host.numel() > 1 else 0
        return cls(qkv_format="thd", cu_seqlens_q=on_device, cu_seqlens_kv=on_device, max_seqlen_q=longest,
                   max_seqlen_kv=longest, cu_seqlens_cpu=host)


def _local(count: int, tp_size: int, what: str) -> int:
    if count % tp_size:
        raise ValueError(f"{what}={count} is not divisible by the tensor-parallel size {tp_size}")
    return count // tp_size


class _TensorParallelAttention(MegatronModule):
    """Shared plumbing: process group, sequence gather on entry, row-parallel o_proj on exit, positions, and a
    ``sharded_state_dict`` that declares the TP axis of every sharded parameter."""

    def __init__(self, config, layer_number: int, pg_collection=None, attention_spec: AttentionSpec | None = None,
                 backend: str = "auto", cp_comm_type=None):
        super().__init__(config=config)
        if attention_spec is None:
            raise ValueError("attention modules need `attention_spec` (student.spec) in their ModuleSpec params")
        self.spec, self.backend = attention_spec, backend
        self.layer_number = layer_number
        self.tp_group = pg_collection.tp if pg_collection is not None else parallel_state.get_tensor_model_parallel_group()
        self.tp_size = self.tp_group.size()
        self.tp_rank = self.tp_group.rank()
        self.cp_group = None
        if config.context_parallel_size > 1:
            self.cp_group = pg_collection.cp if pg_collection is not None else parallel_state.get_context_parallel_group()
        # Plain attribute, not a buffer: a bf16 cast of the module must not round the frequencies.
        self._inv_freq = attention_spec.rope.inv_freq()

    def _build_o_proj(self, local_in: int) -> None:
        self.o_proj = RowParallelLinear(
            local_in * self.tp_size, self.config.hidden_size, config=self.config,
            init_method=self.config.output_layer_init_method, bias=self.spec.bias,
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
        # Row-major [S, b, F], not `.contiguous()`: at b = 1 that keeps the transposed strides (a size-1 dim counts
        # as contiguous), which torch.matmul cannot fold into one mm; with a frozen weight (the teacher's
        # LinearWithFrozenWeight) it ran S batched vector-matrix products, 20 ms per layer at S = 8192 on an H200.
        b, S, features = o.shape
        return self.o_proj(o.transpose(0, 1).reshape(S * b, features).view(S, b, features))

    @staticmethod
    def _cu_seqlens(packed_seq_params, batch: int):
        """(cu_seqlens, its host copy when ``packed_seq_params`` carries one)."""
        if packed_seq_params is None:
            return None, None
        if packed_seq_params.qkv_format != "thd" or batch != 1:
            raise ValueError(f"packed sequences need qkv_format='thd' and batch 1, got "
                             f"{packed_seq_params.qkv_format!r} and batch {batch}")
        cu, cu_kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
        if cu_kv is not None and cu_kv is not cu and not torch.equal(cu, cu_kv):
            raise ValueError("self-attention needs cu_seqlens_q == cu_seqlens_kv")
        return cu, getattr(packed_seq_params, "cu_seqlens_cpu", None)

    def _documents(self, packed_seq_params, x: torch.Tensor):
        """(cu_seqlens of this call, its host copy or None, None) without CP; (None, None, this rank's
        ``ContextParallel`` chunk) with CP."""
        cu_seqlens, cu_seqlens_cpu = self._cu_seqlens(packed_seq_params, x.shape[0])
        if self.cp_group is None:
            return cu_seqlens, cu_seqlens_cpu, None
        if x.shape[0] != 1:
            raise ValueError(f"context parallelism takes one packed sequence (batch 1) per step, got batch {x.shape[0]}")
        bounds = cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu
        return None, None, context_parallel_split(bounds, x.shape[1] * self.cp_group.size(), self.cp_group)

    def _positions(self, x: torch.Tensor, cu_seqlens, cp: ContextParallel | None) -> torch.Tensor:
        return token_positions(x.shape[1], x.device, cu_seqlens) if cp is None else cp.local_positions(x.device)

    def _cos_sin(self, ids: torch.Tensor, inv_freq: torch.Tensor | None = None):
        if inv_freq is None:
            if self._inv_freq.device != ids.device:  # moved once: a copy per call would wait for the GPU each time
                self._inv_freq = self._inv_freq.to(ids.device)
            inv_freq = self._inv_freq
        return rope_cos_sin(ids[None], inv_freq, self.spec.rope.concentration)

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


class ParallelSoftmaxAttention(_TensorParallelAttention):
    """gpt-oss attention (``SoftmaxSpec``): GQA + learned sinks + YaRN RoPE, sliding or full causal. Query and
    key/value heads are split over TP (needs KV heads divisible by TP)."""

    def __init__(self, config, layer_number, pg_collection=None, attention_spec=None, backend="auto", cp_comm_type=None):
        super().__init__(config, layer_number, pg_collection, attention_spec, backend)
        s = attention_spec
        self.heads = _local(s.num_heads, self.tp_size, "num_attention_heads")
        self.kv_heads = _local(s.num_kv_heads, self.tp_size, "num_key_value_heads")
        D, hidden = s.head_dim, config.hidden_size
        self.q_proj = Projection(config, hidden, (self.heads * D,), bias=s.bias, tp_axis=0)
        self.k_proj = Projection(config, hidden, (self.kv_heads * D,), bias=s.bias, tp_axis=0)
        self.v_proj = Projection(config, hidden, (self.kv_heads * D,), bias=s.bias, tp_axis=0)
        self.sinks = new_parameter(config, (self.heads,), tp_axis=0)
        self._build_o_proj(self.heads * D)

    def forward(self, hidden_states, attention_mask=None, packed_seq_params=None, **kwargs):
        x = self._enter(hidden_states)
        cu_seqlens, cu_seqlens_cpu, cp = self._documents(packed_seq_params, x)
        cos, sin = self._cos_sin(self._positions(x, cu_seqlens, cp))
        return softmax_sink_layer(
            x, self.q_proj, self.k_proj, self.v_proj, self._exit, self.sinks, cos, sin, head_dim=self.spec.head_dim,
            window=self.spec.window, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu, backend=self.backend,
            cp=cp)


class ParallelSwaTpaAttention(_TensorParallelAttention):
    """SWA + TPA with sinks (``SwaTpaSpec``).

    TP: the head factors (A0 [R, H], W_A [R, H, hidden]) are split on the head axis; the token factors
    (W_B [R·D, hidden], b_B) are replicated, so their gradient from this rank's heads is partial and summed over TP;
    GRAPE-M's plane frequencies and basis are replicated the same way."""

    def __init__(self, config, layer_number, pg_collection=None, attention_spec=None, backend="auto", cp_comm_type=None):
        super().__init__(config, layer_number, pg_collection, attention_spec, backend)
        s = attention_spec
        self.heads = _local(s.num_heads, self.tp_size, "num_attention_heads")
        D, hidden = s.head_dim, config.hidden_size
        if s.q_rank is None:
            self.q_proj = Projection(config, hidden, (self.heads * D,), bias=s.bias, tp_axis=0)
        for name, rank in s.ranks.items():
            if rank is None:
                continue
            self.register_parameter(f"{name}_a0", new_parameter(config, (rank, self.heads), tp_axis=1))
            a_proj = Projection(config, hidden, (rank, self.heads), bias=False, tp_axis=1) if s.contextual else None
            self.add_module(f"{name}_a_proj", a_proj)
            self.add_module(f"{name}_b_proj", Projection(config, hidden, (rank * D,), bias=s.bias, tp_axis=None))
        self.sinks = new_parameter(config, (self.heads,), tp_axis=0)
        if s.grape:
            self.rope_freq = new_parameter(config, (D // 2,), tp_axis=None, dtype=torch.float32)
            with torch.no_grad():
                self.rope_freq.copy_(self._inv_freq)
            self.plane_skew = new_parameter(config, (D, D), tp_axis=None, init="zeros") if s.grape_learned_basis else None
        self._build_o_proj(self.heads * D)

    def forward(self, hidden_states, attention_mask=None, packed_seq_params=None, **kwargs):
        x = self._enter(hidden_states)
        cu_seqlens, cu_seqlens_cpu, cp = self._documents(packed_seq_params, x)
        ids = self._positions(x, cu_seqlens, cp)
        if self.spec.grape:
            (cos, sin), skew = self._cos_sin(ids, self.rope_freq), self.plane_skew
        else:
            (cos, sin), skew = self._cos_sin(ids), None
        q, k, v = (named_projection(self, name, rank) for name, rank in self.spec.ranks.items())
        return swa_tpa_layer(
            x, q, k, v, self._exit, self.sinks, cos, sin,
            head_dim=self.spec.head_dim, window=self.spec.window, plane_skew=skew, cu_seqlens=cu_seqlens,
            cu_seqlens_cpu=cu_seqlens_cpu, backend=self.backend, cp=cp)


class ParallelKdaAttention(_TensorParallelAttention):
    """Kimi Delta Attention (``KdaSpec``) with the teacher's q/k/v/o biases, in the HF student's parameter layout.

    TP: q/k heads and value heads are split contiguously (value head i of a rank uses its q/k head i // G, as the
    global GVA map); projections, short-conv weights, f_b/g_b, b_proj, A_log and dt_bias are sharded on their
    head axis. The low-rank down-projections f_a, g_a and the per-head norm weight are replicated (partial
    gradients, summed over TP). A_log and dt_bias stay fp32 (``keep_fp32``); the decay is computed in fp32."""

    def __init__(self, config, layer_number, pg_collection=None, attention_spec=None, backend="auto", cp_comm_type=None):
        super().__init__(config, layer_number, pg_collection, attention_spec, backend)
        s = attention_spec
        self.heads = _local(s.qk_heads, self.tp_size, "KDA q/k heads")
        self.v_heads = _local(s.v_heads, self.tp_size, "KDA value heads")
        if self.v_heads % self.heads:
            raise ValueError(f"KDA value heads {s.v_heads} must be a multiple of q/k heads {s.qk_heads}")
        H, HV, K, W, hidden = self.heads, self.v_heads, s.head_dim, s.conv_size, config.hidden_size
        bias = s.bias
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
        cu_seqlens, cu_seqlens_cpu, cp = self._documents(packed_seq_params, x)
        out, _ = kda_layer(
            x, self.q_proj, self.k_proj, self.v_proj, (self.q_conv_weight, self.k_conv_weight, self.v_conv_weight),
            lambda h: self.f_b_proj(self.f_a_proj(h)), self.b_proj, self.A_log, self.dt_bias,
            lambda h: self.g_b_proj(self.g_a_proj(h)), self.o_norm_weight, self._exit, head_dim=self.spec.head_dim,
            lower_bound=self.spec.lower_bound, eps=self.spec.norm_eps, cu_seqlens=cu_seqlens,
            cu_seqlens_cpu=cu_seqlens_cpu, cp=cp)
        return out


def parallel_attention_class(spec: AttentionSpec) -> type[_TensorParallelAttention]:
    match spec:
        case SoftmaxSpec():
            return ParallelSoftmaxAttention
        case SwaTpaSpec():
            return ParallelSwaTpaAttention
        case KdaSpec():
            return ParallelKdaAttention
    raise TypeError(f"no Megatron attention module for {type(spec).__name__}")
