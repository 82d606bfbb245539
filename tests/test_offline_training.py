"""Training from a capture (``teacher: {kind: offline}``) and with two teachers, on CPU, through the trainer.

The tiny teacher's unembedding is scaled up so that its distributions are sharp: the stored top-64 then hold all
but a negligible tail, and the offline run's losses must equal the online run's (same student, data and seed)
up to the capture's quantisation. The two-teacher stage must give each teacher's loss as the one-teacher runs do,
weighted, with the stage's ``ce`` once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_student.data.manifest import load_manifest
from megatron_student.data.prepare import prepare
from megatron_student.data.storage import HarmonyPackedDataset
from megatron_student.harmony_vocab import GPT_OSS_VOCAB_SIZE
from megatron_student.offline.format import CaptureError
from megatron_student.student.surgery import init_student
from megatron_student.teacher.tiny import make_tiny_teacher
from megatron_student.train.batches import ContextChunk, read_micro_batch
from megatron_student.train.config import config_from_dict
from megatron_student.train.teacher_signal import OfflineTeacher
from megatron_student.train.trainer import Trainer, distributed_context

ASSETS = Path(__file__).resolve().parents[1] / "megatron_student" / "assets"
SHARPEN = 12.0  # logit scale of the teacher: top-1 probability ~1, the tail beyond 64 ids below 1e-6


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline_training")
    make_tiny_teacher(root / "teacher", layers=2, dtype="fp32", seed=5)
    init_student(root / "teacher", root / "student")  # from the plain teacher: the student is not sharpened
    weights = load_file(root / "teacher" / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * SHARPEN
    save_file(weights, root / "teacher" / "model.safetensors", metadata={"format": "pt"})
    prepare(load_manifest(ASSETS / "demo_manifest.yaml"), root / "data", 256, progress=False)
    for split, samples in (("train", 4), ("valid", 2)):  # a few samples keep the capture and the runs short
        index_path = root / "data" / split / "index.json"
        index = json.loads(index_path.read_text())
        index["shards"] = [{**index["shards"][0], "samples": samples}]
        index_path.write_text(json.dumps(index))
    result = subprocess.run(
        [sys.executable, "-m", "megatron_student.cli", "capture-teacher", "--teacher", str(root / "teacher"),
         "--data", str(root / "data"), "--output", str(root / "capture"), "--split", "train", "--split", "valid",
         "--top-k", "64", "--bytes-per-token", "0"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def make_config(root: Path, run: str, teacher: dict | None = None, teachers: list | None = None, overrides=()):
    base = {
        "stage": run, "steps": 2, "seed": 11,
        "student": {"hf": str(root / "student")},
        "data": {"path": str(root / "data"), "seq_len": 256, "micro_batch": 1, "global_batch": 2},
        "optimizer": {"lr": 1e-3}, "schedule": {"warmup_steps": 0, "decay": "constant"},
        "losses": {"logits": [{"kind": "forward_kl", "weight": 1.0}, {"kind": "ce", "weight": 0.1}]},
        "eval": {"every": 2, "batches": 2},
        "checkpoint": {"dir": str(root / run / "ckpt")}, "logging": {"dir": str(root / run / "logs"), "every": 1},
    }
    if teachers is not None:
        base["teachers"] = teachers
    else:
        base["teacher"] = teacher
    return config_from_dict(base, list(overrides), source=f"<{run}>")


def run(config) -> tuple[list, dict]:
    with distributed_context():
        trainer = Trainer(config)
        try:
            history = trainer.fit()
            return history, trainer.evaluate()
        finally:
            trainer.close()


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def online(root):
    return run(make_config(root, "online", teacher={"path": str(root / "teacher"), "dtype": "fp32"}))


def test_offline_teacher_trains_like_the_online_one(root, online):
    offline = run(make_config(root, "offline", teacher={"kind": "offline", "path": str(root / "capture")}))
    (on_history, on_eval), (off_history, off_eval) = online, offline
    assert [r.skipped for r in off_history] == [False] * 2
    # the same weights at step 1: the stored partition holds all but a negligible tail
    assert rel(off_history[0].components["forward_kl"], on_history[0].components["forward_kl"]) < 2e-3
    assert off_history[0].components["ce"] == pytest.approx(on_history[0].components["ce"], rel=1e-6)
    for a, b in zip(off_history, on_history):
        assert rel(a.loss, b.loss) < 1e-2, (a.loss, b.loss)
    assert off_history[-1].components["forward_kl"] < off_history[0].components["forward_kl"]
    assert rel(off_eval["eval/forward_kl"], on_eval["eval/forward_kl"]) < 1e-2
    assert off_eval["eval/ce"] == pytest.approx(on_eval["eval/ce"], rel=1e-3)


def test_two_teachers_weigh_each_teachers_losses(root, online):
    teachers = [{"kind": "online", "path": str(root / "teacher"), "dtype": "fp32", "weight": 0.25},
                {"kind": "offline", "path": str(root / "capture"), "weight": 0.75,
                 "losses": [{"kind": "forward_kl", "weight": 1.0}, {"kind": "tvd", "weight": 0.5}]}]
    history, evaluation = run(make_config(root, "two", teachers=teachers, overrides=["steps=1"]))
    first, reference = history[0], online[0][0]
    c = first.components
    assert set(c) == {"teacher0/forward_kl", "teacher1/forward_kl", "teacher1/tvd", "ce"}
    assert c["teacher0/forward_kl"] == pytest.approx(reference.components["forward_kl"], rel=1e-6)
    assert rel(c["teacher1/forward_kl"], reference.components["forward_kl"]) < 2e-3
    assert c["ce"] == pytest.approx(reference.components["ce"], rel=1e-6)
    expected = 0.25 * c["teacher0/forward_kl"] + 0.75 * (c["teacher1/forward_kl"] + 0.5 * c["teacher1/tvd"]) \
        + 0.1 * c["ce"]
    assert first.loss == pytest.approx(expected, rel=1e-9)
    assert set(evaluation) == {"eval/teacher0/forward_kl", "eval/teacher1/forward_kl", "eval/ce", "eval/perplexity"}


def test_a_capture_of_other_data_is_refused_at_start(root, tmp_path):
    data = tmp_path / "data"
    prepare(load_manifest(ASSETS / "demo_manifest.yaml"), data, 512, progress=False)
    config = make_config(root, "mismatch", teacher={"kind": "offline", "path": str(root / "capture")},
                         overrides=[f"data.path={data}", "data.seq_len=512"])
    with distributed_context(), pytest.raises(CaptureError, match=r"capture\.json: split 'train' was captured at "
                                                                   r"seq_len 256, data\.seq_len is 512"):
        Trainer(config)
    assert torch.is_grad_enabled()


def test_offline_rows_of_a_context_parallel_chunk_are_its_positions(root):
    """Under context parallelism each rank's micro-batch is its contiguous chunk of the whole one (tokens, labels,
    weights, token counts) and the offline teacher gives exactly the stored rows of those positions."""
    config = make_config(root, "cp_rows", teacher={"kind": "offline", "path": str(root / "capture")})
    cpu = torch.device("cpu")
    dataset = HarmonyPackedDataset(root / "data", "train")
    teacher = OfflineTeacher(config, str(root / "capture"), GPT_OSS_VOCAB_SIZE, cpu)
    whole = read_micro_batch(dataset, [0, 1], config.losses.channels, cpu)
    rows = teacher.targets(whole)
    chunks = [read_micro_batch(dataset, [0, 1], config.losses.channels, cpu, ContextChunk(r, 4)) for r in range(4)]
    assert sum(mb.num_tokens for mb in chunks) == whole.num_tokens
    assert sum(mb.final_tokens for mb in chunks) == whole.final_tokens > 0
    for mb in chunks:
        window = slice(mb.offset, mb.offset + 128)  # 2 rows of 256 in 4 chunks
        assert torch.equal(mb.tokens, whole.tokens[:, window]) and torch.equal(mb.targets, whole.targets[window])
        assert torch.equal(mb.weights, whole.weights[window])
        assert torch.equal(mb.packed.cu_seqlens_q, whole.packed.cu_seqlens_q)  # the documents of the whole stream
        part = teacher.targets(mb)
        for name in ("ids", "logprobs", "log_tail"):
            assert torch.equal(getattr(part, name), getattr(rows, name)[window]), name
    assert [mb.offset for mb in chunks] == [0, 128, 256, 384]
