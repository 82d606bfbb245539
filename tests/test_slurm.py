"""The launch scripts on a real Slurm cluster: the one-node cluster of tools/local_slurm_cluster.sh (`.ci/run`
starts it), two CPU ranks per job with gloo (DEVICE=cpu, data parallel 2), the tiny teacher/student and bundled data
of the trainer tests, the demo's stage A/B settings (configs/demo.yaml).

- launch/submit_chain.sh: stage A → stage B → export as an afterok chain; both stages complete, B starts from A's
  checkpoint, the export loads and generates;
- `scancel --signal=TERM` mid-stage: checkpoint, exit 75, the launcher requeues the job, the requeued job resumes
  and its loss trajectory equals the uninterrupted stage A of the chain;
- `--time` with `--signal=USR1@60`: the early warning stops the trainer with a checkpoint before the limit; a new
  submission resumes from it;
- a rank killed with SIGKILL: the job fails within seconds, the last complete checkpoint loads.

Skipped when Slurm is not installed (outside CI); fails when Slurm is installed but no cluster answers.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml

from megatron_student.convert.megatron_to_hf import convert_megatron_to_hf
from megatron_student.demo import STAGE_A, STAGE_B
from megatron_student.evaluate.suite import load_suite
from megatron_student.train.graceful_stop import RESUMABLE_EXIT_CODE
from megatron_student.train.metrics import read_metrics

from test_train_loop import setup  # noqa: F401  (setup: the CPU trainer tests' module fixture)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
STEPS = 4
CPU_JOB = ["--nodes=1", "--gpus-per-node=0", "--ntasks-per-node=2"]  # the stage scripts' headers request GPUs
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}
JOB_WAIT_S = 900


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("sbatch") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Slurm is not installed: .ci/run must start the cluster (tools/local_slurm_cluster.sh up)")
        pytest.skip("Slurm is not installed (as root, tools/local_slurm_cluster.sh up installs and starts a "
                    "one-node cluster)")
    res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0 or not res.stdout.strip():
        pytest.fail(f"Slurm is installed but no cluster answers ({res.stderr.strip()}); start one with "
                    "tools/local_slurm_cluster.sh up")


def job_env(**extra: str) -> dict[str, str]:
    """This environment (sbatch exports it to the job) without Slurm's or the launcher's own variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("CONFIG", "OUTPUT_DIR", "LOG_DIR", "LAUNCHER", "DRY_RUN",
                                                       "GPUS_PER_NODE", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "DEVICE": "cpu", "REPO_DIR": str(REPO), **extra}


def common_overrides(root: Path, steps: int = STEPS) -> list[str]:
    return [f"teacher.path={root / 'teacher'}", f"data.path={root / 'data'}", f"student.hf={root / 'student'}",
            f"steps={steps}", "data.global_batch=2", "eval.every=0"]


def job_info(job: str) -> dict[str, str]:
    for attempt in range(5):  # a busy slurmctld can drop a connection (scontrol then dies of SIGPIPE or times out)
        res = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=60)
        if res.returncode == 0:
            return dict(re.findall(r"(\w+)=(\S*)", res.stdout))
        time.sleep(1)
    raise RuntimeError(f"scontrol show job {job} failed 5 times (status {res.returncode}): {res.stderr.strip()}")


def queued_jobs() -> set[str]:
    return set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=60).stdout.split())


@pytest.fixture(autouse=True)
def cancel_leftover_jobs(cluster):
    """A failing test must not leave its 1000-step job running."""
    before = queued_jobs()
    yield
    leftover = queued_jobs() - before
    if leftover:
        subprocess.run(["scancel", *leftover], timeout=60)


def log_text(pattern: str, directory: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(directory.glob(pattern)))


def wait_for(job: str, log: Path, timeout: float = JOB_WAIT_S) -> dict[str, str]:
    """The job's final record (a job waiting on a failed dependency counts as ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job)
        if info["JobState"] in ENDED or info.get("Reason") == "DependencyNeverSatisfied":
            return info
        time.sleep(1)
    subprocess.run(["scancel", job], timeout=60)
    pytest.fail(f"job {job} still {info['JobState']} after {timeout:.0f}s; log:\n{log_text('*', log)[-4000:]}")


def wait_until(condition, job: str, log: Path, what: str, timeout: float = JOB_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        info = job_info(job)
        if info["JobState"] in ENDED:
            pytest.fail(f"job {job} ended ({info['JobState']}) before {what}; log:\n{log_text('*', log)[-4000:]}")
        time.sleep(0.2)
    subprocess.run(["scancel", job], timeout=60)
    pytest.fail(f"job {job}: no {what} after {timeout:.0f}s")


def train_rows(output_dir: Path) -> list[dict]:
    path = output_dir / "logs" / "metrics.jsonl"
    return [r for r in read_metrics(path) if "train/loss" in r] if path.is_file() else []


def submit_stage_a(out: Path, overrides: list[str], sbatch_args: list[str]) -> str:
    """launch/stage_a.slurm as users submit it, the demo's stage A on two CPU ranks, OUTPUT_DIR ``out`` (Slurm's
    output appended to out/slurm-<job id>.out)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", *CPU_JOB, f"--output={out}/slurm-%j.out", "--open-mode=append", *sbatch_args,
           str(LAUNCH / "stage_a.slurm"), *STAGE_A, *overrides]
    res = subprocess.run(cmd, env=job_env(CONFIG=str(DEMO_CONFIG), OUTPUT_DIR=str(out), LOG_DIR=str(out)), cwd=out,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def chain(cluster, setup, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("chain")
    args = [*(f"a:{o}" for o in STAGE_A), *(f"b:{o}" for o in STAGE_B), *common_overrides(setup)]
    res = subprocess.run([str(LAUNCH / "submit_chain.sh"), *args], capture_output=True, text=True, timeout=120,
                         env=job_env(RUN_DIR=str(run), CONFIG_A=str(DEMO_CONFIG), CONFIG_B=str(DEMO_CONFIG),
                                     SBATCH_ARGS="--nodes=1 --time=30"))
    assert res.returncode == 0, res.stderr
    jobs = dict(line.split() for line in res.stdout.splitlines())
    assert list(jobs) == ["stage_a", "stage_b", "export"], res.stdout
    return run, jobs, {name: wait_for(job, run / "logs") for name, job in jobs.items()}


def test_chain_stage_a_then_b_then_export_loads_and_generates(chain):
    from transformers import AutoModelForCausalLM

    from megatron_student.student.generate import generate_reply, harmony_prompt

    run, jobs, infos = chain
    logs = {name: log_text(f"*-{job}.out", run / "logs") for name, job in jobs.items()}
    for name, info in infos.items():
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{name}:\n{logs[name][-4000:]}"
    assert infos["stage_a"]["EndTime"] <= infos["stage_b"]["StartTime"] <= infos["export"]["StartTime"]
    for stage in ("a", "b"):
        assert f"[demo_{stage}] steps 0→{STEPS}, world 2 (TP 1, CP 1, EP 1, DP 2)" in logs[f"stage_{stage}"]
        assert [r["step"] for r in train_rows(run / f"stage_{stage}")] == list(range(1, STEPS + 1))
    resolved = yaml.safe_load((run / "stage_b" / "checkpoints" / f"iter_{STEPS:07d}" / "config.yaml").read_text())
    assert resolved["student"] == {"hf": None, "megatron": str(run / "stage_a" / "checkpoints"), "dtype": "auto"}
    model = AutoModelForCausalLM.from_pretrained(run / "student_hf", trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    reply = generate_reply(model, harmony_prompt(load_suite("demo").prompts[0]["prompt"]), max_new_tokens=8)
    assert len(reply.tokens) >= 1


def test_scancel_term_mid_stage_requeues_and_resumes_the_same_trajectory(chain, setup, tmp_path):  # noqa: F811
    out = tmp_path / "term"
    job = submit_stage_a(out, common_overrides(setup), ["--requeue"])
    wait_until(lambda: len(train_rows(out)) >= 1, job, out, "first step")
    subprocess.run(["scancel", "--signal=TERM", job], check=True, timeout=60)
    info = wait_for(job, out)
    log = log_text("slurm-*.out", out)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), log[-4000:]
    stopped = re.search(rf"stopped at step (\d+)/{STEPS}: received SIGTERM; checkpoint (\S+);", log)
    assert stopped, log[-4000:]
    step = int(stopped.group(1))
    assert 1 <= step < STEPS and stopped.group(2) == str(out / "checkpoints" / f"iter_{step:07d}")
    assert "received SIGTERM: stopping after the current step with a checkpoint" in log
    assert f"requeueing job {job}" in log and "slurm_script: line" not in log
    assert f"steps {step}→{STEPS}" in log and f"resumed from {out / 'checkpoints' / f'iter_{step:07d}'}" in log
    reference, rows = train_rows(chain[0] / "stage_a"), train_rows(out)
    assert [r["step"] for r in rows] == [r["step"] for r in reference] == list(range(1, STEPS + 1))
    for a, b in zip(reference, rows):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6, abs=1e-7), (a["step"], a, b)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-5), a["step"]


def test_time_limit_early_warning_saves_and_a_new_job_resumes(cluster, setup, tmp_path):  # noqa: F811
    """The job runs with --signal=USR1@60; once it trains, its time limit is lowered so that the warning comes
    within about a minute (Slurm sends it from the limit, so this is the real path, not a manual signal)."""
    out = tmp_path / "timelimit"
    job = submit_stage_a(out, common_overrides(setup, steps=1000), ["--time=30", "--signal=USR1@60", "--no-requeue"])
    wait_until(lambda: len(train_rows(out)) >= 1, job, out, "first step")
    started = datetime.fromisoformat(job_info(job)["StartTime"])
    minutes = math.ceil(((datetime.now() - started).total_seconds() + 65) / 60)
    subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}"], check=True, timeout=60)
    info = wait_for(job, out)
    log = log_text("slurm-*.out", out)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", f"{RESUMABLE_EXIT_CODE}:0"), log[-4000:]
    stopped = re.search(r"stopped at step (\d+)/1000: received SIGUSR1", log)
    assert stopped and "not requeueable" in log, log[-4000:]
    step = int(stopped.group(1))
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(step)

    resumed = submit_stage_a(out, common_overrides(setup, steps=step + 1), [])
    info = wait_for(resumed, out)
    log = log_text(f"slurm-{resumed}.out", out)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert f"steps {step}→{step + 1}" in log and f"resumed from {out / 'checkpoints' / f'iter_{step:07d}'}" in log
    assert [r["step"] for r in train_rows(out)] == list(range(1, step + 2))


def rank_pid(job: str, rank: int) -> int | None:
    """The pid of rank ``rank``'s trainer process of Slurm job ``job`` on this node."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"SLURM_JOB_ID={job}".encode() in environ and f"RANK={rank}".encode() in environ and b"train" in cmdline:
            return int(proc.name)
    return None


def test_rank_killed_fails_the_job_fast_and_the_last_checkpoint_is_intact(cluster, setup, tmp_path):  # noqa: F811
    out = tmp_path / "killed"
    job = submit_stage_a(out, [*common_overrides(setup, steps=1000), "checkpoint.every=1"], ["--no-requeue"])
    tracker = out / "checkpoints" / "latest_checkpointed_iteration.txt"
    wait_until(tracker.is_file, job, out, "first checkpoint")
    pid = rank_pid(job, 1)
    assert pid is not None, f"no rank-1 trainer process of job {job}"
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    info = wait_for(job, out, timeout=120)
    elapsed = time.monotonic() - killed
    log = log_text("slurm-*.out", out)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", log[-4000:]
    assert elapsed < 60, f"the job took {elapsed:.0f}s to fail after a rank died"
    step = int(tracker.read_text())
    last = out / "checkpoints" / f"iter_{step:07d}"
    for name in ("metadata.json", "config.yaml", "trainer/rank_00000.pt", "trainer/rank_00001.pt"):
        assert (last / name).is_file(), name
    convert_megatron_to_hf(out / "checkpoints", tmp_path / "hf")  # every tensor of the latest checkpoint loads
    assert (tmp_path / "hf" / "config.json").is_file()
