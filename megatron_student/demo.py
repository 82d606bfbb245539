"""`megatron-student demo`: the whole pipeline end to end on an embedded tiny model.

tiny gpt-oss teacher → bundled Harmony data → teacher converted to Megatron → student by weight surgery →
stage A (attention alignment, MLP/embeddings frozen) → stage B (full distillation) → HF export → reload →
Harmony generation → report (loss/KL curves PNG, router balance, format compliance of the generations).
Runs on CPU in a few minutes; on a GPU the same code takes the fast paths (FlexAttention, fla kernels).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from importlib import resources
from pathlib import Path

DEMO_PROMPTS = ("What is 12 + 30?", "Write a Python function that reverses a string.", "Name a prime number.")
TEACHER_SHAPE = dict(layers=2, hidden=64, heads=8, kv_heads=2, head_dim=16, experts=4, experts_per_token=2,
                     intermediate=64, dtype="fp32", seed=0)
# Stage A: RADLADS/Arcee-style attention alignment; stage B: everything but the embeddings, KL + CE.
STAGE_A = ["stage=demo_a", r"optimizer.freeze=['^embedding\.', '\.mlp\.', 'layernorm', '^output_layer\.']",
           "optimizer.lr=3.0e-3", "losses.hidden.weight=0.6",
           "losses.logits=[{kind: forward_kl, weight: 0.2, temperature: 2.0}, {kind: ce, weight: 0.2}]"]
STAGE_B = ["stage=demo_b", r"optimizer.freeze=['^embedding\.']", "optimizer.lr=1.0e-3", "losses.hidden.weight=0.0"]


def _stage(config_path: Path, overrides: list[str]):
    from .train.config import load_config
    from .train.trainer import train

    config = load_config(config_path, overrides)
    train(config)
    return config


def run_demo(output: Path, steps_a: int = 10, steps_b: int = 10, max_new_tokens: int = 48, force: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from .convert.hf_to_megatron import convert_hf_to_megatron
    from .convert.megatron_to_hf import convert_megatron_to_hf
    from .data.check_format import check_tokens, summarize
    from .data.manifest import load_manifest
    from .data.prepare import prepare
    from .student.generate import generate_reply, harmony_prompt
    from .student.surgery import init_student
    from .teacher import make_tiny_teacher

    output = Path(output)
    if output.exists():
        if not force:
            raise FileExistsError(f"{output}: already exists; pass --force to replace it")
        shutil.rmtree(output)
    output.mkdir(parents=True)
    timings: dict[str, float] = {}

    def step(name: str):
        print(f"\n=== demo: {name} ===", flush=True)
        timings[name] = time.perf_counter()

    def done(name: str):
        timings[name] = time.perf_counter() - timings[name]

    step("teacher")
    teacher = make_tiny_teacher(output / "teacher", **TEACHER_SHAPE)
    done("teacher")
    step("data")
    with resources.as_file(resources.files("megatron_student") / "assets" / "demo_manifest.yaml") as manifest:
        data_stats = prepare(load_manifest(manifest), output / "data", seq_len=256)
    done("data")
    step("convert teacher")
    convert_hf_to_megatron(teacher, output / "teacher_megatron", role="teacher", dtype="fp32")
    done("convert teacher")
    step("init student")
    init_student(teacher, output / "student_init")
    done("init student")
    config_path = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: the demo reads the repository's configs/demo.yaml; run it from a "
                                "source checkout installed with `pip install -e .`")
    common = [f"teacher.path={output / 'teacher_megatron'}", f"data.path={output / 'data'}"]
    step("stage A")
    _stage(config_path, [*STAGE_A, *common, f"steps={steps_a}", f"student.hf={output / 'student_init'}",
                         f"checkpoint.dir={output / 'stage_a'}", f"logging.dir={output / 'logs' / 'stage_a'}"])
    done("stage A")
    step("stage B")
    _stage(config_path, [*STAGE_B, *common, f"steps={steps_b}", "student.hf=null",
                         f"student.megatron={output / 'stage_a'}", f"checkpoint.dir={output / 'stage_b'}",
                         f"logging.dir={output / 'logs' / 'stage_b'}"])
    done("stage B")
    step("export")
    convert_megatron_to_hf(output / "stage_b", output / "student_final")  # the tiny teacher has no tokenizer files
    done("export")

    step("generate")
    model = AutoModelForCausalLM.from_pretrained(output / "student_final", trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    if torch.cuda.is_available():
        model = model.to("cuda", torch.bfloat16)
    replies = [generate_reply(model, harmony_prompt(p), max_new_tokens=max_new_tokens) for p in DEMO_PROMPTS]
    compliance = summarize((p, check_tokens(r.tokens, mode="generation")) for p, r in zip(DEMO_PROMPTS, replies))
    done("generate")

    from .train.metrics import plot_loss_curves, read_metrics

    metrics = {name: read_metrics(output / "logs" / name / "metrics.jsonl") for name in ("stage_a", "stage_b")}
    plot_loss_curves(metrics, output / "loss_curves.png")
    last_b = [r for r in metrics["stage_b"] if "train/loss" in r][-1]
    router = {k: v for k, v in last_b.items() if k.startswith("router/") and "/expert_" not in k}
    report = {
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "data": {k: data_stats["records"][k] for k in ("read", "accepted", "rejected", "truncated")},
        "first_and_last_loss": {name: [rows[0].get("train/loss"), [r for r in rows if "train/loss" in r][-1]["train/loss"]]
                                for name, rows in metrics.items()},
        "router_balance_last_step": router,
        "format_compliance": compliance.to_dict(),
        "generations": [{"prompt": p, "analysis": r.analysis, "final": r.final, "error": r.error}
                        for p, r in zip(DEMO_PROMPTS, replies)],
    }
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# megatron-student demo report", "", "![loss curves](loss_curves.png)", "",
             "| stage | first loss | last loss |", "|---|---|---|"]
    lines += [f"| {n} | {a:.4f} | {b:.4f} |" for n, (a, b) in report["first_and_last_loss"].items()]
    lines += ["", "## Router balance (last stage-B step)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in router.items()]
    lines += ["", "## Format compliance of the generations", "", "```", compliance.table(), "```", "",
              "## Generations (random tiny model: content is noise, the pipeline is the point)", ""]
    for g in report["generations"]:
        lines += [f"- **{g['prompt']}** → final: `{g['final'][:80]}`" + (f" — {g['error'][:120]}" if g["error"] else "")]
    lines += ["", "## Timings (s)", ""] + [f"- {k}: {v}" for k, v in report["timings_s"].items()]
    (output / "report.md").write_text("\n".join(lines) + "\n")
    print(f"\ndemo finished: report {output / 'report.md'}, curves {output / 'loss_curves.png'}, "
          f"student {output / 'student_final'}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", help="directory for every artefact (default runs/demo)")
    parser.add_argument("--steps-a", type=int, default=10, help="stage-A optimiser steps")
    parser.add_argument("--steps-b", type=int, default=10, help="stage-B optimiser steps")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    run_demo(Path(args.output), args.steps_a, args.steps_b, args.max_new_tokens, args.force)
    return 0
