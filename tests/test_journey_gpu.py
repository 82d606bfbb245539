"""The user journey on a GPU, command by command as the README gives it, each a subprocess:

make-tiny-teacher → prepare-data → init-student → convert-hf-to-megatron (teacher, student) → train stage A →
train stage B → convert-megatron-to-hf → generate → check-format, bf16 on the GPU, with an empty kernel cache.

Prints every command's wall time and the first training step's time (kernel compilation) for both stages:
stage A compiles from an empty cache, stage B reuses it. Set ``JOURNEY_OUTPUT`` to keep the run directory.
Skipped without CUDA (tests/conftest.py)."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
DISPATCHER = "alltoall" if torch.cuda.is_available() else "allgather"  # (alltoall needs CUDA; CPU smoke runs)
REPO = Path(__file__).resolve().parents[1]
# The tiny model of the report that found the 266 s first step: 4 layers, 8 experts, real vocabulary, T = 2048.
TEACHER = ["--layers", "4", "--hidden", "384", "--heads", "6", "--kv-heads", "2", "--head-dim", "64", "--experts", "8",
           "--experts-per-token", "4", "--intermediate", "384", "--dtype", "bf16"]


def command() -> list[str]:
    installed = shutil.which("megatron-student")
    return [installed] if installed else [sys.executable, "-m", "megatron_student.cli"]


def run(args, env, timings, name):
    start = time.perf_counter()
    result = subprocess.run([*command(), *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=1800)
    timings[name] = time.perf_counter() - start
    print(f"--- {name}: {timings[name]:.1f} s\n{result.stdout[-4000:]}", flush=True)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout


def first_step_seconds(log: str) -> float:
    match = re.search(r"step 1 took ([0-9.]+) s", log)
    assert match, "the trainer did not report its first step"
    return float(match.group(1))


def test_cli_journey_on_gpu():
    root = Path(os.environ.get("JOURNEY_OUTPUT") or tempfile.mkdtemp(prefix="journey-"))
    env = {**os.environ, "MEGATRON_STUDENT_CACHE": str(root / "cache"), "PYTHONUNBUFFERED": "1"}
    for name in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):  # the project's cache layout, empty at first
        env.pop(name, None)
    t: dict[str, float] = {}
    run(["make-tiny-teacher", "--output", root / "teacher", *TEACHER], env, t, "make-tiny-teacher")
    run(["prepare-data", "--manifest", "megatron_student/assets/demo_manifest.yaml", "--output", root / "data",
         "--seq-len", 2048, "--no-progress"], env, t, "prepare-data")
    run(["init-student", "--teacher", root / "teacher", "--output", root / "student_init", "--quiet"], env, t, "init-student")
    run(["convert-hf-to-megatron", "--hf", root / "teacher", "--output", root / "teacher_megatron", "--role", "teacher"],
        env, t, "convert teacher")
    run(["convert-hf-to-megatron", "--hf", root / "student_init", "--output", root / "student_megatron",
         "--role", "student"], env, t, "convert student")
    common = [f"teacher.path={root / 'teacher_megatron'}", f"data.path={root / 'data'}", "data.seq_len=2048",
              "data.global_batch=2", "parallel.ep=1", f"parallel.dispatcher={DISPATCHER}", "steps=4",
              "schedule.warmup_steps=1", "logging.every=1", "eval.every=0"]
    log_a = run(["train", "configs/stage_a_attn_only.yaml", *common, "student.hf=null",
                 f"student.megatron={root / 'student_megatron'}", f"checkpoint.dir={root / 'stage_a'}",
                 f"logging.dir={root / 'logs_a'}"], env, t, "train stage A")
    log_b = run(["train", "configs/stage_b_full_distill.yaml", *common, f"student.megatron={root / 'stage_a'}",
                 f"checkpoint.dir={root / 'stage_b'}", f"logging.dir={root / 'logs_b'}"], env, t, "train stage B")
    run(["convert-megatron-to-hf", "--megatron", root / "stage_b", "--output", root / "student_final"], env, t, "export")
    reply = run(["generate", "--model", root / "student_final", "--prompt", "What is 12 + 30?", "--max-new-tokens", 32],
                env, t, "generate")
    assert re.search(r"\((\d+) tokens generated\)", reply)
    run(["check-format", root / "data", "--split", "valid", "--report", root / "format.json"], env, t, "check-format")

    rows = [json.loads(line) for line in (root / "logs_b" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    summary = {"first_step_s": {"stage A (empty cache)": first_step_seconds(log_a),
                                "stage B (cache from A)": first_step_seconds(log_b)},
               "command_s": {k: round(v, 1) for k, v in t.items()},
               "autotune": os.environ.get("MEGATRON_STUDENT_AUTOTUNE", "fixed")}
    print("JOURNEY " + json.dumps(summary), flush=True)
