"""The trainer with context parallelism, through ``megatron-student train`` under torchrun (gloo, CPU): at CP = 2
each rank trains on its contiguous half of every packed micro-batch (documents crossing the boundary), with the
online teacher under the same split, and the run follows the CP = 1 trajectory (losses, components, gradient
norms, token counts, held-out evaluation); a CP = 2 checkpoint resumes at CP = 1 and continues that trajectory."""

import json

import pytest

from megatron_student.checkpoint import read_record
from megatron_student.data.manifest import load_manifest
from megatron_student.data.prepare import prepare
from megatron_student.student.surgery import init_student
from megatron_student.teacher.tiny import make_tiny_teacher
from test_train_parallel import ASSETS, run_stage

KEYS = ("train/loss", "train/forward_kl", "train/ce", "train/hidden", "train/grad_norm")


def _close(a: dict, b: dict, where: str) -> None:
    for key in KEYS:
        assert abs(a[key] - b[key]) <= 1e-4 * abs(a[key]) + 1e-6, (where, a["step"], key, a[key], b[key])


def _eval_row(run) -> dict:
    """The evaluation at step 2 of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return next({k: v for k, v in r.items() if k.startswith("eval/")} for r in rows
                if r["step"] == 2 and "eval/ce" in r)


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    make_tiny_teacher(root / "teacher", layers=2, dtype="fp32", seed=3)
    init_student(root / "teacher", root / "student")
    prepare(load_manifest(ASSETS / "demo_manifest.yaml"), root / "data", 256, progress=False)
    return root


def test_context_parallel_training_follows_one_process_and_resumes_at_another_cp(stage):
    evaluate = ("eval.every=2", "eval.batches=1")
    single = run_stage(stage, "cp1", 1, overrides=evaluate)
    split = run_stage(stage, "cp2", 1, cp=2, steps=2, overrides=evaluate)
    assert [r["step"] for r in single] == [1, 2, 3] and [r["step"] for r in split] == [1, 2]
    for a, b in zip(single, split):
        _close(a, b, "cp2")
        assert a["train/tokens_seen"] == b["train/tokens_seen"]  # token counts summed over the CP chunks
    held_out = [_eval_row(stage / name) for name in ("cp1", "cp2")]
    assert held_out[0].keys() == held_out[1].keys() >= {"eval/forward_kl", "eval/ce"}
    for key, value in held_out[0].items():
        assert abs(held_out[1][key] - value) <= 1e-4 * abs(value) + 1e-6, key

    checkpoint = stage / "cp2" / "ckpt" / "iter_0000002"
    assert json.loads((checkpoint / "trainer" / "layout.json").read_text())["cp"] == 2
    assert read_record(checkpoint).layout.written_cp == 2
    # CP shards no weight: the CP = 2 checkpoint resumes on one process and continues the CP = 1 trajectory
    resumed = run_stage(stage, "resume_cp1", 1, steps=3, overrides=(f"checkpoint.dir={stage / 'cp2' / 'ckpt'}",))
    assert [r["step"] for r in resumed] == [3]
    _close(single[2], resumed[0], "resumed at CP 1")
