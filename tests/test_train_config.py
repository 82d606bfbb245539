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
    ("parallel.cp=0", "parallel.cp: must be >= 1"),
    ("parallel.cp=3", "data.seq_len: 256 × data.micro_batch 1 must be divisible by parallel.tp × parallel.cp = 1 × 3"),
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


def _capture_dir(tmp_path: Path) -> Path:
    """A directory that looks like a capture to the config check (which only looks for capture.json; the
    capture's contents are checked by offline.training at trainer start, tests/test_offline_capture.py)."""
    (tmp_path / "cap").mkdir()
    (tmp_path / "cap" / "capture.json").write_text("{}")
    return tmp_path / "cap"


def test_single_offline_teacher_and_the_unchanged_online_form(tmp_path):
    cap = _capture_dir(tmp_path)
    online = load_config(CONFIGS / "demo.yaml")
    assert online.teacher.kind == "online" and online.teacher_list() == [online.teacher]
    offline = load_config(CONFIGS / "demo.yaml", [f"teacher={{kind: offline, path: {cap}}}",
                                                  "losses.logits=[{kind: forward_kl}, {kind: ce, weight: 0.5}]"])
    assert [t.kind for t in offline.teacher_list()] == ["offline"]
    assert [(spec.kind, w) for spec, w in offline.teacher_losses(offline.teacher)] == [("forward_kl", 1.0)]
    again = config_from_dict(offline.resolved(), source="resolved")
    assert again.resolved() == offline.resolved()


def test_several_teachers_each_with_its_losses(tmp_path):
    cap = _capture_dir(tmp_path)
    config = load_config(CONFIGS / "demo.yaml", [
        "teacher=null",
        f"teachers=[{{kind: online, path: gpt-oss-20b, weight: 0.3}}, {{kind: offline, path: {cap}, weight: 0.7, "
        "losses: [{kind: forward_kl, weight: 1.0, temperature: 2.0}, {kind: tvd, weight: 0.5}]}]",
        "losses.logits=[{kind: reverse_kl, weight: 2.0}, {kind: ce, weight: 0.1}]"])
    online, offline = config.teacher_list()
    assert (online.kind, online.path, offline.kind) == ("online", "gpt-oss-20b", "offline")
    assert [(s.kind, w) for s, w in config.teacher_losses(online)] == [("reverse_kl", 0.6)]  # 2.0 × 0.3
    assert [(s.kind, s.temperature, w) for s, w in config.teacher_losses(offline)] == [("forward_kl", 2.0, 0.7),
                                                                                      ("tvd", 1.0, 0.35)]
    assert config_from_dict(config.resolved(), source="resolved").resolved() == config.resolved()


@pytest.mark.parametrize("overrides,message", [
    (["teacher={kind: offline, path: CAP}", "losses.hidden.weight=1.0"],
     "losses.hidden.weight: 1.0 needs teacher activations, and the offline teacher (teacher) stores only"),
    (["teacher={kind: offline, path: CAP}", "losses.attention.weight=0.5"],
     "losses.attention.weight: 0.5 needs teacher activations"),
    (["teacher=null", "teachers=[{kind: offline, path: CAP}]", "losses.hidden.weight=1.0"],
     "the offline teacher (teachers[0])"),
    (["teacher={kind: offline, path: CAP/nowhere}"], "teacher.path: CAP/nowhere/capture.json: no capture here"),
    (["teacher={kind: offline, path: ''}"], "teacher.path: a capture-teacher output directory is required"),
    (["teachers=[{kind: offline, path: CAP}]"], "teacher: give either teacher (one) or teachers (a list), not both"),
    (["teacher=null", "teachers=[{kind: online, path: a}, {kind: online, path: b}]"],
     "teachers[1]: at most one online teacher"),
    (["teacher=null", "teachers=[{kind: offline, path: CAP, losses: [{kind: ce}]}]"],
     "teachers[0].losses[0].kind: 'ce' is not a teacher loss"),
    (["teacher=null", "teachers=[{kind: offline, path: CAP, weight: -1.0}]"], "teachers[0].weight: must be >= 0"),
    (["teacher=null", "teachers=[{kind: offline, path: CAP, losses: [{kind: tvd}, {kind: tvd}]}]"],
     "teachers[0].losses: each kind at most once"),
    (["teacher={path: x, weight: 0.5}"], "teacher: weight and losses are per-teacher settings"),
    (["teacher={kind: cached, path: x}"], "teacher.kind: 'cached' is not one of"),
])
def test_teacher_errors_name_the_key(tmp_path, overrides, message):
    cap = str(_capture_dir(tmp_path))
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "demo.yaml", [o.replace("CAP", cap) for o in overrides])
    assert message.replace("CAP", cap) in str(info.value)
