"""Megatron-Core student and teacher: ``GPTModel`` over per-layer ``TransformerLayer`` specs.

Every layer is RMSNorm → attention (``attention.py``, chosen per layer from the plan or gpt-oss ``layer_types``)
→ RMSNorm → Megatron ``MoELayer`` (experts with biases: grouped GEMMs (``experts.GroupedExperts``) or Megatron's
per-expert ``SequentialMLP``, one checkpoint layout; the gpt-oss router, clamped SwiGLU on Megatron's [gate; up]
layout; Megatron's allgather or alltoall dispatcher, or at EP = 1 the sync-free ``dispatch.SortedTokenDispatcher``;
expert parallelism). Embedding and output layer are
Megatron's vocab-parallel ones (untied); position information lives in the attention modules (YaRN / GRAPE-M), so
``position_embedding_type='none'``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from ..ops.moe import grouped_mm_available
from ..student.spec import AttentionSpec, layer_specs
from ..teacher.config import swiglu_limit
from . import compat
from .attention import parallel_attention_class
from .dispatch import install_sorted_dispatch
from .experts import EXPERT_IMPLEMENTATIONS, GroupedExperts
from .layers import ClampedSwiGLU, GptOssRouter, ParallelRMSNorm, padded_vocab_size

DISPATCHERS = ("auto", "sorted", "allgather", "alltoall")


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout and numerics of one model. ``sequence_parallel`` None: on exactly when TP > 1 (Megatron's MoE
    requires it with TP, and the replicated-gradient rules of layers.py rely on it). Expert TP is always 1
    (Megatron-Core 0.16.1 allows biased experts, ``add_bias_linear`` with MoE, only at expert TP 1)."""

    tensor_parallel: int = 1
    expert_parallel: int = 1
    context_parallel: int = 1  # contiguous sequence chunks (ops.context_parallel); batch 1 packed sequences
    sequence_parallel: bool | None = None
    # token dispatch: "sorted" (dispatch.SortedTokenDispatcher: no host sync; EP = 1 only), Megatron's "allgather" or
    # "alltoall", or "auto": sorted at EP = 1, otherwise alltoall on CUDA and allgather without (alltoall needs CUDA)
    dispatcher: str = "auto"
    params_dtype: torch.dtype = torch.float32
    make_vocab_size_divisible_by: int = 128
    attention_backend: str = "auto"  # ops.attention.sink_attention backend
    max_sequence_length: int = 131072
    recompute: str | None = None  # None or "full": Megatron's activation recompute of whole layers
    recompute_method: str = "uniform"  # "uniform" (groups of recompute_num_layers) or "block" (the first N layers)
    recompute_num_layers: int = 1
    # "grouped": experts.GroupedExperts (grouped GEMMs), "sequential": SequentialMLP (a loop over experts), "auto":
    # grouped on CUDA with bf16 parameters (the dtype every torch's CUDA grouped_mm supports), else sequential
    experts: str = "auto"

    @property
    def uses_sequence_parallel(self) -> bool:
        return self.tensor_parallel > 1 if self.sequence_parallel is None else bool(self.sequence_parallel)

    @property
    def token_dispatcher(self) -> str:
        """The dispatcher ``dispatcher`` resolves to: sorted, allgather or alltoall."""
        if self.dispatcher not in DISPATCHERS:
            raise ValueError(f"dispatcher {self.dispatcher!r}: choose one of {', '.join(DISPATCHERS)}")
        if self.dispatcher == "auto":
            if self.expert_parallel == 1:
                return "sorted"
            return "alltoall" if torch.cuda.is_available() else "allgather"
        if self.dispatcher == "sorted" and self.expert_parallel != 1:
            raise ValueError(f"dispatcher 'sorted' needs expert parallelism 1 (got EP {self.expert_parallel}): use "
                             "allgather or alltoall")
        return self.dispatcher

    @property
    def grouped_experts(self) -> bool:
        if self.experts not in EXPERT_IMPLEMENTATIONS:
            raise ValueError(f"experts {self.experts!r}: choose one of {', '.join(EXPERT_IMPLEMENTATIONS)}")
        if self.experts == "auto":
            return torch.cuda.is_available() and self.params_dtype == torch.bfloat16 and grouped_mm_available()
        if self.experts == "grouped" and not grouped_mm_available():
            raise ValueError(f"experts 'grouped': torch {torch.__version__} has no grouped_mm; use 'sequential'")
        return self.experts == "grouped"


def initialize_parallel(parallel: ParallelConfig, seed: int = 0) -> None:
    """Create Megatron's process groups for ``parallel`` (torch.distributed must be initialised; any backend) and,
    with CUDA, seed Megatron's CUDA RNG tracker: building a model on the GPU draws its initial weights inside
    ``get_cuda_rng_tracker().fork()``, which fails for a tracker nobody seeded. Every command that builds a
    Megatron model comes through here, so the converters, the trainer and the benchmarks set it up alike (without
    CUDA the fork is a no-op, see compat.py)."""
    compat.apply()
    if not torch.distributed.is_initialized():
        raise RuntimeError("initialize torch.distributed (e.g. init_process_group('nccl' or 'gloo')) first")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
        expert_tensor_parallel_size=1,
        context_parallel_size=parallel.context_parallel,
    )
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def transformer_config(hf_config, parallel: ParallelConfig) -> TransformerConfig:
    """TransformerConfig for a gpt-oss-shaped HF config (teacher ``GptOssConfig`` or ``StudentConfig``)."""
    if parallel.tensor_parallel > 1 and not parallel.uses_sequence_parallel:
        raise ValueError("TP > 1 needs sequence parallelism (MoE + TP in Megatron, and the TP gradient rules)")
    if parallel.recompute not in (None, "full") or parallel.recompute_method not in ("uniform", "block"):
        raise ValueError(f"recompute {parallel.recompute!r} / {parallel.recompute_method!r}: choose None or 'full', "
                         "and 'uniform' or 'block'")
    dispatcher = parallel.token_dispatcher
    if hf_config.num_local_experts % parallel.expert_parallel:
        raise ValueError(f"num_local_experts={hf_config.num_local_experts} is not divisible by EP={parallel.expert_parallel}")
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=hf_config.head_dim,
        ffn_hidden_size=hf_config.intermediate_size,
        moe_ffn_hidden_size=hf_config.intermediate_size,
        num_moe_experts=hf_config.num_local_experts,
        moe_router_topk=hf_config.num_experts_per_tok,
        moe_router_load_balancing_type="none",
        moe_router_pre_softmax=False,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        # the sorted dispatch replaces Megatron's after the build (install_sorted_dispatch); allgather needs no CUDA
        # stream to build
        moe_token_dispatcher_type="allgather" if dispatcher == "sorted" else dispatcher,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_aux_loss_coeff=0.0,
        add_bias_linear=True,
        gated_linear_unit=True,
        activation_func=F.silu,  # placeholder for validation; the experts use layers.ClampedSwiGLU via the spec
        use_te_activation_func=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        init_method_std=hf_config.initializer_range,
        tensor_model_parallel_size=parallel.tensor_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
        expert_tensor_parallel_size=1,
        context_parallel_size=parallel.context_parallel,
        sequence_parallel=parallel.uses_sequence_parallel,
        params_dtype=parallel.params_dtype,
        bf16=parallel.params_dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        hetereogenous_dist_checkpoint=True,  # per-layer checkpoint keys: layers differ in attention kind
        recompute_granularity=parallel.recompute,
        recompute_method=parallel.recompute_method if parallel.recompute else None,
        recompute_num_layers=parallel.recompute_num_layers if parallel.recompute else None,
    )


def moe_spec(swiglu_limit: float, grouped_experts: bool = False) -> ModuleSpec:
    experts = ModuleSpec(
        module=GroupedExperts if grouped_experts else SequentialMLP,
        submodules=MLPSubmodules(
            linear_fc1=ColumnParallelLinear,
            linear_fc2=RowParallelLinear,
            activation_func=ModuleSpec(module=ClampedSwiGLU, params={"limit": float(swiglu_limit)}),
        ),
    )
    return ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=experts, shared_experts=None, router=GptOssRouter))


def layer_spec(attention: AttentionSpec, swiglu_limit: float, backend: str = "auto",
               grouped_experts: bool = False) -> ModuleSpec:
    """One decoder layer: its attention from the layer's spec (``student.spec``), the gpt-oss MoE."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=ParallelRMSNorm,
            self_attention=ModuleSpec(module=parallel_attention_class(attention),
                                      params={"attention_spec": attention, "backend": backend}),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=ParallelRMSNorm,
            mlp=moe_spec(swiglu_limit, grouped_experts),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _build(hf_config, parallel: ParallelConfig) -> GPTModel:
    compat.apply()
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("call megatron_student.megatron.initialize_parallel(parallel) before building a model")
    if parallel_state.get_tensor_model_parallel_world_size() != parallel.tensor_parallel or \
            parallel_state.get_expert_model_parallel_world_size() != parallel.expert_parallel or \
            parallel_state.get_context_parallel_world_size() != parallel.context_parallel:
        raise ValueError("the initialised process groups do not match `parallel`; call initialize_parallel(parallel)")
    config = transformer_config(hf_config, parallel)
    limit = swiglu_limit(hf_config)
    specs = [layer_spec(attention, limit, parallel.attention_backend, parallel.grouped_experts)
             for attention in layer_specs(hf_config)]
    offset = get_transformer_layer_offset(config)
    local = specs[offset: offset + get_num_layers_to_build(config)]
    block = TransformerBlockSubmodules(layer_specs=local, layer_norm=ParallelRMSNorm)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=padded_vocab_size(hf_config.vocab_size, parallel.tensor_parallel, parallel.make_vocab_size_divisible_by),
        max_sequence_length=parallel.max_sequence_length,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="none",
    )
    model.hf_vocab_size = hf_config.vocab_size
    if parallel.token_dispatcher == "sorted":
        install_sorted_dispatch(model)
    if parallel.recompute:
        model.embedding.register_forward_hook(_grad_requiring_output)
    return model


def _grad_requiring_output(module, args, output):
    """Megatron's recompute is reentrant (``tensor_parallel.checkpoint``, an autograd Function over the layer input
    only): with frozen embeddings that input needs no grad, so the checkpoint output needs none and every layer is
    cut off from backward. Marking the embedding output as requiring grad keeps the layers in the graph."""
    if not output.requires_grad:
        output.requires_grad_()
    return output


def build_student(student_config, parallel: ParallelConfig) -> GPTModel:
    """The student (``StudentConfig``: gpt-oss plus an attention plan) as a Megatron-Core GPTModel for this rank."""
    if getattr(student_config, "plan", None) is None:
        raise TypeError(f"build_student needs a StudentConfig (with an attention plan), got {type(student_config).__name__}")
    return _build(student_config, parallel)


def build_teacher(teacher_config, parallel: ParallelConfig) -> GPTModel:
    """gpt-oss (a transformers ``GptOssConfig``) as a Megatron-Core GPTModel for this rank."""
    return _build(teacher_config, parallel)
