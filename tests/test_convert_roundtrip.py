"""Round trips through the converters: HF teacher → Megatron (logits), HF student → Megatron → TP=2/EP=2 → HF
(every tensor identical), and the same HF bundle from a TP=1 and a TP=2/EP=2 Megatron checkpoint."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from megatron_harness import MIXED_PLAN, hf_student, rel, run_distributed
from convert_workers import student_resave_worker, teacher_logits_worker

from megatron_student.cli import main as cli
from megatron_student.student.modeling import HARMONY_STOP_TOKEN_IDS, SHIM_FILES
from megatron_student.student.surgery import FP32_PARAMETERS
from megatron_student.teacher import load_teacher_model, make_tiny_teacher


def read_bundle(directory):
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for name in files:
        with safe_open(directory / name, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


@pytest.mark.parametrize("mxfp4", [False, True])
def test_teacher_to_megatron_logits_equal_hf(tmp_path, mxfp4):
    seed = int(torch.randint(0, 2**31, ()).item())
    hf_dir = make_tiny_teacher(tmp_path / "teacher", seed=seed, dtype="fp32", mxfp4=mxfp4, layers=2)
    assert cli(["convert-hf-to-megatron", "--hf", str(hf_dir), "--output", str(tmp_path / "mg"), "--role", "teacher",
                "--tp", "1", "--ep", "1", "--dtype", "fp32"]) == 0
    tokens = torch.randint(0, 201088, (2, 24))
    from_checkpoint, direct = run_distributed(teacher_logits_worker, 1, str(hf_dir), str(tmp_path / "mg"), tokens)[0]
    assert torch.equal(from_checkpoint, direct)  # the checkpoint holds exactly the mapped weights
    hf = load_teacher_model(hf_dir, torch.float32)
    with torch.no_grad():
        reference = hf(tokens).logits
    assert rel(from_checkpoint, reference) < 1e-5  # the Megatron/HF parity tolerance (fp32 reduction order)


def bf16_student(tmp_path, seed):
    model = hf_student(MIXED_PLAN, seed=seed)
    for name, p in model.named_parameters():  # as init-student writes it: bf16, KDA decays fp32
        if name.rsplit(".", 1)[-1] not in FP32_PARAMETERS:
            p.data = p.data.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.config.teacher_name_or_path = "tiny-teacher"
    model.save_pretrained(tmp_path / "student")
    return model


def test_student_round_trip_through_tp2_ep2_is_exact(tmp_path):
    seed = int(torch.randint(0, 2**31, ()).item())
    original = bf16_student(tmp_path, seed)
    teacher = tmp_path / "teacher_tokenizer"
    teacher.mkdir()
    (teacher / "tokenizer.json").write_text(json.dumps({"seed": seed}))
    assert cli(["convert-hf-to-megatron", "--hf", str(tmp_path / "student"), "--output", str(tmp_path / "mg"),
                "--role", "student", "--tp", "2", "--ep", "2"]) == 0
    layouts = run_distributed(student_resave_worker, 4, original.config.to_dict(), str(tmp_path / "mg"),
                              str(tmp_path / "trained"), 10)
    assert layouts == [(2, 2)] * 4
    for source, out in (("mg", "hf_tp1"), ("trained", "hf_tp2ep2")):
        assert cli(["convert-megatron-to-hf", "--megatron", str(tmp_path / source), "--output", str(tmp_path / out),
                    "--teacher-dir", str(teacher), "--max-shard-mb", "0.1"]) == 0

    exported = read_bundle(tmp_path / "hf_tp1")
    reference = original.state_dict()
    assert set(exported) == set(reference)
    for name, tensor in reference.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name
    resaved = read_bundle(tmp_path / "hf_tp2ep2")
    assert set(resaved) == set(exported)
    for name, tensor in exported.items():
        assert torch.equal(resaved[name], tensor), name

    bundle = tmp_path / "hf_tp2ep2"
    assert json.loads((bundle / "model.safetensors.index.json").read_text())["weight_map"]  # sharded at 0.1 MiB
    config = json.loads((bundle / "config.json").read_text())
    assert config["plan"] == original.config.plan and config["model_type"] == "gpt_oss_student"
    assert json.loads((bundle / "generation_config.json").read_text())["eos_token_id"] == HARMONY_STOP_TOKEN_IDS
    assert (bundle / "tokenizer.json").read_text() == json.dumps({"seed": seed})
    for name, text in SHIM_FILES.items():
        assert (bundle / name).read_text() == text
    card = (bundle / "README.md").read_text()
    assert "tiny-teacher" in card and "resaved at TP=2/EP=2" in card and "12345" in card and "kda" in card
    assert "converted from HF" in (tmp_path / "hf_tp1" / "README.md").read_text()

    loaded = AutoModelForCausalLM.from_pretrained(bundle, trust_remote_code=True)
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in reference.items())
    prompt = torch.randint(1, 512, (1, 5))  # not the pad id 0: generate would mask it as padding
    generated = loaded.generate(prompt, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > prompt.shape[1]
