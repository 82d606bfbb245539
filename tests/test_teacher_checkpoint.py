"""Tiny gpt-oss teachers: written by make_tiny_teacher, read by our reader and by transformers."""

import json
import shutil

import pytest
import torch
import transformers

from megatron_student.cli import main as cli_main
from megatron_student.teacher import (
    TeacherCheckpoint,
    TeacherCheckpointError,
    TeacherConfigError,
    load_teacher_config,
    load_teacher_model,
    make_tiny_teacher,
    save_hf_checkpoint,
)

SMALL = dict(layers=2, hidden=64, intermediate=64, experts=4, experts_per_token=2)


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("t") / "fp32", dtype="fp32", seed=11)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("t") / "bf16", seed=5, **SMALL)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("t") / "sharded", seed=5, max_shard_mb=5, **SMALL)


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("t") / "mxfp4", seed=7, mxfp4=True, max_shard_mb=8)


def _random_ids(batch=2, length=24):
    return torch.randint(0, 201088, (batch, length))


def test_tiny_teacher_is_gpt_oss_shaped(fp32_dir):
    config = load_teacher_config(fp32_dir)
    assert isinstance(config, transformers.GptOssConfig)
    assert config.vocab_size == 201088 and config.num_hidden_layers == 4 and config.sliding_window == 128
    assert config.layer_types == ["sliding_attention", "full_attention"] * 2
    assert config.rope_parameters == {
        "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 4096, "truncate": False, "rope_theta": 150000,
    }
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (199998, 200002, 199999)
    assert config.swiglu_limit == 7.0 and config.attention_bias and not config.tie_word_embeddings
    generation = json.loads((fp32_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [200002, 199999, 200012]
    ckpt = TeacherCheckpoint(fp32_dir)
    assert ckpt.quantization is None
    for name in ("model.layers.0.self_attn.sinks", "model.layers.0.self_attn.o_proj.bias",
                 "model.layers.1.mlp.router.bias", "model.layers.1.mlp.experts.down_proj_bias"):
        tensor = ckpt.get(name)
        assert tensor.dtype == torch.float32 and tensor.std() > 0.05, name  # random and nonzero


def test_transformers_and_our_loader_give_identical_logits(fp32_dir):
    ours = load_teacher_model(fp32_dir, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.float32)
    assert type(theirs) is transformers.GptOssForCausalLM
    ids = _random_ids()
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert torch.equal(a, b)
    assert torch.isfinite(a).all() and a.std() > 0.5  # not degenerate ...
    assert (a.argmax(-1)[0] != a.argmax(-1)[0, 0]).any()  # ... and input dependent
    assert ours.generation_config.eos_token_id == [200002, 199999, 200012]


def test_single_and_sharded_files_hold_identical_tensors(bf16_dir, sharded_dir):
    shards = sorted(p.name for p in sharded_dir.glob("*.safetensors"))
    assert len(shards) >= 3 and (sharded_dir / "model.safetensors.index.json").is_file()
    assert not (bf16_dir / "model.safetensors.index.json").exists()
    single, sharded = TeacherCheckpoint(bf16_dir), TeacherCheckpoint(sharded_dir)
    assert single.tensor_names() == sharded.tensor_names()
    for name in single.tensor_names():
        a, b = single.get(name), sharded.get(name)
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), name
        assert single.shape(name) == tuple(a.shape)


def test_bf16_model_matches_transformers(sharded_dir):
    ours = load_teacher_model(sharded_dir, dtype=torch.bfloat16)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(sharded_dir, dtype=torch.bfloat16)
    expected = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name


def test_mxfp4_checkpoint_equals_transformers_dequantised_model(mxfp4_dir):
    ckpt = TeacherCheckpoint(mxfp4_dir)
    assert ckpt.quantization == "mxfp4"
    names = ckpt.tensor_names()
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and not any(n.endswith(("_blocks", "_scales")) for n in names)
    gate_up, down = ckpt.get("model.layers.0.mlp.experts.gate_up_proj"), ckpt.get("model.layers.0.mlp.experts.down_proj")
    assert gate_up.shape == (4, 64, 128) and down.shape == (4, 64, 64) and gate_up.dtype == torch.bfloat16
    assert ckpt.shape("model.layers.0.mlp.experts.gate_up_proj") == (4, 64, 128)

    # Without accelerate installed, transformers dequantises on CPU only when asked to explicitly.
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        mxfp4_dir, dtype=torch.bfloat16, quantization_config=transformers.Mxfp4Config(dequantize=True)
    )
    ours = load_teacher_model(mxfp4_dir, dtype=torch.bfloat16)
    expected = theirs.state_dict()
    assert set(expected) == set(ours.state_dict())
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    ids = _random_ids()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_cli_writes_a_loadable_teacher(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["make-tiny-teacher", "--output", str(out), "--layers", "3", "--hidden", "32", "--heads", "4",
            "--kv-heads", "1", "--head-dim", "8", "--experts", "3", "--experts-per-token", "1",
            "--intermediate", "32", "--dtype", "fp32", "--mxfp4", "--seed", "3"]
    assert cli_main(argv) == 0
    assert str(out) in capsys.readouterr().out
    config = load_teacher_config(out)
    assert config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert (config.num_key_value_heads, config.num_local_experts, config.num_experts_per_tok) == (1, 3, 1)
    model = load_teacher_model(out)
    assert model.model.layers[2].mlp.experts.down_proj.shape == (3, 32, 32)
    with pytest.raises(FileExistsError, match="already exists"):
        cli_main(argv)
    assert cli_main(argv + ["--overwrite", "--seed", "4"]) == 0


def test_mxfp4_needs_block_aligned_sizes(tmp_path):
    with pytest.raises(ValueError, match=r"--hidden \(48\) must be a multiple of 32 with --mxfp4"):
        make_tiny_teacher(tmp_path / "x", hidden=48, mxfp4=True)
    assert not (tmp_path / "x").exists()


# --- error cases -------------------------------------------------------------------------------------


def _rewrite(src, dst, edit_tensors=None, edit_config=None):
    """Copy checkpoint ``src`` to ``dst`` with edited tensors (logical names) and/or config dict."""
    ckpt = TeacherCheckpoint(src)
    tensors = ckpt.state_dict()
    config = dict(ckpt.config_dict)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_hf_checkpoint(tensors, config, dst)
    return dst


def test_missing_tensor_is_named(bf16_dir, tmp_path):
    bad = _rewrite(bf16_dir, tmp_path / "bad", edit_tensors=lambda t: t.pop("model.layers.1.self_attn.sinks"))
    with pytest.raises(TeacherCheckpointError, match=r"missing tensors 'model\.layers\.1\.self_attn\.sinks'"):
        load_teacher_model(bad)


def test_unexpected_tensor_is_named(bf16_dir, tmp_path):
    def add(t):
        t["model.layers.0.mlp.shared_expert.weight"] = torch.randn(4, 4)
    bad = _rewrite(bf16_dir, tmp_path / "bad", edit_tensors=add)
    with pytest.raises(TeacherCheckpointError, match=r"unexpected tensors 'model\.layers\.0\.mlp\.shared_expert\.weight'"):
        load_teacher_model(bad)


def test_wrong_shape_is_named(bf16_dir, tmp_path):
    def reshape(t):
        t["model.layers.0.mlp.experts.down_proj"] = t["model.layers.0.mlp.experts.down_proj"].transpose(1, 2)[:, :32]
    bad = _rewrite(bf16_dir, tmp_path / "bad", edit_tensors=reshape)
    with pytest.raises(TeacherCheckpointError, match=r"'model\.layers\.0\.mlp\.experts\.down_proj' has shape \(4, 32, 64\), the model expects \(4, 64, 64\)"):
        load_teacher_model(bad)


def _edit_config_file(src, dst, edit):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_wrong_model_type_is_named(bf16_dir, tmp_path):
    bad = _edit_config_file(bf16_dir, tmp_path / "bad", lambda c: c.update(model_type="llama"))
    with pytest.raises(TeacherConfigError, match=r"bad/config\.json: field 'model_type' is 'llama', expected 'gpt_oss'"):
        load_teacher_model(bad)


def test_unknown_quant_method_is_named(mxfp4_dir, tmp_path):
    bad = _edit_config_file(mxfp4_dir, tmp_path / "bad", lambda c: c["quantization_config"].update(quant_method="fp8"))
    with pytest.raises(TeacherConfigError, match=r"config\.json: field 'quantization_config\.quant_method' is 'fp8'"):
        TeacherCheckpoint(bad)


def test_packed_experts_without_quantization_config_are_refused(mxfp4_dir, tmp_path):
    bad = _edit_config_file(mxfp4_dir, tmp_path / "bad", lambda c: c.pop("quantization_config"))
    with pytest.raises(TeacherCheckpointError, match=r"tensor 'model\.layers\.\d+\.mlp\.experts\.\w+_blocks' is MXFP4-packed"):
        TeacherCheckpoint(bad)


def test_missing_shard_is_named(sharded_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(sharded_dir, bad)
    (bad / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00003\.safetensors: shard listed in .*index\.json is missing"):
        load_teacher_model(bad)


def test_non_alternating_layer_types_are_named(bf16_dir, tmp_path):
    bad = _edit_config_file(bf16_dir, tmp_path / "bad", lambda c: c.update(layer_types=["full_attention", "sliding_attention"]))
    with pytest.raises(TeacherConfigError, match=r"field 'layer_types'\[0\] is 'full_attention', expected 'sliding_attention'"):
        load_teacher_config(bad)


def test_no_weights_is_named(bf16_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(bf16_dir / "config.json", bad / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        TeacherCheckpoint(bad)


def test_save_with_a_config_object_round_trips(bf16_dir, tmp_path):
    """A GptOssConfig (transformers 5 rope_parameters layout) is written, validated and read back."""
    ckpt = TeacherCheckpoint(bf16_dir)
    out = save_hf_checkpoint(ckpt.state_dict(), load_teacher_config(bf16_dir), tmp_path / "copy", max_shard_bytes=2**20)
    assert "rope_parameters" in json.loads((out / "config.json").read_text())
    copy = TeacherCheckpoint(out)
    assert copy.tensor_names() == ckpt.tensor_names()
    for name in ckpt.tensor_names():
        assert torch.equal(copy.get(name), ckpt.get(name)), name
    assert not list(tmp_path.glob(".copy.tmp-*"))  # the temporary dir was renamed into place
