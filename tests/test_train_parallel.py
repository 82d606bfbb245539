"""The trainer under torchrun with TP=2, DP=2 or EP=2 with grouped-GEMM experts (gloo, CPU) follows the same loss
trajectory as one process with per-expert experts (the logged losses are the whole step's: DP ranks' shares are
reduced)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from megatron_student.data.manifest import load_manifest
from megatron_student.data.prepare import prepare
from megatron_student.student.surgery import init_student
from megatron_student.teacher.tiny import make_tiny_teacher

ASSETS = Path(__file__).resolve().parents[1] / "megatron_student" / "assets"


def run_stage(root: Path, name: str, tp: int, world: int | None = None, ep: int = 1, cp: int = 1, steps: int = 3,
              experts: str = "sequential", overrides: tuple[str, ...] = ()) -> list[dict]:
    world = world or tp * cp
    config = {
        "stage": name, "steps": steps, "seed": 11,
        "student": {"hf": str(root / "student")}, "teacher": {"path": str(root / "teacher"), "dtype": "fp32"},
        "data": {"path": str(root / "data"), "seq_len": 256, "micro_batch": 1, "global_batch": 2, "shuffle": False},
        "parallel": {"tp": tp, "ep": ep, "cp": cp, "experts": experts},
        "optimizer": {"lr": 1e-3, "freeze": ["^embedding\\."]},
        "schedule": {"warmup_steps": 0, "decay": "constant"},
        "losses": {"logits": [{"kind": "forward_kl", "weight": 1.0}, {"kind": "ce", "weight": 0.1}],
                   "hidden": {"weight": 0.5, "kind": "cosine", "layer_map": "all"}},
        "checkpoint": {"dir": str(root / name / "ckpt")}, "logging": {"dir": str(root / name / "logs"), "every": 1},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, "-m", "megatron_student.cli", "train", str(path), *overrides], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"world {world} (TP {tp}, CP {cp}," in result.stdout  # the layout really ran
    rows = [json.loads(line) for line in (root / name / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


def test_tensor_and_data_parallel_training_match_single_process(tmp_path):
    make_tiny_teacher(tmp_path / "teacher", layers=2, dtype="fp32", seed=3)
    init_student(tmp_path / "teacher", tmp_path / "student")
    prepare(load_manifest(ASSETS / "demo_manifest.yaml"), tmp_path / "data", 256, progress=False)
    # two steps: the second one's losses and gradient norm follow from the first update
    single = run_stage(tmp_path, "tp1", 1, steps=2)
    for name, tp, ep, experts in (("tp2", 2, 1, "sequential"), ("dp2", 1, 1, "sequential"),
                                  ("ep2_grouped", 1, 2, "grouped")):
        parallel = run_stage(tmp_path, name, tp, world=2, ep=ep, experts=experts, steps=2)
        assert [r["step"] for r in single] == [r["step"] for r in parallel] == [1, 2]
        for a, b in zip(single, parallel):
            for key in ("train/loss", "train/forward_kl", "train/ce", "train/hidden", "train/grad_norm"):
                assert abs(a[key] - b[key]) <= 1e-4 * abs(a[key]) + 1e-6, (name, a["step"], key, a[key], b[key])
