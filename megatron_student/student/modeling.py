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
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..ops.attention import sink_attention
from ..ops.kda import causal_short_conv, gated_rms_norm, kda_from_logits
from ..ops.moe import experts_forward, router_topk_softmax
from ..ops.norm import rms_norm
from ..ops.rope import YarnRope, apply_grape_m, apply_rotary, orthogonal_from_skew, rope_cos_sin, token_positions
from ..ops.tpa import tpa_combine
from .config import StudentConfig

# Harmony ids that end an assistant turn: <|return|>, <|call|>, and <|endoftext|> (gpt-oss generation_config).
HARMONY_STOP_TOKEN_IDS = [200002, 200012, 199999]


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


def _cached_keys(cache: StudentCache | None, layer_idx: int, keys: dict[str, torch.Tensor], positions: Positions,
                 keep: int | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """This chunk's per-position key tensors [B, T, ...] appended to the layer's cache (which keeps the last
    ``keep``), and the attention key mask over them (None when no key is padding: the unmasked fast path)."""
    if cache is None:
        return keys, positions.valid
    B, T = positions.ids.shape
    valid = positions.valid if positions.valid is not None else torch.ones(B, T, dtype=torch.bool, device=positions.ids.device)
    full = _append(cache.layers[layer_idx], {**keys, "valid": valid})
    cache.layers[layer_idx] = _trim(full, keep)
    keys_valid = full["valid"]
    return {name: full[name] for name in keys}, None if bool(keys_valid.all()) else keys_valid


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class SoftmaxAttention(nn.Module):
    """The teacher's attention, kept: GQA + sinks + YaRN RoPE, sliding (window) or full causal."""

    def __init__(self, config: StudentConfig, layer_idx: int, window: int | None):
        super().__init__()
        self.layer_idx, self.window = layer_idx, window
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.sinks = nn.Parameter(torch.empty(self.num_heads))

    def forward(self, x, positions: Positions, cu_seqlens=None, cache: StudentCache | None = None):
        B, T, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(B, T, self.num_heads, self.head_dim), positions.cos, positions.sin)
        k = apply_rotary(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim), positions.cos, positions.sin)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        keys, key_mask = _cached_keys(cache, self.layer_idx, {"k": k, "v": v}, positions,
                                      None if self.window is None else self.window - 1)
        o = sink_attention(q, keys["k"], keys["v"], self.sinks, window=self.window, cu_seqlens=cu_seqlens,
                           key_mask=key_mask)
        return self.o_proj(o.reshape(B, T, -1))


class SwaTpaAttention(nn.Module):
    """Sliding-window attention with sinks whose K and V (and optionally Q) are tensor products
    (1/R)·Σ_r a_r(x) ⊗ b_r(x), a(x) = A0 + W_A·x; RoPE/GRAPE-M rotates the B factors. With q_rank None,
    Q is a plain projection (TPA-KVonly). The cache holds the factors, not the per-head K/V."""

    def __init__(self, config: StudentConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.window = layer_idx, config.window
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        hidden, H, D = config.hidden_size, self.num_heads, self.head_dim
        self.q_rank, self.k_rank, self.v_rank = config.tpa_ranks
        self.contextual = config.tpa_contextual
        if self.q_rank is None:
            self.q_proj = nn.Linear(hidden, H * D, bias=config.attention_bias)
        for name, rank in (("q", self.q_rank), ("k", self.k_rank), ("v", self.v_rank)):
            if rank is None:
                continue
            self.register_parameter(f"{name}_a0", nn.Parameter(torch.empty(rank, H)))
            self.add_module(f"{name}_a_proj", nn.Linear(hidden, rank * H, bias=False) if self.contextual else None)
            self.add_module(f"{name}_b_proj", nn.Linear(hidden, rank * D, bias=config.attention_bias))
        self.o_proj = nn.Linear(H * D, hidden, bias=config.attention_bias)
        self.sinks = nn.Parameter(torch.empty(H))
        self.grape = config.position_encoding == "grape_m"
        if self.grape:
            # Plane frequencies learned directly (not as logs) so step 0 equals the teacher's YaRN bit for bit.
            self.rope_freq = nn.Parameter(YarnRope.from_hf_config(config).inv_freq())
            self.plane_skew = nn.Parameter(torch.zeros(D, D)) if config.grape_learned_basis else None

    def _rotation(self, positions: Positions):
        """This forward's position map (shared YaRN RoPE or this layer's GRAPE-M), built once for q and K."""
        if not self.grape:
            return lambda x: apply_rotary(x, positions.cos, positions.sin)
        cos, sin = rope_cos_sin(positions.ids, self.rope_freq, positions.scaling)
        basis = orthogonal_from_skew(self.plane_skew) if self.plane_skew is not None else None
        return lambda x: apply_grape_m(x, cos, sin, basis)

    def _factors(self, name: str, x):
        B, T, _ = x.shape
        rank = getattr(self, f"{name}_rank")
        a = getattr(self, f"{name}_a0").to(x.dtype).expand(B, T, rank, self.num_heads)
        a_proj = getattr(self, f"{name}_a_proj")
        if a_proj is not None:
            a = a + a_proj(x).view(B, T, rank, self.num_heads)
        return a, getattr(self, f"{name}_b_proj")(x).view(B, T, rank, self.head_dim)

    def forward(self, x, positions: Positions, cu_seqlens=None, cache: StudentCache | None = None):
        B, T, _ = x.shape
        rotate = self._rotation(positions)
        if self.q_rank is None:
            q = rotate(self.q_proj(x).view(B, T, self.num_heads, self.head_dim))
        else:
            q_a, q_b = self._factors("q", x)
            q = tpa_combine(q_a, rotate(q_b))
        k_a, k_b = self._factors("k", x)
        v_a, v_b = self._factors("v", x)
        factors, key_mask = _cached_keys(cache, self.layer_idx, {"k_a": k_a, "k_b": rotate(k_b), "v_a": v_a, "v_b": v_b},
                                         positions, self.window - 1)
        k = tpa_combine(factors["k_a"], factors["k_b"])
        v = tpa_combine(factors["v_a"], factors["v_b"])
        o = sink_attention(q, k, v, self.sinks, window=self.window, cu_seqlens=cu_seqlens, key_mask=key_mask)
        return self.o_proj(o.reshape(B, T, -1))


class KdaAttention(nn.Module):
    """Kimi Delta Attention (Kimi Linear / fla 0.6.0 layout) with the teacher's q/k/v/o biases kept:
    q, k, v = SiLU(ShortConv(W x + b)); q, k L2-normalised in the op; decay g = −exp(A_log)·softplus(f + dt_bias)
    from a low-rank f; β = σ(W_β x); o = W_o(RMSNorm_head(KDA(q, k, v)) ⊙ σ(g_up(g_down x)) ) + b_o."""

    def __init__(self, config: StudentConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        hidden, bias = config.hidden_size, config.attention_bias
        self.num_heads, self.num_v_heads, self.head_dim = config.kda_num_heads, config.kda_num_v_heads, config.kda_head_dim
        H, HV, K = self.num_heads, self.num_v_heads, self.head_dim
        self.lower_bound, self.eps = config.kda_lower_bound, config.rms_norm_eps
        self.q_proj = nn.Linear(hidden, H * K, bias=bias)
        self.k_proj = nn.Linear(hidden, H * K, bias=bias)
        self.v_proj = nn.Linear(hidden, HV * K, bias=bias)
        self.q_conv_weight = nn.Parameter(torch.empty(H * K, config.kda_conv_size))
        self.k_conv_weight = nn.Parameter(torch.empty(H * K, config.kda_conv_size))
        self.v_conv_weight = nn.Parameter(torch.empty(HV * K, config.kda_conv_size))
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
        B, T, _ = x.shape
        H, HV, K = self.num_heads, self.num_v_heads, self.head_dim
        state = cache.layers[self.layer_idx] if cache is not None else None
        keep_state = cache is not None

        def conv(name, projected):
            if positions.valid is not None:  # padding enters neither the conv windows nor the state (k = 0)
                projected = projected * positions.valid[..., None].to(projected.dtype)
            return causal_short_conv(
                projected, getattr(self, f"{name}_conv_weight"), activation="silu", cu_seqlens=cu_seqlens,
                initial_state=None if state is None else state[f"{name}_conv"], output_final_state=keep_state)

        q, q_conv = conv("q", self.q_proj(x))
        k, k_conv = conv("k", self.k_proj(x))
        v, v_conv = conv("v", self.v_proj(x))
        o, recurrent = kda_from_logits(
            q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, HV, K), self.f_b_proj(self.f_a_proj(x)),
            self.b_proj(x), self.A_log, self.dt_bias, lower_bound=self.lower_bound,
            initial_state=None if state is None else state["recurrent"], output_final_state=keep_state,
            cu_seqlens=cu_seqlens)
        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, HV, K)
        o = gated_rms_norm(o, self.o_norm_weight, gate, self.eps)
        if keep_state:
            cache.layers[self.layer_idx] = {"q_conv": q_conv, "k_conv": k_conv, "v_conv": v_conv, "recurrent": recurrent}
        return self.o_proj(o.reshape(B, T, HV * K).to(x.dtype))


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
        out = experts_forward(flat, indices, weights, e.gate_up_proj, e.gate_up_proj_bias, e.down_proj,
                              e.down_proj_bias, limit=e.limit)
        return out.view_as(x), logits


ATTENTION_MODULES = {
    "swa_tpa": lambda config, i: SwaTpaAttention(config, i),
    "kda": lambda config, i: KdaAttention(config, i),
    "softmax_sliding": lambda config, i: SoftmaxAttention(config, i, config.window),
    "softmax_full": lambda config, i: SoftmaxAttention(config, i, None),
}


class DecoderLayer(nn.Module):
    def __init__(self, config: StudentConfig, layer_idx: int):
        super().__init__()
        self.kind = config.attention_kinds[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = ATTENTION_MODULES[self.kind](config, layer_idx)
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
        choices for the KDA-only parameters."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, (SoftmaxAttention, SwaTpaAttention)):
            module.sinks.normal_(0.0, std)
            for name in ("q_a0", "k_a0", "v_a0"):
                if hasattr(module, name):
                    getattr(module, name).normal_(0.0, 1.0)
            if isinstance(module, SwaTpaAttention) and module.grape:
                module.rope_freq.copy_(YarnRope.from_hf_config(self.config).inv_freq())
                if module.plane_skew is not None:
                    module.plane_skew.zero_()
        elif isinstance(module, KdaAttention):
            init_kda_extras(module, torch.Generator().manual_seed(0))
        elif isinstance(module, Router):
            module.weight.normal_(0.0, std)
            module.bias.normal_(0.0, std)
        elif isinstance(module, Experts):
            module.gate_up_proj.normal_(0.0, std)
            module.gate_up_proj_bias.zero_()
            module.down_proj.normal_(0.0, std)
            module.down_proj_bias.zero_()


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
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
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
