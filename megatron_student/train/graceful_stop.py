"""Graceful stop for cluster jobs: preemption and time-limit signals, and a wall-time budget.

On Slurm a job ends early in three ways: ``scancel``/preemption (SIGTERM, then SIGKILL after ``KillWait``), the
time limit (the same, unless the job asked for an early warning with ``sbatch --signal=USR1@120``), and node
failure. :class:`GracefulStop` turns the first two, and a time budget of its own (``exit.duration_minutes``, like
Megatron-LM's ``--exit-duration-in-mins``), into an orderly stop: the signal handler only records the signal; after
each optimiser step every rank calls :meth:`GracefulStop.requested`, which all-reduces the flags so that all ranks
stop after the same step; the trainer then writes a checkpoint and raises :class:`TrainingInterrupted`, and
``megatron-student train`` exits with :data:`RESUMABLE_EXIT_CODE`. ``launch/common.sh`` requeues a requeueable
Slurm job on that status; the requeued (or resubmitted) job resumes from the checkpoint.

The first rank to exit with 75 makes ``srun --kill-on-bad-exit`` terminate the others (already past the checkpoint)
and srun's status is then theirs (143), so the launcher also names a file in ``MS_STOP_FILE``: rank 0 writes the
stop message there once the checkpoint is complete, and the launcher reads the stop from it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

# sysexits.h EX_TEMPFAIL ("temporary failure; the user is invited to retry"): stopped with a checkpoint, resumable.
RESUMABLE_EXIT_CODE = 75
STOP_FILE_ENV = "MS_STOP_FILE"


class TrainingInterrupted(RuntimeError):
    """A stop was requested (a signal or the time budget); a checkpoint was written; resuming continues the run."""

    def __init__(self, message: str, step: int, checkpoint: Path):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


def signal_number(name: str) -> signal.Signals:
    """``SIGTERM``/``TERM``/``sigusr1`` → the signal; ValueError for unknown names and uncatchable signals."""
    key = name.upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    try:
        number = signal.Signals[key]
    except KeyError:
        raise ValueError(f"{name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)") from None
    if number in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"{number.name} cannot be caught")
    return number


class GracefulStop:
    """Context manager: installs the handlers for ``signals`` on entry (restoring the previous ones on exit) and
    starts the ``duration_minutes`` clock (0: no budget). Use it in the main thread, before the slow start-up, so
    that an early signal is not lost."""

    def __init__(self, signals: list[str], duration_minutes: float = 0.0):
        self.signals = [signal_number(name) for name in signals]
        self.budget_s = duration_minutes * 60.0
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._start = time.monotonic()
        # One line per node when a signal arrives (every rank of a node receives it).
        self._announce = os.environ.get("LOCAL_RANK", "0") == "0"

    def __enter__(self) -> "GracefulStop":
        self._start = time.monotonic()
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._handle)
        if os.environ.get("RANK", "0") == "0":
            triggers = [n.name for n in self.signals] + ([f"{self.budget_s / 60:g} min"] if self.budget_s else [])
            print(f"graceful stop on {', '.join(triggers)}: finish the step, checkpoint, exit {RESUMABLE_EXIT_CODE}"
                  if triggers else "graceful stop: off (no exit.signals, no exit.duration_minutes)", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        rank = os.environ.get("RANK", "0")
        if self.received is None:
            self.received = signal.Signals(signum)
            message = f"[rank {rank}] received {name}: stopping after the current step with a checkpoint\n"
        else:
            message = f"[rank {rank}] received {name} while stopping for {self.received.name}; ignored\n"
        if self._announce:
            os.write(2, message.encode())  # not print(): a handler may interrupt a print on the same stream

    def requested(self, device) -> str | None:
        """Collective over the default process group; every rank calls it once per step at the same point. Returns
        why to stop (a signal any rank received, or the time budget spent on any rank), or None."""
        import torch
        import torch.distributed as dist

        elapsed = time.monotonic() - self._start
        flags = torch.tensor([float(self.received or 0), float(0 < self.budget_s <= elapsed)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            return f"received {signal.Signals(int(flags[0])).name}"
        if flags[1]:
            return f"time budget of {self.budget_s / 60:g} min (exit.duration_minutes) spent"
        return None

    def interrupt(self, reason: str, trainer) -> TrainingInterrupted:
        """Collective: write ``trainer``'s checkpoint (a train.trainer.Trainer) and return the exception to raise;
        rank 0 logs the stop."""
        path = trainer.save_checkpoint()
        cfg = trainer.config
        message = (f"[{cfg.stage}] stopped at step {trainer.step}/{cfg.steps}: {reason}; checkpoint {path}; exit "
                   f"status {RESUMABLE_EXIT_CODE} (resumable: requeue or resubmit the job to continue)")
        trainer.sink.console(message)
        stop_file = os.environ.get(STOP_FILE_ENV)
        if stop_file and trainer.rank == 0:
            Path(stop_file).write_text(message + "\n")
        return TrainingInterrupted(message, trainer.step, path)
