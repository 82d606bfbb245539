"""StudentConfig: a teacher gpt-oss config plus an attention plan.

Layer kinds:
  swa_tpa          sliding window (``window`` keys incl. the current one) + TPA + sinks, RoPE (YaRN) or GRAPE-M
  kda              Kimi Delta Attention, no position encoding
  softmax_sliding  the teacher's own sliding attention (GQA + sinks + YaRN), kept as is
  softmax_full     the teacher's own full attention, kept as is (a fallback for long-range recall)

A plan (YAML or JSON) maps teacher layer types to kinds and may override single layers:

    layers: {sliding_attention: swa_tpa, full_attention: kda}
    overrides: {11: softmax_full}
    window: 128
    tpa: {q_rank: null, k_rank: 8, v_rank: 8, contextual: true}
    position_encoding: yarn          # or grape_m
    grape: {learned_basis: false}
    kda: {head_mapping: A, conv_size: 4, lower_bound: null}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from ..teacher.config import swiglu_limit

LAYER_KINDS = ("swa_tpa", "kda", "softmax_sliding", "softmax_full")
TEACHER_LAYER_TYPES = ("sliding_attention", "full_attention")
KDA_HEAD_MAPPINGS = ("A", "B", "C")
POSITION_ENCODINGS = ("yarn", "grape_m")
DEFAULT_PLAN: dict[str, Any] = {
    "layers": {"sliding_attention": "swa_tpa", "full_attention": "kda"},
    "overrides": {},
    "window": None,  # None: the teacher's sliding_window
    "tpa": {"q_rank": None, "k_rank": None, "v_rank": None, "contextual": True},  # None ranks: KV heads (exact)
    "position_encoding": "yarn",
    "grape": {"learned_basis": False},
    "kda": {"head_mapping": "A", "conv_size": 4, "lower_bound": None},
}
TEACHER_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "sliding_window",
    "layer_types", "rope_parameters", "rms_norm_eps", "swiglu_limit", "attention_bias", "max_position_embeddings",
    "initializer_range", "router_aux_loss_coef", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id",
)


class PlanError(ValueError):
    """An attention plan that cannot be built; the message says what to change."""


def _check_keys(section: dict, allowed: dict, where: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def resolve_plan(plan: dict | None, num_layers: int, teacher_layer_types: list[str]) -> dict:
    """Merge a user plan over the defaults, validate it and add the per-layer ``kinds`` list."""
    plan = dict(plan or {})
    _check_keys(plan, {**DEFAULT_PLAN, "kinds": None}, "plan")
    resolved: dict[str, Any] = {}
    for key, default in DEFAULT_PLAN.items():
        value = plan.get(key, default)
        if isinstance(default, dict) and key != "overrides":
            if not isinstance(value, dict):
                raise PlanError(f"plan.{key} must be a mapping like {default}")
            _check_keys(value, default, f"plan.{key}")
            value = {**default, **value}
        resolved[key] = value
    for layer_type, kind in resolved["layers"].items():
        if layer_type not in TEACHER_LAYER_TYPES:
            raise PlanError(f"plan.layers: {layer_type!r} is not a gpt-oss layer type; use {TEACHER_LAYER_TYPES}")
        if kind not in LAYER_KINDS:
            raise PlanError(f"plan.layers.{layer_type}: unknown kind {kind!r}; choose one of {LAYER_KINDS}")
    if "kinds" in plan:
        kinds = list(plan["kinds"])
        if len(kinds) != num_layers:
            raise PlanError(f"plan.kinds lists {len(kinds)} layers but the teacher has {num_layers}")
    else:
        missing = set(teacher_layer_types) - set(resolved["layers"])
        if missing:
            raise PlanError(f"plan.layers has no kind for teacher layer type(s) {sorted(missing)}")
        kinds = [resolved["layers"][t] for t in teacher_layer_types]
    for index, kind in dict(resolved["overrides"]).items():
        if not isinstance(index, int) and not str(index).lstrip("-").isdigit():
            raise PlanError(f"plan.overrides: key {index!r} must be a layer index")
        if not 0 <= int(index) < num_layers:
            raise PlanError(f"plan.overrides: layer {index} is out of range 0..{num_layers - 1}")
        kinds[int(index)] = kind
    for index, kind in enumerate(kinds):
        if kind not in LAYER_KINDS:
            raise PlanError(f"layer {index}: unknown kind {kind!r}; choose one of {LAYER_KINDS}")
    resolved["kinds"] = kinds
    if resolved["position_encoding"] not in POSITION_ENCODINGS:
        raise PlanError(f"plan.position_encoding {resolved['position_encoding']!r}: choose one of {POSITION_ENCODINGS}")
    if resolved["kda"]["head_mapping"] not in KDA_HEAD_MAPPINGS:
        raise PlanError(f"plan.kda.head_mapping {resolved['kda']['head_mapping']!r}: choose one of {KDA_HEAD_MAPPINGS}")
    lower_bound = resolved["kda"]["lower_bound"]
    if lower_bound is not None and not -5.0 <= float(lower_bound) < 0:
        raise PlanError(f"plan.kda.lower_bound {lower_bound} must lie in [-5, 0) (fla's safe gate) or be null")
    if int(resolved["kda"]["conv_size"]) < 1:
        raise PlanError("plan.kda.conv_size must be at least 1")
    return resolved


def load_plan_file(path: str | Path) -> dict:
    path = Path(path)
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            plan = yaml.safe_load(text)
        else:
            plan = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parser error becomes a plan error naming the file
        raise PlanError(f"{path}: cannot parse the plan: {e}") from e
    if not isinstance(plan, dict):
        raise PlanError(f"{path}: a plan must be a mapping, got {type(plan).__name__}")
    return plan


class StudentConfig(PretrainedConfig):
    model_type = "gpt_oss_student"

    def __init__(self, plan: dict | None = None, teacher_name_or_path: str | None = None, **kwargs):
        teacher = {name: kwargs.pop(name) for name in TEACHER_FIELDS if name in kwargs}
        super().__init__(**kwargs)
        for name, value in teacher.items():
            setattr(self, name, value)
        self.teacher_name_or_path = teacher_name_or_path
        if not teacher:  # an empty config, as transformers builds for `to_diff_dict`
            self.plan = plan
            return
        self.plan = resolve_plan(plan, self.num_hidden_layers, list(self.layer_types))
        if self.num_attention_heads % self.num_key_value_heads:
            raise PlanError("num_attention_heads must be a multiple of num_key_value_heads")
        tpa = self.plan["tpa"]
        for name in ("q_rank", "k_rank", "v_rank"):
            rank = tpa[name]
            if rank is not None and not 0 < int(rank) <= self.num_attention_heads * self.head_dim:
                raise PlanError(f"plan.tpa.{name}={rank} must be a positive rank (or null)")
        if self.head_dim % 2:
            raise PlanError(f"head_dim {self.head_dim} must be even for rotary planes")
        if self.kda_head_dim > 256:
            raise PlanError(f"KDA head dim {self.kda_head_dim} exceeds fla's limit of 256")

    @classmethod
    def from_teacher(cls, teacher_config, plan: dict | None = None, teacher_name_or_path: str | None = None):
        teacher = teacher_config.to_dict() if hasattr(teacher_config, "to_dict") else dict(teacher_config)
        fields = {name: teacher[name] for name in TEACHER_FIELDS if name in teacher}
        fields["swiglu_limit"] = swiglu_limit(teacher)
        return cls(plan=plan, teacher_name_or_path=teacher_name_or_path, **fields)

    # Derived quantities: one place, so HF, Megatron and the converters agree.
    @property
    def attention_kinds(self) -> list[str]:
        return list(self.plan["kinds"])

    @property
    def window(self) -> int:
        return int(self.plan["window"] or self.sliding_window)

    @property
    def tpa_ranks(self) -> tuple[int | None, int, int]:
        tpa = self.plan["tpa"]
        kv = self.num_key_value_heads
        return tpa["q_rank"], int(tpa["k_rank"] or kv), int(tpa["v_rank"] or kv)

    @property
    def tpa_contextual(self) -> bool:
        return bool(self.plan["tpa"]["contextual"])

    @property
    def position_encoding(self) -> str:
        return self.plan["position_encoding"]

    @property
    def grape_learned_basis(self) -> bool:
        return bool(self.plan["grape"]["learned_basis"])

    @property
    def kda_head_mapping(self) -> str:
        return self.plan["kda"]["head_mapping"]

    @property
    def kda_num_heads(self) -> int:
        """q/k heads: option A keeps all query heads, B and C one per KV group."""
        return self.num_attention_heads if self.kda_head_mapping == "A" else self.num_key_value_heads

    @property
    def kda_num_v_heads(self) -> int:
        return self.num_key_value_heads if self.kda_head_mapping == "C" else self.num_attention_heads

    @property
    def kda_head_dim(self) -> int:
        return self.head_dim

    @property
    def kda_conv_size(self) -> int:
        return int(self.plan["kda"]["conv_size"])

    @property
    def kda_lower_bound(self) -> float | None:
        lb = self.plan["kda"]["lower_bound"]
        return None if lb is None else float(lb)
