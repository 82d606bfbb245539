"""Stage B on a gpt-oss-20b-width slice that fits one GPU with its optimizer state: the product's training path
end to end at T = 8192, reported as a table and a loss-curve PNG.

1. a random gpt-oss teacher at 20b width (hidden 2880, 64/8 heads of 64, real 201088 vocabulary; ``--layers``
   layers alternating sliding/full attention, ``--experts`` experts top-4) via ``make-tiny-teacher``;
2. its student via ``init-student`` (SWA(128)+TPA on sliding layers, KDA on full layers);
3. Harmony data: the bundled demo conversations repeated with distinct ids, packed at ``--seq-len``;
4. ``configs/stage_b_full_distill.yaml`` with the paths, lengths and step count overridden (``--set`` adds more):
   bf16 student, Megatron-Core distributed optimizer, online teacher (bf16) on the same GPU, forward KL + CE.

Prints first/last losses, the median tokens/s and MFU of the steps after warm-up, peak GPU memory and skipped
steps, and writes ``<output>/stage_b_slice.png``. MFU counts 6 × student + 2 × teacher active parameters per
token (the trainer's estimate; attention/KDA FLOPs are left out), against ``--peak-tflops``.

    python benchmarks/stage_b_slice.py --output runs/stage_b_slice [--layers 4 --experts 8 --steps 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

from megatron_student.data.manifest import load_manifest
from megatron_student.data.prepare import prepare
from megatron_student.student.surgery import init_student
from megatron_student.teacher.tiny import make_tiny_teacher
from megatron_student.train.config import load_config
from megatron_student.train.metrics import plot_loss_curves, read_metrics
from megatron_student.train.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import make_corpus  # noqa: E402  (benchmarks/data.py: the demo set repeated with distinct ids)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WIDTH_20B = dict(hidden=2880, heads=64, kv_heads=8, head_dim=64, intermediate=2880, experts_per_token=4)


def slice_shape(hidden: int) -> dict:
    """The 20b-width shape, or at a smaller smoke-test width one with the head layout kept proportional."""
    if hidden == WIDTH_20B["hidden"]:
        return dict(WIDTH_20B)
    return {**WIDTH_20B, "hidden": hidden, "intermediate": hidden, "heads": 8, "kv_heads": 2, "head_dim": hidden // 8}


def make_data(directory: Path, conversations: int, seq_len: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    make_corpus(directory / "corpus.jsonl", conversations)
    (directory / "manifest.yaml").write_text(yaml.safe_dump({
        "name": "stage-b-slice", "license": "CC0-1.0", "split": {"valid_fraction": 0.02},
        "sources": [{"path": "corpus.jsonl", "license": "CC0-1.0", "conversion": "demo set, repeated"}]}))
    prepare(load_manifest(directory / "manifest.yaml"), directory / "packed", seq_len, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/stage_b_slice"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--global-batch", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=8000)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the throughput medians")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    parser.add_argument("--hidden", type=int, default=WIDTH_20B["hidden"], help="width (smaller for a CPU smoke run)")
    args = parser.parse_args()

    out = args.output
    timings = {}
    start = time.perf_counter()
    make_tiny_teacher(out / "teacher", layers=args.layers, experts=args.experts, dtype="bf16", overwrite=True,
                      **slice_shape(args.hidden))
    timings["teacher"] = time.perf_counter() - start
    init_student(out / "teacher", out / "student", force=True)
    timings["student"] = time.perf_counter() - start - sum(timings.values())
    make_data(out / "data", args.conversations, args.seq_len)
    timings["data"] = time.perf_counter() - start - sum(timings.values())

    logs = out / "logs"
    overrides = [
        "student.megatron=null", f"student.hf={out / 'student'}", f"teacher.path={out / 'teacher'}",
        f"data.path={out / 'data' / 'packed'}", f"data.seq_len={args.seq_len}", "data.micro_batch=1",
        f"data.global_batch={args.global_batch}", f"steps={args.steps}", "parallel.ep=1",
        f"schedule.warmup_steps={min(5, args.steps)}", "optimizer.lr=1.0e-4", f"checkpoint.dir={out / 'checkpoints'}",
        "checkpoint.every=0", "checkpoint.resume=false", f"logging.dir={logs}", "logging.every=1",
        f"logging.peak_tflops={args.peak_tflops}", "eval.every=0", *args.set]
    config = load_config(CONFIGS / "stage_b_full_distill.yaml", overrides)
    history = train(config)
    timings["train"] = time.perf_counter() - start - sum(timings.values())

    rows = read_metrics(logs / "metrics.jsonl")
    plot_loss_curves({"stage B slice": rows}, out / "stage_b_slice.png")
    steady = [r for r in rows if r["step"] > args.warmup_steps]
    tokens_per_s = statistics.median(r["train/tokens_per_s"] for r in steady)
    summary = {
        "layers": args.layers, "experts": args.experts, "hidden": args.hidden, "seq_len": args.seq_len,
        "global_batch": args.global_batch, "steps": len(history),
        "loss_first": history[0].loss, "loss_last": history[-1].loss,
        "loss_first5": statistics.mean(r.loss for r in history[:5]),
        "loss_last5": statistics.mean(r.loss for r in history[-5:]),
        "skipped_steps": sum(r.skipped for r in history), "tokens_per_s": tokens_per_s,
        "step_seconds": statistics.median(r["train/step_seconds"] for r in steady),
        "mfu": statistics.median(r["train/mfu"] for r in steady),
        "peak_memory_gib": max(r.get("train/peak_memory_gib", 0.0) for r in rows),
        "seconds": timings,
    }
    (out / "stage_b_slice.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nstage B slice: {args.layers} layers at hidden {args.hidden}, {args.experts} experts top-4, "
          f"T={args.seq_len}, global batch {args.global_batch}, {len(history)} steps")
    print(f"{'loss first→last':<26}{summary['loss_first']:.4f} → {summary['loss_last']:.4f} "
          f"(mean of 5: {summary['loss_first5']:.4f} → {summary['loss_last5']:.4f})")
    for key, fmt in (("skipped_steps", "{}"), ("tokens_per_s", "{:.0f}"), ("step_seconds", "{:.3f}"),
                     ("mfu", "{:.1%}"), ("peak_memory_gib", "{:.1f}")):
        print(f"{key:<26}{fmt.format(summary[key])}")
    print("setup/train seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"curves: {out / 'stage_b_slice.png'}")


if __name__ == "__main__":
    main()
