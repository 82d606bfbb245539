"""The architecture as data: a typed attention plan and one frozen spec per layer.

``AttentionPlan`` is what a plan file (YAML or JSON) or a student's ``config.json`` says, validated and with
its defaults; ``layer_specs(config)`` turns a config into one ``AttentionSpec`` per layer: from the plan for a
student, from ``layer_types`` for a gpt-oss teacher. The HF modules (``student/modeling.py``), the Megatron-Core
modules (``megatron/attention.py``), weight surgery and the converters all read these specs; a new attention
option is a field here, one ops function (``ops/layers.py``) and its initialisation in surgery.

Layer kinds:
  swa_tpa          sliding window (``window`` keys incl. the current one) + TPA + sinks, RoPE (YaRN) or GRAPE-M
  kda              Kimi Delta Attention, no position encoding
  softmax_sliding  the teacher's own sliding attention (GQA + sinks + YaRN), kept as is
  softmax_full     the teacher's own full attention, kept as is (a fallback for long-range recall)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from ..ops.rope import YarnRope

TEACHER_LAYER_TYPES = ("sliding_attention", "full_attention")
PLAN_KINDS = ("swa_tpa", "kda", "softmax_sliding", "softmax_full")  # the plan's words for the specs below
KDA_HEAD_MAPPINGS = ("A", "B", "C")
POSITION_ENCODINGS = ("yarn", "grape_m")


class PlanError(ValueError):
    """An attention plan that cannot be built; the message says what to change."""


# --------------------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TpaPlan:
    q_rank: int | None = None  # None: q is a plain projection (TPA-KVonly)
    k_rank: int | None = None  # None: the teacher's KV heads (exact GQA initialisation)
    v_rank: int | None = None
    contextual: bool = True  # the head factor has a learned W_A·x part


@dataclass(frozen=True)
class GrapePlan:
    learned_basis: bool = False


@dataclass(frozen=True)
class KdaPlan:
    head_mapping: str = "A"
    conv_size: int = 4
    lower_bound: float | None = None


def _default_layers() -> dict[str, str]:
    return {"sliding_attention": "swa_tpa", "full_attention": "kda"}


@dataclass(frozen=True)
class AttentionPlan:
    """A resolved plan: the per-layer ``kinds`` plus the options of each kind. Plan files look like

        layers: {sliding_attention: swa_tpa, full_attention: kda}
        overrides: {11: softmax_full}
        window: 128
        tpa: {q_rank: null, k_rank: 8, v_rank: 8, contextual: true}
        position_encoding: yarn          # or grape_m
        grape: {learned_basis: false}
        kda: {head_mapping: A, conv_size: 4, lower_bound: null}

    or list ``kinds`` (one per layer) instead of ``layers``."""

    kinds: tuple[str, ...]
    layers: dict[str, str] = field(default_factory=_default_layers)
    overrides: dict = field(default_factory=dict)
    window: int | None = None  # None: the teacher's sliding_window
    tpa: TpaPlan = TpaPlan()
    position_encoding: str = "yarn"
    grape: GrapePlan = GrapePlan()
    kda: KdaPlan = KdaPlan()

    SECTIONS: ClassVar[dict[str, type]] = {"tpa": TpaPlan, "grape": GrapePlan, "kda": KdaPlan}

    @classmethod
    def resolve(cls, plan: dict | None, num_layers: int, teacher_layer_types: list[str]) -> AttentionPlan:
        """Validate a user plan (or a resolved one, as config.json stores it) and fill in the defaults."""
        plan = dict(plan or {})
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(plan) - set(allowed))
        if unknown:
            raise PlanError(f"plan: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        values: dict[str, Any] = {}
        for name, section in cls.SECTIONS.items():
            default = asdict(section())
            value = plan.get(name, default)
            if not isinstance(value, dict):
                raise PlanError(f"plan.{name} must be a mapping like {default}")
            unknown = sorted(set(value) - set(default))
            if unknown:
                raise PlanError(f"plan.{name}: unknown key(s) {unknown}; allowed: {sorted(default)}")
            values[name] = section(**{**default, **value})
        layers = plan.get("layers", _default_layers())
        if not isinstance(layers, dict):
            raise PlanError(f"plan.layers must be a mapping like {_default_layers()}")
        unknown = sorted(set(layers) - set(TEACHER_LAYER_TYPES))
        if unknown:
            raise PlanError(f"plan.layers: unknown key(s) {unknown}; allowed: {sorted(TEACHER_LAYER_TYPES)}")
        layers = {**_default_layers(), **layers}
        for layer_type, kind in layers.items():
            if kind not in PLAN_KINDS:
                raise PlanError(f"plan.layers.{layer_type}: unknown kind {kind!r}; choose one of {PLAN_KINDS}")
        if "kinds" in plan:
            kinds = list(plan["kinds"])
            if len(kinds) != num_layers:
                raise PlanError(f"plan.kinds lists {len(kinds)} layers but the teacher has {num_layers}")
        else:
            missing = set(teacher_layer_types) - set(layers)
            if missing:
                raise PlanError(f"plan.layers has no kind for teacher layer type(s) {sorted(missing)}")
            kinds = [layers[t] for t in teacher_layer_types]
        overrides = dict(plan.get("overrides", {}))
        for index, kind in overrides.items():
            if not isinstance(index, int) and not str(index).lstrip("-").isdigit():
                raise PlanError(f"plan.overrides: key {index!r} must be a layer index")
            if not 0 <= int(index) < num_layers:
                raise PlanError(f"plan.overrides: layer {index} is out of range 0..{num_layers - 1}")
            kinds[int(index)] = kind
        for index, kind in enumerate(kinds):
            if kind not in PLAN_KINDS:
                raise PlanError(f"layer {index}: unknown kind {kind!r}; choose one of {PLAN_KINDS}")
        resolved = cls(kinds=tuple(kinds), layers=layers, overrides=overrides, window=plan.get("window"),
                       position_encoding=plan.get("position_encoding", "yarn"), **values)
        if resolved.position_encoding not in POSITION_ENCODINGS:
            raise PlanError(f"plan.position_encoding {resolved.position_encoding!r}: choose one of {POSITION_ENCODINGS}")
        kda = resolved.kda
        if kda.head_mapping not in KDA_HEAD_MAPPINGS:
            raise PlanError(f"plan.kda.head_mapping {kda.head_mapping!r}: choose one of {KDA_HEAD_MAPPINGS}")
        if kda.lower_bound is not None and not -5.0 <= float(kda.lower_bound) < 0:
            raise PlanError(f"plan.kda.lower_bound {kda.lower_bound} must lie in [-5, 0) (fla's safe gate) or be null")
        if int(kda.conv_size) < 1:
            raise PlanError("plan.kda.conv_size must be at least 1")
        return resolved

    def to_dict(self) -> dict:
        """The resolved plan as a student's config.json stores it (``plan``)."""
        out = asdict(self)
        out["kinds"] = list(self.kinds)
        return out


def resolve_plan(plan: dict | None, num_layers: int, teacher_layer_types: list[str]) -> dict:
    """A user plan merged over the defaults, validated, with the per-layer ``kinds``: the config.json form."""
    return AttentionPlan.resolve(plan, num_layers, teacher_layer_types).to_dict()


# --------------------------------------------------------------------------------------------------------------
# the per-layer specs
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionSpec:
    """What every attention layer shares: the teacher's width and heads, its attention bias and its YaRN RoPE."""

    hidden_size: int
    num_heads: int  # the teacher's query heads
    num_kv_heads: int
    head_dim: int
    bias: bool
    rope: YarnRope


@dataclass(frozen=True)
class SoftmaxSpec(AttentionSpec):
    """The teacher's attention, kept: GQA + sinks + YaRN RoPE over ``window`` keys (None: full causal)."""

    window: int | None

    @property
    def kind(self) -> str:
        return "softmax_full" if self.window is None else "softmax_sliding"


@dataclass(frozen=True)
class SwaTpaSpec(AttentionSpec):
    """Sliding-window attention with sinks whose K, V (and Q when ``q_rank`` is set) are rank-R tensor products."""

    window: int
    q_rank: int | None  # None: q is a plain projection
    k_rank: int
    v_rank: int
    contextual: bool
    grape: bool  # GRAPE-M with learnable plane frequencies instead of the shared YaRN RoPE
    grape_learned_basis: bool
    kind: ClassVar[str] = "swa_tpa"

    @property
    def ranks(self) -> dict[str, int | None]:
        return {"q": self.q_rank, "k": self.k_rank, "v": self.v_rank}


@dataclass(frozen=True)
class KdaSpec(AttentionSpec):
    """Kimi Delta Attention with the teacher's biases. Head mapping A keeps every query head for q/k and v, B
    one q/k head per KV group (GVA), C one q/k and one value head per KV group."""

    head_mapping: str
    conv_size: int
    lower_bound: float | None
    norm_eps: float
    kind: ClassVar[str] = "kda"

    @property
    def qk_heads(self) -> int:
        return self.num_heads if self.head_mapping == "A" else self.num_kv_heads

    @property
    def v_heads(self) -> int:
        return self.num_kv_heads if self.head_mapping == "C" else self.num_heads


def layer_specs(config) -> list[AttentionSpec]:
    """One spec per layer of a gpt-oss-shaped HF config: from the attention plan of a ``StudentConfig``, from
    ``layer_types`` for a gpt-oss teacher (``GptOssConfig``)."""
    common = dict(hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                  num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
                  bias=bool(config.attention_bias), rope=YarnRope.from_hf_config(config))
    if getattr(config, "plan", None) is None:  # the teacher
        unknown = sorted(set(config.layer_types) - set(TEACHER_LAYER_TYPES))
        if unknown:
            raise ValueError(f"teacher layer_types {unknown} are not gpt-oss layer types {sorted(TEACHER_LAYER_TYPES)}")
        return [SoftmaxSpec(**common, window=config.sliding_window if t == "sliding_attention" else None)
                for t in config.layer_types]
    plan = config.attention_plan
    window = int(plan.window or config.sliding_window)
    tpa, kda = plan.tpa, plan.kda
    kinds = {
        "softmax_full": lambda: SoftmaxSpec(**common, window=None),
        "softmax_sliding": lambda: SoftmaxSpec(**common, window=window),
        "swa_tpa": lambda: SwaTpaSpec(
            **common, window=window, q_rank=None if tpa.q_rank is None else int(tpa.q_rank),
            k_rank=int(tpa.k_rank or config.num_key_value_heads), v_rank=int(tpa.v_rank or config.num_key_value_heads),
            contextual=bool(tpa.contextual), grape=plan.position_encoding == "grape_m",
            grape_learned_basis=bool(plan.grape.learned_basis)),
        "kda": lambda: KdaSpec(
            **common, head_mapping=kda.head_mapping, conv_size=int(kda.conv_size),
            lower_bound=None if kda.lower_bound is None else float(kda.lower_bound), norm_eps=config.rms_norm_eps),
    }
    return [kinds[kind]() for kind in plan.kinds]
