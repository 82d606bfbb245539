"""Every converter error stops the run with a message naming the tensor, field or file, and writes nothing."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_harness import hf_student

from megatron_student.checkpoint import (METADATA_KEY, MegatronCheckpoint, load_model, read_record, resolve_megatron_dir,
                                         single_process_group)
from megatron_student.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf
from megatron_student.megatron import ParallelConfig, initialize_parallel
from megatron_student.teacher import TeacherConfigError, make_tiny_teacher


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("student") / "hf"
    hf_student(seed=int(torch.randint(0, 2**31, ()).item())).save_pretrained(directory)
    return directory


def edited_copy(src, dst, edit):
    """A copy of an HF dir with its safetensors state (and config) passed through ``edit(tensors, config)``."""
    dst.mkdir()
    tensors, config = load_file(src / "model.safetensors"), json.loads((src / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def assert_refused(hf_dir, tmp_path, role, error, *patterns):
    with pytest.raises(error) as info:
        convert_hf_to_megatron(hf_dir, tmp_path / "out", role)
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_missing_tensor(student_dir, tmp_path):
    src = edited_copy(student_dir, tmp_path / "hf", lambda t, c: t.pop("model.layers.1.self_attn.A_log"))
    assert_refused(src, tmp_path, "student", ConversionError, "missing tensor 'model.layers.1.self_attn.A_log'")


def test_unexpected_tensor(student_dir, tmp_path):
    src = edited_copy(student_dir, tmp_path / "hf", lambda t, c: t.update({"model.layers.0.extra": torch.zeros(3)}))
    assert_refused(src, tmp_path, "student", ConversionError, "unexpected tensor 'model.layers.0.extra'")


def test_misshaped_tensor(student_dir, tmp_path):
    name = "model.layers.3.mlp.experts.down_proj"
    src = edited_copy(student_dir, tmp_path / "hf", lambda t, c: t.update({name: t[name].transpose(1, 2).contiguous()}))
    assert_refused(src, tmp_path, "student", ConversionError, f"tensor '{name}' has shape (4, 64, 32)", "(4, 32, 64)")


def test_wrong_model_type(student_dir, tmp_path):
    assert_refused(student_dir, tmp_path, "teacher", ConversionError, "'model_type' is 'gpt_oss_student'",
                   "--role teacher needs 'gpt_oss'")
    teacher = make_tiny_teacher(tmp_path / "teacher", layers=2)
    assert_refused(teacher, tmp_path, "student", ConversionError, "'model_type' is 'gpt_oss'")


def test_unknown_quantisation(student_dir, tmp_path):
    teacher = make_tiny_teacher(tmp_path / "teacher", layers=2)
    config = json.loads((teacher / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq"}
    (teacher / "config.json").write_text(json.dumps(config))
    assert_refused(teacher, tmp_path, "teacher", TeacherConfigError, "quantization_config.quant_method", "'gptq'")
    src = edited_copy(student_dir, tmp_path / "student",
                      lambda t, c: c.update(quantization_config={"quant_method": "mxfp4"}))
    assert_refused(src, tmp_path, "student", ConversionError, "'quantization_config'", "unknown quantisation")


def test_layout_not_dividing_heads(student_dir, tmp_path):
    with pytest.raises(ConversionError, match="--tp 4: config field 'num_key_value_heads' \\(2\\)"):
        convert_hf_to_megatron(student_dir, tmp_path / "out", "student", tp=4)
    with pytest.raises(ConversionError, match="--ep 3: config field 'num_local_experts' \\(4\\)"):
        convert_hf_to_megatron(student_dir, tmp_path / "out", "student", ep=3)


@pytest.fixture(scope="module")
def megatron_dir(student_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mg") / "ckpt"
    convert_hf_to_megatron(student_dir, out, "student", dtype="fp32")
    return out


def test_existing_output_needs_force(student_dir, megatron_dir, tmp_path):
    before = sorted(p.name for p in megatron_dir.rglob("*"))
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        convert_hf_to_megatron(student_dir, megatron_dir, "student")
    assert sorted(p.name for p in megatron_dir.rglob("*")) == before
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        convert_megatron_to_hf(megatron_dir, tmp_path / "hf")
    assert not list((tmp_path / "hf").iterdir())
    convert_megatron_to_hf(megatron_dir, tmp_path / "hf", force=True)
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def rewritten(megatron_dir, directory, edit):
    """A torch_dist checkpoint holding the tensors (global) and record of ``megatron_dir`` after ``edit``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    ckpt = MegatronCheckpoint(megatron_dir)
    tensors = {key: ckpt.get(key) for key in ckpt.tensors}
    record = dict(ckpt.metadata)
    edit(tensors, record)
    state = {key: ShardedTensor.from_rank_offsets(key, t, replica_id=0) for key, t in tensors.items()}
    if record:
        state[METADATA_KEY] = record
    directory.mkdir()
    with single_process_group():
        dist_checkpointing.save(state, str(directory))
    return directory


@pytest.mark.parametrize("edit,patterns", [
    (lambda t, r: t.pop("decoder.layers.2.mlp.router.bias"),
     ["missing Megatron tensor 'decoder.layers.2.mlp.router.bias'", "model.layers.2.mlp.router.bias"]),
    (lambda t, r: t.update({"decoder.layers.0.mlp.shared_experts.weight": torch.zeros(2)}),
     ["unexpected Megatron tensor 'decoder.layers.0.mlp.shared_experts.weight'"]),
    (lambda t, r: t.update({"decoder.layers.2.self_attention.q_proj.weight": torch.zeros(64, 64)}),
     ["'decoder.layers.2.self_attention.q_proj.weight' (64, 64) does not fit HF 'model.layers.2.self_attn.q_proj.weight'"]),
    (lambda t, r: t.update({"decoder.layers.1.mlp.experts.experts.linear_fc2.weight": torch.zeros(4, 32, 64)}),
     ["'decoder.layers.1.mlp.experts.experts.linear_fc2.weight' (4, 32, 64) gives HF 'model.layers.1.mlp.experts.down_proj'"]),
    (lambda t, r: r.update(role="teacher"), ["a 'teacher' checkpoint"]),
    (lambda t, r: r["hf_config"].update(model_type="llama"), ["model_type 'llama'"]),
    (lambda t, r: r.clear(), ["no 'megatron_student' record"]),
])
def test_megatron_checkpoint_errors(megatron_dir, tmp_path, edit, patterns):
    bad = rewritten(megatron_dir, tmp_path / "bad", edit)
    with pytest.raises(ConversionError) as info:
        convert_megatron_to_hf(bad, tmp_path / "hf")
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp-*"))


@pytest.mark.parametrize("edit,pattern", [
    (lambda r: r.pop("layout"), "lacks fields ['layout']"),
    (lambda r: r.update(origin="elsewhere"), "unknown fields ['origin']"),
    (lambda r: r.update(format_version=2), "format_version 2; this version reads 1"),
    (lambda r: r["layout"].pop("target_tp"), "record field 'layout'"),
])
def test_damaged_record_is_named_by_every_reader(megatron_dir, tmp_path, edit, pattern):
    """The HF export and the trainer's loader read the checkpoint record through one reader: the same error,
    naming the checkpoint's common.pt."""
    bad = rewritten(megatron_dir, tmp_path / "bad", lambda t, r: edit(r))
    expected = re.escape(f"{bad}/common.pt: ") + ".*" + re.escape(pattern)
    with pytest.raises(ConversionError, match=expected):
        convert_megatron_to_hf(bad, tmp_path / "hf")
    with single_process_group():
        parallel = ParallelConfig(params_dtype=torch.float32)
        initialize_parallel(parallel)
        with pytest.raises(ConversionError, match=expected):
            load_model(bad, "student", parallel)


def test_record_from_before_context_parallelism_reads_as_cp_1(megatron_dir, tmp_path):
    """The layout records the context-parallel size of the run that wrote it (the converter: 1); a record written
    before that field existed still exports, read as CP 1."""
    assert read_record(resolve_megatron_dir(megatron_dir)).layout.written_cp == 1
    old = rewritten(megatron_dir, tmp_path / "old", lambda t, r: r["layout"].pop("written_cp"))
    assert read_record(old).layout.written_cp == 1
    convert_megatron_to_hf(old, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
