"""The trainer killed with SIGKILL leaves no process behind, resumes with metrics.jsonl and TensorBoard cut back to
the checkpoint, loads nothing from a checkpoint that could run code, names every damaged checkpoint file, and
checks its data before it builds any model."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train_loop import make_config, setup  # noqa: F401 - the module fixture

from megatron_student.checkpoint import TRACKER_NAME, CheckpointFileError
from megatron_student.train.config import dump_config
from megatron_student.train.trainer import Trainer, distributed_context

REPO = Path(__file__).resolve().parents[1]


def session_processes(sid: int) -> list[int]:
    """Processes of session ``sid`` (the killed trainer started it, its children inherit it)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after ") ": state, ppid, pgrp, session
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def killed_run(setup):  # noqa: F811
    """A CLI training run killed with SIGKILL after its second checkpoint, with steps logged past it."""
    config = make_config(setup, "killed", ["steps=500", "checkpoint.every=2", "logging.every=1"])
    path = setup / "killed.yaml"
    path.write_text(dump_config(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "megatron_student.cli", "train", str(path)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    tracker, metrics = setup / "killed" / "ckpt" / TRACKER_NAME, setup / "killed" / "logs" / "metrics.jsonl"
    deadline = time.time() + 900
    while time.time() < deadline and process.poll() is None:
        if tracker.is_file() and int(tracker.read_text()) >= 4 and metrics.is_file() \
                and len(metrics.read_text().splitlines()) >= int(tracker.read_text()) + 1:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(3)  # what would be orphaned is reparented by now
    left = session_processes(process.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return setup, int(tracker.read_text()), left


def test_sigkill_leaves_no_process_behind(killed_run):
    _, _, left = killed_run
    assert left == [], f"processes of the killed trainer still running: {left}"


def test_resume_cuts_metrics_back_to_the_checkpoint(killed_run):
    root, checkpoint_step, _ = killed_run
    logs = root / "killed" / "logs"
    logged = [json.loads(line)["step"] for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) > checkpoint_step  # the interrupted run logged past its checkpoint
    config = make_config(root, "killed", [f"steps={checkpoint_step + 2}", "checkpoint.every=2", "logging.every=1"])
    with distributed_context():
        trainer = Trainer(config)
        assert trainer.step == checkpoint_step
        trainer.fit()
    steps = [json.loads(line)["step"] for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, checkpoint_step + 3)), steps

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, checkpoint_step + 3))


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def copied_run(root: Path, name: str, step: int) -> Path:
    """A copy of the killed run's checkpoints resuming from ``step`` (the resume test may have saved later ones)."""
    shutil.copytree(root / "killed" / "ckpt", root / name / "ckpt")
    (root / name / "ckpt" / TRACKER_NAME).write_text(f"{step}\n")
    return root / name / "ckpt"


def test_trainer_state_with_code_is_refused(killed_run):
    root, step, _ = killed_run
    ckpt, marker = copied_run(root, "crafted", step), root / "crafted" / "marker"
    rank_file = ckpt / f"iter_{step:07d}" / "trainer" / "rank_00000.pt"
    state = torch.load(rank_file, weights_only=True)  # what the trainer writes loads safely
    torch.save({**state, "extra": Payload(marker)}, rank_file)
    with distributed_context(), pytest.raises(CheckpointFileError, match=f"{rank_file}: refused"):
        Trainer(make_config(root, "crafted", [f"steps={step + 1}"]))
    assert not marker.exists()


def test_damaged_checkpoint_files_are_named_on_resume(killed_run):
    root, step, _ = killed_run
    ckpt = copied_run(root, "damaged", step)
    config = make_config(root, "damaged", [f"steps={step + 1}"])
    shard = sorted((ckpt / f"iter_{step:07d}").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with distributed_context(), pytest.raises(CheckpointFileError, match=f"{shard}: truncated \\(100 bytes"):
        Trainer(config)
    (ckpt / TRACKER_NAME).write_text("")
    with distributed_context(), pytest.raises(CheckpointFileError, match=f"{ckpt / TRACKER_NAME}: holds ''.*iter_"):
        Trainer(config)


def test_data_is_checked_before_any_model_is_built(setup, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(setup / "data", data)
    index = json.loads((data / "train" / "index.json").read_text())
    (data / "train" / "index.json").write_text(json.dumps({**index, "shards": []}))
    config = make_config(setup, "nodata", ["teacher.path=/nonexistent/teacher"], data=data)
    with distributed_context(), pytest.raises(ValueError, match="0 samples cannot feed"):
        Trainer(config)  # the missing teacher would be the error if the models came first
    shutil.rmtree(data / "train")
    (data / "stats.json").write_text(json.dumps({"failed": {"kind": "reject_fraction", "reason": "9 of 10 rejected"}}))
    with distributed_context(), pytest.raises(FileNotFoundError, match="prepare-data failed: 9 of 10 rejected"):
        Trainer(config)
