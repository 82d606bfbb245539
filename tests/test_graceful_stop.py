"""Graceful stop (train/graceful_stop.py) without Slurm: a signal or the time budget stops the trainer after the
current step with a checkpoint; `megatron-student train` exits 75 and the same command resumes. The Slurm side
(scancel, --time with --signal, requeue) is in tests/test_slurm.py."""

import os
import signal
import subprocess
import sys

import pytest

from megatron_student.train.config import ConfigError, dump_config
from megatron_student.train.graceful_stop import RESUMABLE_EXIT_CODE, GracefulStop, TrainingInterrupted
from megatron_student.train.trainer import Trainer, distributed_context

from test_train_loop import make_config, setup  # noqa: F401  (setup: the CPU trainer tests' module fixture)


def test_signal_stops_after_the_step_with_a_checkpoint_and_restores_the_handler(setup):
    config = make_config(setup, "signal_stop", ["steps=4"])
    before = signal.getsignal(signal.SIGUSR1)
    with distributed_context(), GracefulStop(["SIGTERM", "SIGUSR1"]) as stop:
        trainer = Trainer(config)
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives before the first step: that step still runs
        with pytest.raises(TrainingInterrupted, match=r"stopped at step 1/4: received SIGUSR1") as info:
            trainer.fit(stop)
    assert signal.getsignal(signal.SIGUSR1) is before
    ckpt = setup / "signal_stop" / "ckpt"
    assert info.value.step == 1 and info.value.checkpoint == ckpt / "iter_0000001"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert (ckpt / "iter_0000001" / "trainer" / "rank_00000.pt").is_file()


def test_time_budget_exits_resumable_and_the_same_command_continues(setup, tmp_path):
    """The CLI as users run it: exit.duration_minutes spent after the first step → checkpoint, status 75; rerun
    without the budget → resumes at step 1 and finishes."""
    config = make_config(setup, "budget", ["steps=2"])
    path = tmp_path / "budget.yaml"
    path.write_text(dump_config(config))
    cmd = [sys.executable, "-m", "megatron_student.cli", "train", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stop_file = tmp_path / "stopped.txt"  # launch/common.sh names it: the stop is known even if srun says 143
    first = subprocess.run([*cmd, "exit.duration_minutes=1e-6"], env={**env, "MS_STOP_FILE": str(stop_file)},
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == RESUMABLE_EXIT_CODE, first.stdout[-2000:] + first.stderr[-2000:]
    message = "stopped at step 1/2: time budget of 1e-06 min (exit.duration_minutes) spent"
    assert message in first.stdout and message in stop_file.read_text()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "steps 1→2" in second.stdout and "iter_0000001" in second.stdout


@pytest.mark.parametrize("override,message", [
    ("exit.signals=[SIGTERM, SIGNOPE]", "exit.signals[1]: 'SIGNOPE' is not a signal name"),
    ("exit.signals=[KILL]", "exit.signals[0]: SIGKILL cannot be caught"),
    ("exit.duration_minutes=-1", "exit.duration_minutes: must be >= 0"),
])
def test_exit_section_is_validated(setup, override, message):
    with pytest.raises(ConfigError, match=r"<bad_exit>: " + message.replace("[", r"\[").replace("]", r"\]")):
        make_config(setup, "bad_exit", [override])


def test_signal_names_accept_short_forms(setup):
    assert make_config(setup, "short", ["exit.signals=[term, USR2]"]).exit.signals == ["term", "USR2"]
    with GracefulStop(["term", "USR2"]) as stop:
        assert stop.signals == [signal.SIGTERM, signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) == stop._handle
