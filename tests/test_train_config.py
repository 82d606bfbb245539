"""Stage config schema: every shipped config loads; errors name the file and the key path; overrides apply."""

from pathlib import Path

import pytest

from megatron_student.student.config import load_plan_file, resolve_plan
from megatron_student.train.config import ConfigError, config_from_dict, dump_config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = sorted(CONFIGS.glob("*.yaml"))


def test_shipped_configs_exist():
    assert {p.name for p in STAGES} >= {"stage_a_attn_only.yaml", "stage_b_full_distill.yaml",
                                         "stage_c_long_context.yaml", "demo.yaml"}


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.name)
def test_stage_config_loads_and_round_trips(path):
    config = load_config(path)
    assert config.stage
    again = config_from_dict(config.resolved(), source="resolved")
    assert again.resolved() == config.resolved()
    assert load_config(path, []).resolved() == config_from_dict(__import__("yaml").safe_load(dump_config(config))).resolved()


def test_stage_recipes():
    a, b, c = (load_config(CONFIGS / f) for f in
               ("stage_a_attn_only.yaml", "stage_b_full_distill.yaml", "stage_c_long_context.yaml"))
    assert a.data.seq_len == 2048 and a.optimizer.lr == 1e-3 and a.schedule.min_lr == 1e-5
    assert a.losses.hidden.weight > 0 and "\\.mlp\\." in a.optimizer.freeze
    assert b.optimizer.freeze == ["^embedding\\."] and 4096 <= b.data.seq_len <= 8192 and b.optimizer.lr == 1e-5
    assert 16384 <= c.data.seq_len <= 32768 and c.student.megatron


@pytest.mark.parametrize("name,layers", [("gpt-oss-20b", 24), ("gpt-oss-120b", 36)])
def test_student_plans_resolve(name, layers):
    plan = resolve_plan(load_plan_file(CONFIGS / "student" / f"{name}.yaml"), layers,
                        ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    assert plan["kinds"] == ["swa_tpa" if i % 2 == 0 else "kda" for i in range(layers)]


@pytest.mark.parametrize("override,message", [
    ("losses.hiden.weight=1", "unknown key losses.hiden"),
    ("bogus=1", "unknown key bogus"),
    ("data.micro_batch=two", "data.micro_batch: expected an integer"),
    ("data.global_batch=0", "data.global_batch: must be >= 1"),
    ("optimizer.lr=-1", "optimizer.lr: must be > 0"),
    ("optimizer.betas=[0.9]", "optimizer.betas"),
    ("optimizer.freeze=['(']", "optimizer.freeze[0]: invalid regex"),
    ("losses.logits[0]", "not of the form key.path=value"),
    ("losses.logits=[{kind: kl}]", "losses.logits[0].kind: 'kl' is not one of"),
    ("losses.logits=[{kind: ce, temperature: 2.0}]", "losses.logits[0]: ce is computed on the untempered"),
    ("losses.logits=[{kind: jsd, beta: 1.0}]", "losses.logits[0]: jsd: beta"),
    ("losses.hidden.layer_map=[[0]]", "losses.hidden.layer_map[0]"),
    ("losses.hidden.layer_map=some", "losses.hidden.layer_map"),
    ("schedule.decay=exp", "schedule.decay: 'exp' is not one of"),
    ("schedule.min_lr=1.0", "schedule.min_lr"),
    ("student.megatron=x", "student: set exactly one"),
    ("teacher.dtype=fp16", "teacher.dtype"),
    ("logging.peak_tflops=-3", "logging.peak_tflops"),
    ("student.dtype=fp16", "student.dtype: 'fp16' is not one of"),
    ("optimizer.implementation=apex", "optimizer.implementation: 'apex' is not one of"),
    ("recompute.granularity=selective", "recompute.granularity: 'selective' is not one of"),
    ("recompute.num_layers=0", "recompute.num_layers: must be >= 1"),
    ("eval.suite=default", "eval.suite_every: must be a positive multiple of checkpoint.every=10"),
    ("eval.suite=nosuch.yaml", "eval.suite: 'nosuch.yaml' is neither a built-in suite"),
])
def test_validation_errors_name_file_and_key(override, message):
    path = CONFIGS / "demo.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_overrides_apply_with_yaml_values():
    config = load_config(CONFIGS / "demo.yaml", ["optimizer.lr=2e-4", "data.micro_batch=2", "data.global_batch=4",
                                                 "losses.hidden.layer_map=[[0, 1]]", "student.hf=null",
                                                 "student.megatron=some/ckpt", "logging.wandb=true"])
    assert config.optimizer.lr == 2e-4 and config.data.micro_batch == 2
    assert config.losses.hidden.layer_map == [[0, 1]]
    assert config.student.hf is None and config.student.megatron == "some/ckpt" and config.logging.wandb is True


def test_every_loss_weight_zero_is_rejected():
    with pytest.raises(ConfigError, match="every loss weight is 0"):
        load_config(CONFIGS / "demo.yaml", ["losses.logits=[{kind: ce, weight: 0.0}]"])


def test_bf16_student_needs_megatrons_optimizer():
    with pytest.raises(ConfigError, match="student.dtype: bf16 needs optimizer.implementation megatron"):
        load_config(CONFIGS / "demo.yaml", ["student.dtype=bf16", "optimizer.implementation=torch"])
