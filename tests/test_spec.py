"""The typed student spec and the HF ↔ Megatron mapping table: per-layer specs from the plan (student) and from
layer_types (teacher), the config.json form of the plan unchanged, and the table's two directions inverse to
each other on every HF tensor of a student."""

import json

import pytest
import torch

from megatron_harness import MIXED_PLAN, student_config, teacher_config
from megatron_student.megatron.mapping import MAPPINGS, hf_source, megatron_key
from megatron_student.student.config import StudentConfig
from megatron_student.student.modeling import StudentForCausalLM
from megatron_student.student.spec import AttentionPlan, KdaSpec, PlanError, SoftmaxSpec, SwaTpaSpec, layer_specs

# The resolved plan of MIXED_PLAN exactly as config.json stored it before the plan was typed.
STORED_PLAN = {
    "layers": {"sliding_attention": "swa_tpa", "full_attention": "kda"}, "overrides": {}, "window": None,
    "tpa": {"q_rank": 3, "k_rank": 2, "v_rank": 2, "contextual": True}, "position_encoding": "grape_m",
    "grape": {"learned_basis": True}, "kda": {"head_mapping": "B", "conv_size": 4, "lower_bound": -5.0},
    "kinds": ["swa_tpa", "kda", "softmax_sliding", "softmax_full"],
}


def test_student_specs_follow_the_plan():
    config = student_config(MIXED_PLAN, window=8)
    swa, kda, sliding, full = layer_specs(config)
    assert [type(s) for s in (swa, kda, sliding, full)] == [SwaTpaSpec, KdaSpec, SoftmaxSpec, SoftmaxSpec]
    assert [s.kind for s in (swa, kda, sliding, full)] == MIXED_PLAN["kinds"]
    assert (swa.window, swa.q_rank, swa.k_rank, swa.v_rank, swa.contextual) == (8, 3, 2, 2, True)
    assert swa.grape and swa.grape_learned_basis
    assert (kda.head_mapping, kda.qk_heads, kda.v_heads, kda.conv_size, kda.lower_bound) == ("B", 2, 8, 4, -5.0)
    assert (sliding.window, full.window) == (8, None)
    assert swa.rope == full.rope and swa.hidden_size == 64 and swa.bias


def test_default_plan_ranks_are_the_kv_heads_and_the_window_is_the_teachers():
    swa, kda = layer_specs(student_config(layers=2, window=16))
    assert (swa.window, swa.q_rank, swa.k_rank, swa.v_rank, swa.grape) == (16, None, 2, 2, False)
    assert (kda.head_mapping, kda.qk_heads, kda.v_heads, kda.lower_bound) == ("A", 8, 8, None)


def test_teacher_specs_follow_layer_types():
    specs = layer_specs(teacher_config(layers=4, window=8))
    assert all(isinstance(s, SoftmaxSpec) for s in specs)
    assert [s.window for s in specs] == [8, None, 8, None]
    bad = teacher_config(layers=2)
    bad.layer_types = ["sliding_attention", "linear_attention"]
    with pytest.raises(ValueError, match=r"teacher layer_types \['linear_attention'\] are not gpt-oss layer types"):
        layer_specs(bad)


def test_stored_plan_form_is_unchanged_and_loads(tmp_path):
    config = student_config(MIXED_PLAN)
    assert config.plan == STORED_PLAN
    assert AttentionPlan.resolve(STORED_PLAN, 4, list(config.layer_types)).to_dict() == STORED_PLAN
    stored = json.loads(config.to_json_string())
    stored["plan"] = json.loads(json.dumps(STORED_PLAN))
    (tmp_path / "config.json").write_text(json.dumps(stored))
    loaded = StudentConfig.from_pretrained(tmp_path)
    assert loaded.plan == STORED_PLAN and layer_specs(loaded) == layer_specs(config)


def test_plan_sections_merge_over_defaults():
    plan = AttentionPlan.resolve({"layers": {"full_attention": "softmax_full"}, "kda": {"conv_size": 2}}, 2,
                                 ["sliding_attention", "full_attention"])
    assert plan.kinds == ("swa_tpa", "softmax_full") and plan.kda.conv_size == 2 and plan.kda.head_mapping == "A"
    with pytest.raises(PlanError, match=r"plan.layers: unknown key\(s\) \['linear'\]"):
        AttentionPlan.resolve({"layers": {"linear": "kda"}}, 2, ["sliding_attention", "full_attention"])


def test_mapping_directions_are_inverse_on_every_student_tensor():
    """Every HF tensor of a student has one row; to_megatron (per expert for expert rows) then to_hf (stacked)
    gives it back bit for bit, and the Megatron parameter name maps back to the same HF name."""
    config = student_config(MIXED_PLAN)
    state = StudentForCausalLM(config).state_dict()
    g = torch.Generator().manual_seed(0)
    padded = {"model.embed_tokens.weight", "lm_head.weight"}
    for name, tensor in state.items():
        hf = torch.randn(tensor.shape, generator=g)
        row, key = megatron_key(name)
        assert sum(bool(r._hf_regex.match(name)) for r in MAPPINGS) == 1, name
        if row.split == "experts":
            megatron = torch.stack([row.to_megatron(e, None) for e in hf])
            megatron_name = row.megatron.format(layer=key.split(".")[2], expert=0)
        else:
            shape = torch.Size((hf.shape[0] + 5, *hf.shape[1:])) if name in padded else hf.shape
            megatron = row.to_megatron(hf, shape)
            megatron_name = key
        assert torch.equal(row.to_hf(megatron, hf.shape), hf), name
        back, fields = hf_source(megatron_name)
        assert back is row and row.hf.format(**fields) == name
    assert megatron_key("model.layers.3.mlp.experts.gate_up_proj")[1] == \
        "decoder.layers.3.mlp.experts.experts.linear_fc1.weight"
    with pytest.raises(KeyError, match="no Megatron source for HF tensor 'model.layers.0.extra'"):
        megatron_key("model.layers.0.extra")
