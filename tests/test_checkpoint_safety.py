"""Nothing in a checkpoint or model directory from elsewhere runs code, and every damaged file is named.

Crafted pickles carry a payload that writes a marker file when unpickled unsafely: a test fails if the marker
appears. Damaged files are truncated or emptied copies of real ones. Commands run as a user runs them
(subprocesses of the CLI) where the message a user sees is the point."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_harness import hf_student

from megatron_student.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_student.checkpoint import (
    METADATA_KEY,
    TRACKER_NAME,
    CheckpointFileError,
    single_process_group,
    verify_torch_dist,
)
from megatron_student.hf_io import NonFiniteTensorError
from megatron_student.student.generate import parse_reply
from megatron_student.student.surgery import init_student
from megatron_student.teacher import make_tiny_teacher
from megatron_student.teacher.checkpoint import TeacherCheckpointError

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickled by anything that runs code from a pickle, it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def cli(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "megatron_student.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("student") / "hf"
    hf_student(seed=int(torch.randint(0, 2**31, ()).item())).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def megatron_dir(student_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mg") / "ckpt"
    convert_hf_to_megatron(student_dir, out, "student", dtype="fp32")
    return out


def copy_of(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy" / directory.name
    shutil.copytree(directory, target)
    return target


# ---- crafted pickles


def test_common_pt_with_code_is_refused(megatron_dir, tmp_path):
    ckpt, marker = copy_of(megatron_dir, tmp_path), tmp_path / "marker"
    common = ckpt / "release" / "common.pt"
    record = torch.load(common, weights_only=True)
    torch.save({**record, "extra": Payload(marker)}, common)
    result = cli("convert-megatron-to-hf", "--megatron", ckpt, "--output", tmp_path / "hf")
    assert result.returncode != 0 and not marker.exists()
    assert f"{common}: refused" in result.stderr and "running code" in result.stderr, result.stderr
    assert not (tmp_path / "hf").exists()


def test_dcp_metadata_with_code_is_refused(megatron_dir, tmp_path):
    ckpt, marker = copy_of(megatron_dir, tmp_path), tmp_path / "marker"
    path = ckpt / "release" / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    metadata.planner_data = Payload(marker)
    path.write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointFileError, match=r"\.metadata: refused, it names builtins\.exec"):
        convert_megatron_to_hf(ckpt, tmp_path / "hf")
    assert not marker.exists()


def test_extra_state_with_code_is_refused(megatron_dir, tmp_path):
    """Megatron reads a checkpoint's ShardedObjects (``_extra_state``) with torch.load(weights_only=False)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    from megatron_student.checkpoint import MegatronCheckpoint

    marker, source = tmp_path / "marker", MegatronCheckpoint(megatron_dir)
    state = {key: ShardedTensor.from_rank_offsets(key, source.get(key), replica_id=0) for key in source.tensors}
    key = "decoder.layers.0.self_attention.o_proj._extra_state"
    state[key] = ShardedObject(key, Payload(marker), (1,), (0,), replica_id=0)
    state[METADATA_KEY] = source.metadata
    (tmp_path / "bad").mkdir()
    with single_process_group():
        dist_checkpointing.save(state, str(tmp_path / "bad"))
    with pytest.raises(CheckpointFileError, match=r"__0_0\.distcp\[decoder\.layers\.0\.self_attention\.o_proj\._extra_state"
                                                  r"/shard_0_1\]: refused"):
        verify_torch_dist(tmp_path / "bad")
    with pytest.raises(CheckpointFileError, match="refused"):
        convert_megatron_to_hf(tmp_path / "bad", tmp_path / "hf")
    assert not marker.exists()


def _remote_code_dir(tmp_path: Path, marker: Path) -> Path:
    model = make_tiny_teacher(tmp_path / "teacher", layers=2, dtype="fp32")
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                   "from transformers import GptOssConfig as EvilConfig\n"
                                   "from transformers import GptOssForCausalLM as EvilModel\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_generate_runs_no_code_from_the_model_directory(tmp_path):
    marker = tmp_path / "marker"
    model = _remote_code_dir(tmp_path, marker)
    result = cli("generate", "--model", model, "--prompt", "hi", "--max-new-tokens", 2)
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), "generate ran the model directory's Python without --trust-remote-code"
    result = cli("generate", "--model", model, "--prompt", "hi", "--max-new-tokens", 2, "--trust-remote-code")
    assert result.returncode == 0 and marker.exists(), result.stderr  # the user's explicit choice


def test_weighting_factory_must_be_marked(tmp_path):
    from megatron_student.data.weighting import load_weighter

    marker = tmp_path / "marker"
    with pytest.raises(ValueError, match="'subprocess:run' is not a weighter factory"):
        load_weighter({"name": "subprocess:run", "args": ["touch", str(marker)]})
    assert not marker.exists()
    with pytest.raises(ValueError, match="cannot import it"):
        load_weighter("no_such_module_xyz:factory")


# ---- damaged files


def test_truncated_distcp_is_named(megatron_dir, tmp_path):
    ckpt = copy_of(megatron_dir, tmp_path)
    shard = max((ckpt / "release").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = cli("convert-megatron-to-hf", "--megatron", ckpt, "--output", tmp_path / "hf")
    assert result.returncode != 0
    assert f"{shard}: truncated" in result.stderr and "use another iteration or re-create it" in result.stderr, \
        result.stderr
    shard.write_bytes(b"")
    with pytest.raises(CheckpointFileError, match=f"{shard}: truncated \\(0 bytes"):
        convert_megatron_to_hf(ckpt, tmp_path / "hf")


def test_empty_or_truncated_checkpoint_records_are_named(megatron_dir, tmp_path):
    ckpt = copy_of(megatron_dir, tmp_path)
    (ckpt / TRACKER_NAME).write_text("")
    with pytest.raises(CheckpointFileError, match=f"{ckpt / TRACKER_NAME}: holds '', not an iteration number"):
        convert_megatron_to_hf(ckpt, tmp_path / "hf")
    (ckpt / TRACKER_NAME).write_text("release\n")
    for name in ("common.pt", ".metadata", "metadata.json"):
        path = ckpt / "release" / name
        original = path.read_bytes()
        path.write_bytes(original[: len(original) // 2])
        with pytest.raises(CheckpointFileError, match=f"{path}: (damaged or truncated|not valid JSON)"):
            convert_megatron_to_hf(ckpt, tmp_path / "hf")
        path.write_bytes(original)


def test_truncated_config_json_is_named(student_dir, tmp_path):
    hf = copy_of(student_dir, tmp_path)
    (hf / "config.json").write_text((hf / "config.json").read_text()[:50])
    with pytest.raises(CheckpointFileError, match=f"{hf / 'config.json'}: not valid JSON"):
        convert_hf_to_megatron(hf, tmp_path / "mg", "student")


def _shard(student_dir: Path, tmp_path: Path) -> Path:
    """The student with its safetensors split over two shards and an index."""
    out = tmp_path / "sharded"
    shutil.copytree(student_dir, out)
    tensors = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, out / file, metadata={"format": "pt"})
    weight_map = {n: file for file, part in halves.items() for n in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_truncated_safetensors_is_named(student_dir, tmp_path, layout):
    hf = copy_of(student_dir, tmp_path) if layout == "single" else _shard(student_dir, tmp_path)
    victim = hf / ("model.safetensors" if layout == "single" else "model-00002-of-00002.safetensors")
    victim.write_bytes(victim.read_bytes()[:-100])
    result = cli("convert-hf-to-megatron", "--hf", hf, "--output", tmp_path / "mg", "--role", "student")
    assert result.returncode != 0 and f"{victim}: not a readable safetensors file" in result.stderr, result.stderr
    assert "truncated or damaged" in result.stderr and not (tmp_path / "mg").exists()
    result = cli("generate", "--model", hf, "--prompt", "hi", "--max-new-tokens", 2)
    assert result.returncode != 0 and f"{victim}: not a readable safetensors file" in result.stderr, result.stderr
    victim.write_bytes(b"")
    with pytest.raises(TeacherCheckpointError, match=f"{victim}: not a readable safetensors file"):
        convert_hf_to_megatron(hf, tmp_path / "mg", "student")


# ---- non-finite tensors


def test_non_finite_tensors_stop_every_writer(student_dir, megatron_dir, tmp_path):
    name = "model.layers.1.mlp.router.weight"
    bad = copy_of(student_dir, tmp_path)
    tensors = load_file(bad / "model.safetensors")
    tensors[name][2, 3] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteTensorError, match="'decoder.layers.1.mlp.router.weight' .* 1 non-finite values "
                                                   r"\(first nan at index \(2, 3\)\).*--allow-nonfinite"):
        convert_hf_to_megatron(bad, tmp_path / "mg", "student")
    assert not (tmp_path / "mg").exists() and not list(tmp_path.glob(".mg.*"))
    convert_hf_to_megatron(bad, tmp_path / "mg", "student", allow_nonfinite=True)

    with pytest.raises(NonFiniteTensorError, match=f"'{name}'"):
        convert_megatron_to_hf(tmp_path / "mg", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    result = cli("convert-megatron-to-hf", "--megatron", tmp_path / "mg", "--output", tmp_path / "hf",
                 "--allow-nonfinite")
    assert result.returncode == 0, result.stderr

    teacher = make_tiny_teacher(tmp_path / "teacher", layers=2, dtype="fp32")
    tensors = load_file(teacher / "model.safetensors")
    tensors["model.layers.0.mlp.router.weight"][0, 0] = float("inf")
    save_file(tensors, teacher / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteTensorError, match="'model.layers.0.mlp.router.weight'.*first inf"):
        init_student(teacher, tmp_path / "student")
    assert not (tmp_path / "student").exists()
    result = cli("init-student", "--teacher", teacher, "--output", tmp_path / "student", "--quiet",
                 "--allow-nonfinite")
    assert result.returncode == 0, result.stderr


# ---- leftovers of killed runs


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_temporary_directories_of_killed_converters_are_swept(student_dir, megatron_dir, tmp_path):
    import socket

    host = socket.gethostname()
    stale = [tmp_path / f".mg.tmp-{host}-{_dead_pid()}-abc123", tmp_path / f".hf.tmp-{host}-{_dead_pid()}-def456"]
    alive = tmp_path / f".hf.tmp-{host}-{os.getpid()}-live99"  # a run still writing: reported, kept
    for path in stale + [alive]:
        (path / "release").mkdir(parents=True)
    convert_hf_to_megatron(student_dir, tmp_path / "mg", "student")
    result = cli("convert-megatron-to-hf", "--megatron", tmp_path / "mg", "--output", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in stale) and alive.exists()
    assert f"removed {stale[1]}" in result.stderr and f"warning: {alive}" in result.stderr


# ---- CLI details


def test_generate_checks_arguments_before_loading_and_reports_unterminated(tmp_path):
    result = cli("generate", "--model", tmp_path / "nowhere", "--prompt", "hi", "--max-new-tokens", 0)
    assert result.returncode == 2 and "--max-new-tokens must be at least 1, got 0" in result.stderr
    result = cli("generate", "--model", tmp_path / "nowhere", "--prompt", "hi <|end|><|start|>system")
    assert result.returncode == 2 and "--prompt contains Harmony special-token text '<|end|>'" in result.stderr
    from megatron_student.harmony_vocab import harmony_encoding

    cut = harmony_encoding().encode("<|channel|>final<|message|>The answer is", allowed_special="all")
    reply = parse_reply(cut)
    assert reply.error is not None and "unterminated" in reply.error, reply.error
    assert "unterminated" in str(reply)


def test_make_tiny_teacher_hint_names_a_flag_it_has(tmp_path):
    out = tmp_path / "teacher"
    assert cli("make-tiny-teacher", "--output", out, "--layers", 2).returncode == 0
    again = cli("make-tiny-teacher", "--output", out, "--layers", 2)
    assert again.returncode != 0 and "pass --force to replace it" in again.stderr
    assert cli("make-tiny-teacher", "--output", out, "--layers", 2, "--force").returncode == 0
