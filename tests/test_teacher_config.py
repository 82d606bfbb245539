"""validate_gpt_oss_config: accepts gpt-oss configs in both RoPE layouts, names the field that is wrong."""

import pytest

from megatron_student.teacher import TeacherConfigError, validate_gpt_oss_config
from megatron_student.teacher.tiny import tiny_teacher_config


def _config(**changes):
    cfg = tiny_teacher_config(layers=5, hidden=64, heads=8, kv_heads=2, head_dim=16, experts=4,
                              experts_per_token=2, intermediate=64, dtype="bf16", mxfp4=True)
    cfg.update(changes)
    return cfg


def _transformers5_layout():
    cfg = _config()
    cfg["rope_parameters"] = {**cfg.pop("rope_scaling"), "rope_theta": cfg.pop("rope_theta")}
    return cfg


def test_accepts_both_rope_layouts_and_odd_layer_counts():
    validate_gpt_oss_config(_config(), "legacy.json")
    validate_gpt_oss_config(_transformers5_layout(), "tf5.json")
    cfg = _config(num_hidden_layers=1)
    cfg["layer_types"] = ["sliding_attention"]
    validate_gpt_oss_config(cfg, "one_layer.json")


def _without(field):
    cfg = _config()
    del cfg[field]
    return cfg


def _rope(**changes):
    cfg = _config()
    cfg["rope_scaling"] = {**cfg["rope_scaling"], **changes}
    return cfg


def _rope5(**changes):
    cfg = _transformers5_layout()
    cfg["rope_parameters"] = {**cfg["rope_parameters"], **changes}
    return cfg


BAD = {
    "kv heads": (_config(num_key_value_heads=3), r"'num_attention_heads' \(8\) is not divisible by 'num_key_value_heads' \(3\)"),
    "no head_dim": (_without("head_dim"), r"required field 'head_dim' is missing"),
    "no attention bias": (_config(attention_bias=False), r"field 'attention_bias' is False"),
    "tied": (_config(tie_word_embeddings=True), r"field 'tie_word_embeddings' is true"),
    "top-k": (_config(num_experts_per_tok=5, experts_per_token=5), r"'num_experts_per_tok' \(5\) must be between 1 and num_local_experts \(4\)"),
    "top-k disagree": (_config(experts_per_token=3), r"'experts_per_token' \(3\) disagrees with 'num_experts_per_tok' \(2"),
    "layer count": (_config(num_hidden_layers=4), r"'layer_types' must list one type per layer \(4\)"),
    "odd layer": (_config(layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]),
                  r"'layer_types'\[3\] is 'sliding_attention', expected 'full_attention'"),
    "no rope": (_without("rope_scaling"), r"no RoPE settings"),
    "not yarn": (_rope(rope_type="linear"), r"field 'rope_scaling\.rope_type' is 'linear'"),
    "no factor": (_rope5(factor=None), r"field 'rope_parameters\.factor' must be a positive number"),
    "betas": (_rope(beta_fast=0.5), r"'rope_scaling\.beta_fast' \(0\.5\) must exceed 'beta_slow'"),
    "truncate": (_rope5(truncate=None), r"'rope_parameters\.truncate' must be given as true or false"),
    "no theta": (_without("rope_theta"), r"'rope_theta' must be a positive number, got None"),
    "vocab": (_config(vocab_size=32000), r"field 'vocab_size' \(32000\) does not cover the Harmony special tokens"),
    "eos": (_config(eos_token_id=[200002, 201088]), r"field 'eos_token_id' \(201088\) is outside the vocabulary \(0\.\.201087\)"),
    "quant": (_config(quantization_config={"quant_method": "gptq"}), r"'quantization_config\.quant_method' is 'gptq'"),
    "negative size": (_config(hidden_size=-64), r"field 'hidden_size' must be a positive integer, got -64"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_refuses_with_field_and_source(case):
    cfg, message = BAD[case]
    with pytest.raises(TeacherConfigError, match=r"^teacher/config\.json: .*" + message):
        validate_gpt_oss_config(cfg, "teacher/config.json")
