"""HF student: exactness of the surgery, cached decoding, save/reload, plans, generation stop tokens."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_student.student.config import PlanError, StudentConfig
from megatron_student.student.modeling import CACHE_FIELD, HARMONY_STOP_TOKEN_IDS, StudentForCausalLM
from megatron_student.student.surgery import init_student
from megatron_student.teacher import TeacherCheckpoint, make_tiny_teacher

SOFTMAX_PLAN = {"layers": {"sliding_attention": "softmax_sliding", "full_attention": "softmax_full"}}
EXACT_TPA_PLAN = {"layers": {"sliding_attention": "swa_tpa", "full_attention": "softmax_full"}}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "tiny"
    return make_tiny_teacher(path, layers=4, hidden=64, heads=8, kv_heads=2, head_dim=16, experts=4,
                             experts_per_token=2, intermediate=32, dtype="fp32", seed=11)


@pytest.fixture(scope="module")
def teacher_model(teacher_dir):
    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()


def load_student(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype).eval()


def tokens(seed, length):
    return torch.randint(0, 201088, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_softmax_plan_reproduces_teacher(tmp_path, teacher_dir, teacher_model):
    out, _ = init_student(teacher_dir, tmp_path / "s", plan=SOFTMAX_PLAN)
    student = load_student(out)
    assert isinstance(student, StudentForCausalLM)
    ids = tokens(0, 300)  # well past the 128-key window
    assert rel(student(ids).logits, teacher_model(ids).logits) < 1e-5


@pytest.mark.parametrize("position", ["yarn", "grape_m"])
@torch.no_grad()
def test_exact_tpa_init_reproduces_teacher_sliding_attention(tmp_path, teacher_dir, teacher_model, position):
    plan = {**EXACT_TPA_PLAN, "position_encoding": position, "grape": {"learned_basis": position == "grape_m"}}
    out, records = init_student(teacher_dir, tmp_path / "s", plan=plan)
    student = load_student(out)
    assert student.model.layers[0].kind == "swa_tpa"
    ids = tokens(1, 300)
    assert rel(student(ids).logits, teacher_model(ids).logits) < 1e-5
    derived = {r.name: r for r in records if r.origin == "derived"}
    assert "exact" in derived["model.layers.0.self_attn.k_a0"].detail


@torch.no_grad()
def test_default_plan_surgery_is_bit_exact_and_reported(tmp_path, teacher_dir):
    out, records = init_student(teacher_dir, tmp_path / "s")
    teacher = TeacherCheckpoint(teacher_dir)
    student = load_student(out)
    state = student.state_dict()
    kinds = [layer.kind for layer in student.model.layers]
    assert kinds == ["swa_tpa", "kda", "swa_tpa", "kda"]
    copied = [r for r in records if r.origin == "copied"]
    for r in copied:
        source = r.detail.removeprefix("from ")
        assert torch.equal(state[r.name], teacher.get(source)), r.name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.router.bias",
                 "model.layers.1.self_attn.q_proj.weight", "model.layers.2.input_layernorm.weight"):
        assert name in {r.name for r in copied}
    assert {r.name for r in records} == set(state)  # every tensor reported
    # option A: k rows repeated per KV head in GQA order
    k_teacher = teacher.get("model.layers.1.self_attn.k_proj.weight").view(2, 16, 64)
    k_student = state["model.layers.1.self_attn.k_proj.weight"].view(8, 16, 64)
    for head in range(8):
        assert torch.equal(k_student[head], k_teacher[head // 4])
    report = (out / "surgery_report.txt").read_text()
    assert "fresh" in report and "model.layers.1.self_attn.dt_bias" in report
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == HARMONY_STOP_TOKEN_IDS


def test_low_rank_tpa_reports_reconstruction_error(tmp_path, teacher_dir):
    plan = {"tpa": {"q_rank": 4, "k_rank": 1, "v_rank": 2}}
    _, records = init_student(teacher_dir, tmp_path / "s", plan=plan)
    details = {r.name: r.detail for r in records}
    assert "SVD" in details["model.layers.0.self_attn.k_a0"]
    error = float(details["model.layers.0.self_attn.k_a0"].split("relative error ")[1])
    assert 0 < error < 1


@torch.no_grad()
def test_cached_decoding_matches_full_forward(tmp_path, teacher_dir):
    out, _ = init_student(teacher_dir, tmp_path / "s", plan={"overrides": {3: "softmax_full"}})
    student = load_student(out)
    # make the KDA path non-trivial: random gates and a faster decay than the long-memory init
    for layer in student.model.layers:
        if layer.kind == "kda":
            attn = layer.self_attn
            torch.nn.init.normal_(attn.f_b_proj.weight, std=0.5)
            torch.nn.init.normal_(attn.b_proj.weight, std=0.5)
            torch.nn.init.normal_(attn.g_b_proj.weight, std=0.5)
            torch.nn.init.normal_(attn.q_conv_weight, std=0.5)
            attn.A_log.fill_(1.0)
    ids = tokens(2, 320)
    full = student(ids).logits
    prefill = 37
    outputs = student(ids[:, :prefill], use_cache=True)
    cache, steps = getattr(outputs, CACHE_FIELD), [outputs.logits]
    for t in range(prefill, ids.shape[1]):
        step = student(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = getattr(step, CACHE_FIELD)
        steps.append(step.logits)
    assert rel(torch.cat(steps, dim=1), full) < 1e-4
    # the SWA caches stay bounded by the window
    assert cache.layers[0]["k_b"].shape[1] == 127
    assert cache.layers[3]["k"].shape[1] == 320


@torch.no_grad()
def test_inconsistent_position_ids_are_refused(tmp_path, teacher_dir):
    out, _ = init_student(teacher_dir, tmp_path / "s")
    student = load_student(out)
    ids = tokens(5, 8)
    student(ids, position_ids=torch.arange(8)[None])  # the implied positions are accepted
    with pytest.raises(ValueError, match="position_ids"):
        student(ids, position_ids=torch.arange(8)[None] + 3)


@torch.no_grad()
def test_save_pretrained_reload_and_bf16(tmp_path, teacher_dir):
    out, _ = init_student(teacher_dir, tmp_path / "s")
    student = load_student(out)
    ids = tokens(3, 64)
    student.save_pretrained(tmp_path / "again")
    again = load_student(tmp_path / "again")
    assert torch.equal(student(ids).logits, again(ids).logits)
    bf16 = load_student(out, dtype=torch.bfloat16)
    attn = bf16.model.layers[1].self_attn
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert attn.A_log.dtype == torch.float32 and attn.dt_bias.dtype == torch.float32
    assert torch.isfinite(bf16(ids).logits).all()


@torch.no_grad()
def test_generate_stops_on_harmony_stop_token(tmp_path, teacher_dir):
    out, _ = init_student(teacher_dir, tmp_path / "s")
    student = load_student(out)
    prompt = tokens(4, 20)
    free = student.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=[])
    first = free[0, 20].item()
    assert first not in HARMONY_STOP_TOKEN_IDS
    # make <|return|> the greedy choice wherever `first` was: its logit becomes twice `first`'s
    student.lm_head.weight[200002] = 2 * student.lm_head.weight[first]
    stopped = student.generate(prompt, max_new_tokens=5, do_sample=False)
    assert stopped[0, 20:].tolist() == [200002]


def test_plan_errors_say_what_to_change(teacher_dir):
    config = TeacherCheckpoint(teacher_dir).config
    with pytest.raises(PlanError, match="unknown kind 'mamba'"):
        StudentConfig.from_teacher(config, {"layers": {"full_attention": "mamba"}})
    with pytest.raises(PlanError, match="out of range 0..3"):
        StudentConfig.from_teacher(config, {"overrides": {7: "kda"}})
    with pytest.raises(PlanError, match=r"unknown key\(s\) \['rank'\]"):
        StudentConfig.from_teacher(config, {"tpa": {"rank": 2}})
    with pytest.raises(PlanError, match="head_mapping 'D'"):
        StudentConfig.from_teacher(config, {"kda": {"head_mapping": "D"}})
    with pytest.raises(PlanError, match="lists 2 layers but the teacher has 4"):
        StudentConfig.from_teacher(config, {"kinds": ["kda", "kda"]})


def test_refuses_non_gpt_oss_teacher(tmp_path, teacher_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(teacher_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="model_type"):
        init_student(bad, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_mxfp4_teacher_experts_are_copied_dequantised(tmp_path):
    teacher = make_tiny_teacher(tmp_path / "mx", mxfp4=True, hidden=64, intermediate=64, layers=2, seed=5)
    out, records = init_student(teacher, tmp_path / "s")
    student = load_student(out, dtype=torch.bfloat16)
    reader = TeacherCheckpoint(teacher)
    assert reader.quantization == "mxfp4"
    for name in ("gate_up_proj", "down_proj"):
        full = f"model.layers.1.mlp.experts.{name}"
        assert torch.equal(student.state_dict()[full], reader.get(full))
