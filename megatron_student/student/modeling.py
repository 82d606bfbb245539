"""The HF-format student: gpt-oss with SWA+TPA and KDA attention (single device: export, generation, eval).

All math comes from ``megatron_student.ops``; these modules only hold parameters and caches. Parameter
names follow gpt-oss (``model.layers.N.self_attn.*``, ``mlp.router``, ``mlp.experts``) so surgery and the
converters map tensors by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..harmony_vocab import HARMONY_STOP_TOKEN_IDS
from ..ops.layers import kda_layer, softmax_sink_layer, swa_tpa_layer
from ..ops.moe import experts_forward_auto, router_topk_softmax
from ..ops.norm import rms_norm
from ..ops.rope import YarnRope, rope_cos_sin, token_positions
from ..ops.tpa import named_projection
from .config import StudentConfig
from .spec import AttentionSpec, KdaSpec, SoftmaxSpec, SwaTpaSpec, layer_specs


class StudentCache:
    """Per-layer decoding state, bounded per layer: SWA keeps the last window−1 positions (what the next query
    can still see) with their padding flags, KDA its recurrent state and the short-conv tails; kept softmax-full
    layers grow. ``next_position`` [B] is each row's next token position (rows of a left-padded batch differ)."""

    def __init__(self, num_layers: int):
        self.layers: list[dict | None] = [None] * num_layers
        self.seen_tokens = 0
        self.next_position: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens


def _append(state: dict | None, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-position tensors [B, T, ...] appended along T to the cached ones."""
    return {name: new[name] if state is None else torch.cat([state[name], new[name]], dim=1) for name in new}


def _trim(full: dict[str, torch.Tensor], keep: int | None) -> dict[str, torch.Tensor]:
    """The last ``keep`` positions (all when None): what later queries can still attend to."""
    if keep is None:
        return full
    return {name: t[:, -keep:] if keep > 0 else t[:, :0] for name, t in full.items()}


@dataclass
class Positions:
    """Token positions [B, T], the shared YaRN cos/sin for them, and which tokens are real ([B, T] bool; None
    when none is padding)."""

    ids: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    scaling: float
    valid: torch.Tensor | None = None


def make_positions(yarn: YarnRope, batch: int, length: int, device, cu_seqlens=None, start: int = 0,
                   ids: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> Positions:
    """Positions (restarting in every packed document when cu_seqlens is given; or per-row ``ids``) and their
    YaRN cos/sin."""
    if ids is None:
        ids = token_positions(length, device, cu_seqlens, start).unsqueeze(0).expand(batch, length)
    # Recomputed per call (D/2 values): a buffer would be left uninitialised by meta-device loading.
    cos, sin = rope_cos_sin(ids, yarn.inv_freq().to(device), yarn.concentration)
    return Positions(ids, cos, sin, yarn.concentration, valid)


def padded_positions(valid: torch.Tensor, cache: StudentCache | None) -> torch.Tensor:
    """Per-row positions [B, T] of a left-padded chunk: real tokens count on from the row's cached position,
    padding shares the next real token's position (it is masked everywhere). Real tokens must be contiguous
    per row: padding after a row's first real token would shift the sliding windows, so it is refused."""
    base = cache.next_position if cache is not None and cache.next_position is not None else \
        torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
    counted = valid.long().cumsum(1)
    started = (counted > 0) | (base[:, None] > 0)
    hole = ~valid & started
    if bool((valid & (hole.long().cumsum(1) > 0)).any()):
        raise ValueError("attention_mask has padding between real tokens; only left padding is supported "
                         "(pack documents with cu_seqlens instead)")
    return base[:, None] + (counted - valid.long()).clamp(min=0)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def _cache_extend(cache: StudentCache | None, layer_idx: int, keep: int | None):
    """The ``ops.layers`` cache hook of one layer: append this call's positions (and their padding flags) to the
    cached ones, keep the last ``keep`` (all when None), and return the keys with their attention mask (None
    when no key is padding: the unmasked fast path); None without a cache."""
    if cache is None:
        return None

    def extend(new: dict[str, torch.Tensor], valid: torch.Tensor | None):
        first = next(iter(new.values()))
        flags = valid if valid is not None else torch.ones(first.shape[:2], dtype=torch.bool, device=first.device)
        full = _append(cache.layers[layer_idx], {**new, "valid": flags})
        cache.layers[layer_idx] = _trim(full, keep)
        keys_valid = full["valid"]
        return {name: full[name] for name in new}, None if bool(keys_valid.all()) else keys_valid

    return extend


class SoftmaxAttention(nn.Module):
    """The teacher's attention, kept: GQA + sinks + YaRN RoPE, sliding (window) or full causal
    (``ops.layers.softmax_sink_layer``)."""

    def __init__(self, spec: SoftmaxSpec, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        H, G, D, hidden, bias = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size, spec.bias
        self.q_proj = nn.Linear(hidden, H * D, bias=bias)
        self.k_proj = nn.Linear(hidden, G * D, bias=bias)
        self.v_proj = nn.Linear(hidden, G * D, bias=bias)
        self.o_proj = nn.Linear(H * D, hidden, bias=bias)
        self.sinks = nn.Parameter(torch.empty(H))

    def forward(self, x, positions: Positions, cu_seqlens=None, cache: StudentCache | None = None):
        window = self.spec.window
        return softmax_sink_layer(
            x, self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.sinks, positions.cos, positions.sin,
            head_dim=self.spec.head_dim, window=window, cu_seqlens=cu_seqlens, valid=positions.valid,
            extend=_cache_extend(cache, self.layer_idx, None if window is None else window - 1))


class SwaTpaAttention(nn.Module):
    """Parameters and cache of SWA + TPA (``ops.layers.swa_tpa_layer``): for each factored projection A0 [R, H],
    W_A (``{q,k,v}_a_proj``, when contextual) and W_B (``{q,k,v}_b_proj``); with q_rank None, Q is a plain
    projection (TPA-KVonly). GRAPE-M adds the learnable plane frequencies and optionally a plane basis."""

    def __init__(self, spec: SwaTpaSpec, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        hidden, H, D = spec.hidden_size, spec.num_heads, spec.head_dim
        if spec.q_rank is None:
            self.q_proj = nn.Linear(hidden, H * D, bias=spec.bias)
        for name, rank in spec.ranks.items():
            if rank is None:
                continue
            self.register_parameter(f"{name}_a0", nn.Parameter(torch.empty(rank, H)))
            self.add_module(f"{name}_a_proj", nn.Linear(hidden, rank * H, bias=False) if spec.contextual else None)
            self.add_module(f"{name}_b_proj", nn.Linear(hidden, rank * D, bias=spec.bias))
        self.o_proj = nn.Linear(H * D, hidden, bias=spec.bias)
        self.sinks = nn.Parameter(torch.empty(H))
        if spec.grape:
            # Plane frequencies learned directly (not as logs) so step 0 equals the teacher's YaRN bit for bit.
            self.rope_freq = nn.Parameter(spec.rope.inv_freq())
            self.plane_skew = nn.Parameter(torch.zeros(D, D)) if spec.grape_learned_basis else None

    def forward(self, x, positions: Positions, cu_seqlens=None, cache: StudentCache | None = None):
        cos, sin, skew = positions.cos, positions.sin, None
        if self.spec.grape:
            cos, sin = rope_cos_sin(positions.ids, self.rope_freq, positions.scaling)
            skew = self.plane_skew
        q, k, v = (named_projection(self, name, rank) for name, rank in self.spec.ranks.items())
        return swa_tpa_layer(
            x, q, k, v, self.o_proj, self.sinks, cos, sin,
            head_dim=self.spec.head_dim, window=self.spec.window, plane_skew=skew, cu_seqlens=cu_seqlens,
            valid=positions.valid, extend=_cache_extend(cache, self.layer_idx, self.spec.window - 1))


class KdaAttention(nn.Module):
    """Parameters and cache of Kimi Delta Attention (Kimi Linear / fla 0.6.0 layout, ``ops.layers.kda_layer``)
    with the teacher's q/k/v/o biases kept: short convs on q, k, v; low-rank forget gate f_b·f_a with A_log and
    dt_bias (fp32); β projection; low-rank output gate g_b·g_a and the per-head output norm."""

    def __init__(self, spec: KdaSpec, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        hidden, bias = spec.hidden_size, spec.bias
        H, HV, K = spec.qk_heads, spec.v_heads, spec.head_dim
        self.q_proj = nn.Linear(hidden, H * K, bias=bias)
        self.k_proj = nn.Linear(hidden, H * K, bias=bias)
        self.v_proj = nn.Linear(hidden, HV * K, bias=bias)
        self.q_conv_weight = nn.Parameter(torch.empty(H * K, spec.conv_size))
        self.k_conv_weight = nn.Parameter(torch.empty(H * K, spec.conv_size))
        self.v_conv_weight = nn.Parameter(torch.empty(HV * K, spec.conv_size))
        self.f_a_proj = nn.Linear(hidden, K, bias=False)
        self.f_b_proj = nn.Linear(K, HV * K, bias=False)
        self.b_proj = nn.Linear(hidden, HV, bias=False)
        self.A_log = nn.Parameter(torch.empty(HV, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(HV * K, dtype=torch.float32))
        self.g_a_proj = nn.Linear(hidden, K, bias=False)
        self.g_b_proj = nn.Linear(K, HV * K, bias=True)
        self.o_norm_weight = nn.Parameter(torch.ones(K))
        self.o_proj = nn.Linear(HV * K, hidden, bias=bias)

    def forward(self, x, positions: Positions, cu_seqlens=None, cache: StudentCache | None = None):
        out, state = kda_layer(
            x, self.q_proj, self.k_proj, self.v_proj, (self.q_conv_weight, self.k_conv_weight, self.v_conv_weight),
            lambda h: self.f_b_proj(self.f_a_proj(h)), self.b_proj, self.A_log, self.dt_bias,
            lambda h: self.g_b_proj(self.g_a_proj(h)), self.o_norm_weight, self.o_proj, head_dim=self.spec.head_dim,
            lower_bound=self.spec.lower_bound, eps=self.spec.norm_eps, cu_seqlens=cu_seqlens, valid=positions.valid,
            state=None if cache is None else cache.layers[self.layer_idx], output_final_state=cache is not None)
        if cache is not None:
            cache.layers[self.layer_idx] = state
        return out


def attention_module(spec: AttentionSpec, layer_idx: int) -> nn.Module:
    match spec:
        case SoftmaxSpec():
            return SoftmaxAttention(spec, layer_idx)
        case SwaTpaSpec():
            return SwaTpaAttention(spec, layer_idx)
        case KdaSpec():
            return KdaAttention(spec, layer_idx)
    raise TypeError(f"layer {layer_idx}: no HF attention module for {type(spec).__name__}")


class Router(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.empty(config.num_local_experts))


class Experts(nn.Module):
    """HF gpt-oss layout: gate_up_proj [E, H, 2I] (gate/up interleaved), down_proj [E, I, H]."""

    def __init__(self, config):
        super().__init__()
        E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj_bias = nn.Parameter(torch.empty(E, H))
        self.limit = config.swiglu_limit


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        logits = F.linear(flat, self.router.weight, self.router.bias)
        weights, indices = router_topk_softmax(logits, self.router.top_k)
        e = self.experts
        out = experts_forward_auto(flat, indices, weights, e.gate_up_proj, e.gate_up_proj_bias, e.down_proj,
                                   e.down_proj_bias, limit=e.limit)
        return out.view_as(x), logits


class DecoderLayer(nn.Module):
    def __init__(self, config: StudentConfig, spec: AttentionSpec, layer_idx: int):
        super().__init__()
        self.kind = spec.kind
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention_module(spec, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config)

    def forward(self, x, positions, cu_seqlens=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), positions, cu_seqlens, cache)
        out, router_logits = self.mlp(self.post_attention_layernorm(x))
        return x + out, router_logits


# transformers 5.24 renamed the cache of model inputs and outputs from ``past_key_values`` to ``cache``; generate
# reads it back under the installed version's name, so the output declares that one (inputs accept both).
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class StudentOutput(CausalLMOutputWithPast):
    router_logits: tuple[torch.Tensor, ...] | None = None


class StudentPreTrainedModel(PreTrainedModel):
    config_class = StudentConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _keep_in_fp32_modules_strict = ["A_log", "dt_bias"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        """Random initialisation for a student built from config alone (tests, ablations). A student made
        from a teacher is fully overwritten by weight surgery (student/surgery.py), which documents its own
        choices for the KDA-only parameters. Through ``transformers.initialization``, which leaves tensors that
        ``from_pretrained`` already loaded alone: some transformers releases (5.6) initialise after loading."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, 0.0, std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, (SoftmaxAttention, SwaTpaAttention)):
            init.normal_(module.sinks, 0.0, std)
            for name in ("q_a0", "k_a0", "v_a0"):
                if hasattr(module, name):
                    init.normal_(getattr(module, name), 0.0, 1.0)
            if isinstance(module, SwaTpaAttention) and module.spec.grape:
                init.copy_(module.rope_freq, module.spec.rope.inv_freq())
                if module.plane_skew is not None:
                    init.zeros_(module.plane_skew)
        elif isinstance(module, KdaAttention):
            if not getattr(module.A_log, "_is_hf_initialized", False):  # loaded: the checkpoint's values stay
                init_kda_extras(module, torch.Generator().manual_seed(0))
        elif isinstance(module, Router):
            init.normal_(module.weight, 0.0, std)
            init.normal_(module.bias, 0.0, std)
        elif isinstance(module, Experts):
            init.normal_(module.gate_up_proj, 0.0, std)
            init.zeros_(module.gate_up_proj_bias)
            init.normal_(module.down_proj, 0.0, std)
            init.zeros_(module.down_proj_bias)


def conv_identity_(weight: torch.Tensor) -> None:
    """A causal short conv that passes the current token through: a delta on the last tap."""
    weight.zero_()
    weight[:, -1] = 1.0


def init_kda_extras(module: KdaAttention, generator: torch.Generator, dt_min=1e-4, dt_max=1e-2) -> None:
    """KDA parameters that have no teacher counterpart, chosen for long memory at the start:
    - short convs are identities on the current token;
    - A_log = 0 and dt = softplus(dt_bias) log-uniform in [dt_min, dt_max], f_b = 0, so the per-channel
      decay exp(−dt) keeps between 0.99 and 0.9999 of the state per token (memory of ~100 to ~10k tokens);
      f_a is small random so f_b still receives gradients;
    - β logits 0 (β = ½, fla's default); the output gate's up-projection is zero with a +4 bias
      (σ ≈ 0.98, close to pass-through); the head norm weight is 1."""
    with torch.no_grad():
        for name in ("q", "k", "v"):
            conv_identity_(getattr(module, f"{name}_conv_weight"))
        module.A_log.zero_()
        # Draws on the generator's device (CPU), whatever the default device, then copied into place.
        u = torch.rand(module.dt_bias.shape, generator=generator, dtype=torch.float64, device=generator.device)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        module.f_a_proj.weight.copy_(torch.randn(module.f_a_proj.weight.shape, generator=generator, device=generator.device) / math.sqrt(module.f_a_proj.in_features))
        module.f_b_proj.weight.zero_()
        module.b_proj.weight.zero_()
        module.g_a_proj.weight.copy_(torch.randn(module.g_a_proj.weight.shape, generator=generator, device=generator.device) / math.sqrt(module.g_a_proj.in_features))
        module.g_b_proj.weight.zero_()
        module.g_b_proj.bias.fill_(4.0)
        module.o_norm_weight.fill_(1.0)


class StudentModel(StudentPreTrainedModel):
    def __init__(self, config: StudentConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, spec, i) for i, spec in enumerate(layer_specs(config)))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.yarn = YarnRope.from_hf_config(config)
        self.post_init()

    def forward(self, input_ids=None, inputs_embeds=None, cu_seqlens=None, cache=None, use_cache=False,
                output_hidden_states=False, valid=None):
        """``valid`` [B, T] bool marks the real tokens of a left-padded batch (None: all real)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if use_cache and cache is None:
            cache = StudentCache(len(self.layers))
        if cache is not None and cu_seqlens is not None:
            raise ValueError("cu_seqlens (packed training) cannot be combined with a decoding cache")
        if valid is not None and cu_seqlens is not None:
            raise ValueError("padding (attention_mask with zeros) cannot be combined with packed cu_seqlens")
        padded = valid is not None or (cache is not None and cache.next_position is not None)
        if padded:
            valid = torch.ones(B, T, dtype=torch.bool, device=x.device) if valid is None else valid
            positions = make_positions(self.yarn, B, T, x.device, ids=padded_positions(valid, cache), valid=valid)
        else:
            positions = make_positions(self.yarn, B, T, x.device, cu_seqlens, cache.seen_tokens if cache is not None else 0)
        hidden, routers = [], []
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(x)
            x, router_logits = layer(x, positions, cu_seqlens, cache)
            routers.append(router_logits)
        if cache is not None:
            cache.seen_tokens += T
            if padded:
                cache.next_position = positions.ids[:, -1] + valid[:, -1].long()
        x = self.norm(x)
        if output_hidden_states:
            hidden.append(x)
        return x, cache, tuple(hidden) if output_hidden_states else None, tuple(routers), positions.ids


SHIM_FILES = {
    "configuration_gpt_oss_student.py": "from megatron_student.student.config import StudentConfig  # noqa: F401\n",
    "modeling_gpt_oss_student.py": "from megatron_student.student.modeling import StudentForCausalLM  # noqa: F401\n",
}
AUTO_MAP = {
    "AutoConfig": "configuration_gpt_oss_student.StudentConfig",
    "AutoModelForCausalLM": "modeling_gpt_oss_student.StudentForCausalLM",
}


class StudentForCausalLM(StudentPreTrainedModel, GenerationMixin):
    def __init__(self, config: StudentConfig):
        super().__init__(config)
        self.model = StudentModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own bounded cache (StudentCache), returned in outputs["cache"]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, cu_seqlens=None, output_hidden_states=False,
                logits_to_keep=0, **kwargs):
        """``cache`` (or its pre-5.24 transformers name ``past_key_values``) is a ``StudentCache``; the output
        holds it under ``CACHE_FIELD``. ``attention_mask`` [B, T] or [B, cached + T] may hold zeros for left
        padding; ``position_ids``, if given, must equal the positions the mask and cache imply."""
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the StudentCache as `cache` or as `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        valid = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] < length:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must be [B, T] or [B, cached + T] "
                                 f"for {length} new tokens")
            chunk = attention_mask[:, -length:].bool()
            if not bool(chunk.all()) or (cache is not None and cache.next_position is not None):
                valid = chunk
        hidden, cache, all_hidden, routers, positions = self.model(
            input_ids, inputs_embeds, cu_seqlens, cache, bool(use_cache), output_hidden_states, valid)
        if position_ids is not None:
            given = position_ids.to(positions.device).expand_as(positions)
            real = valid.to(positions.device) if valid is not None else torch.ones_like(given, dtype=torch.bool)
            if cu_seqlens is not None or not bool((given == positions)[real].all()):
                raise ValueError("position_ids must be the consecutive positions after the cache (per row, after "
                                 "left padding); packed documents restart their positions through cu_seqlens instead")
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return StudentOutput(loss=loss, logits=logits, hidden_states=all_hidden, router_logits=routers,
                             **{CACHE_FIELD: cache})

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also writes the code shims (see ``write_code_shims``)."""
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        write_code_shims(save_directory)


def write_code_shims(directory) -> None:
    """The two-line code files that let `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` find
    our classes (the package must be installed where it loads)."""
    for name, text in SHIM_FILES.items():
        Path(directory, name).write_text(text)


def write_bundle_files(directory, config: StudentConfig) -> None:
    """Everything beside the safetensors that makes a student directory loadable and generate-ready:
    config.json (with auto_map), generation_config.json with the Harmony stop tokens, the code shims."""
    config.auto_map = dict(AUTO_MAP)
    config.save_pretrained(directory)
    generation = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
                  "eos_token_id": HARMONY_STOP_TOKEN_IDS, "do_sample": False}
    Path(directory, "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    write_code_shims(directory)


def register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(StudentConfig.model_type, StudentConfig, exist_ok=True)
    AutoModelForCausalLM.register(StudentConfig, StudentForCausalLM, exist_ok=True)


register_auto_classes()
