"""StudentConfig: a teacher gpt-oss config plus an attention plan (``spec.AttentionPlan``, stored resolved as the
``plan`` field of config.json); ``spec.layer_specs(config)`` gives its per-layer attention specs."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PretrainedConfig

from ..ops.kda import MAX_HEAD_K
from ..teacher.config import swiglu_limit
from .spec import AttentionPlan, PlanError, resolve_plan

TEACHER_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "sliding_window",
    "layer_types", "rope_parameters", "rms_norm_eps", "swiglu_limit", "attention_bias", "max_position_embeddings",
    "initializer_range", "router_aux_loss_coef", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id",
)


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
        tpa = self.attention_plan.tpa
        for name in ("q_rank", "k_rank", "v_rank"):
            rank = getattr(tpa, name)
            if rank is not None and not 0 < int(rank) <= self.num_attention_heads * self.head_dim:
                raise PlanError(f"plan.tpa.{name}={rank} must be a positive rank (or null)")
        if self.head_dim % 2:
            raise PlanError(f"head_dim {self.head_dim} must be even for rotary planes")
        if self.head_dim > MAX_HEAD_K:  # KDA's head dim is the teacher's
            raise PlanError(f"KDA head dim {self.head_dim} exceeds fla's limit of {MAX_HEAD_K}")

    @classmethod
    def from_teacher(cls, teacher_config, plan: dict | None = None, teacher_name_or_path: str | None = None):
        teacher = teacher_config.to_dict() if hasattr(teacher_config, "to_dict") else dict(teacher_config)
        fields = {name: teacher[name] for name in TEACHER_FIELDS if name in teacher}
        fields["swiglu_limit"] = swiglu_limit(teacher)
        return cls(plan=plan, teacher_name_or_path=teacher_name_or_path, **fields)

    @property
    def attention_plan(self) -> AttentionPlan:
        """The typed plan (``plan`` holds its config.json form)."""
        return AttentionPlan.resolve(self.plan, self.num_hidden_layers, list(self.layer_types))
