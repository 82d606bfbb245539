"""Stage B on a gpt-oss-20b-width slice that fits one GPU with its optimizer state: the product's training path
end to end at T = 8192, reported as a table and a loss-curve PNG.

1. a random gpt-oss teacher at 20b width (hidden 2880, 64/8 heads of 64, real 201088 vocabulary; ``--layers``
   layers alternating sliding/full attention, ``--experts`` experts top-4) via ``make-tiny-teacher``;
2. its student via ``init-student`` (SWA(128)+TPA on sliding layers, KDA on full layers);
3. Harmony data: the bundled demo conversations repeated with distinct ids, packed at ``--seq-len``;
4. ``configs/stage_b_full_distill.yaml`` with the paths, lengths and step count overridden (``--set`` adds more):
   bf16 student, Megatron-Core distributed optimizer, forward KL + CE, run as ``megatron-student train`` (one
   process per run, so each run's peak memory is its own);
5. with ``--teachers online offline``: the same stage once with the teacher online (bf16, on the same GPU) and once
   offline, from a ``capture-teacher`` capture of that teacher made first in the same run (every train sample; the
   default compression; ``--capture-args`` adds flags): time per step, tokens/s and peak memory side by side.

Prints first/last losses, the median tokens/s, step time and MFU of the steps after warm-up, peak GPU memory and
skipped steps per run, and writes ``<output>/stage_b_slice.json`` and ``<output>/stage_b_slice.png``. MFU counts
6 × student + 2 × teacher active parameters per token (the trainer's estimate, 0 for an offline teacher;
attention/KDA FLOPs are left out), against ``--peak-tflops``.

    python benchmarks/stage_b_slice.py --output runs/stage_b_slice [--layers 4 --experts 8 --steps 50]
    # offline vs online stage-B step at 20b width on one H200, < 6 min:
    python benchmarks/stage_b_slice.py --output runs/offline_vs_online --teachers online offline --layers 2 \
        --experts 4 --steps 12 --conversations 1200 --peak-tflops 989
    # the same on CPU at a tiny width (a smoke test of the script, minutes):
    python benchmarks/stage_b_slice.py --output /tmp/offline_vs_online --teachers online offline --tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from megatron_student.data.manifest import load_manifest
from megatron_student.data.prepare import prepare
from megatron_student.student.surgery import init_student
from megatron_student.teacher.tiny import make_tiny_teacher
from megatron_student.train.metrics import plot_loss_curves, read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import make_corpus  # noqa: E402  (benchmarks/data.py: the demo set repeated with distinct ids)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WIDTH_20B = dict(hidden=2880, heads=64, kv_heads=8, head_dim=64, intermediate=2880, experts_per_token=4)
# --tiny: the whole script on CPU in minutes (the vocabulary stays the real 201088 one)
TINY = dict(hidden=64, layers=2, experts=4, seq_len=256, conversations=120, steps=3, global_batch=2, warmup_steps=1)


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




def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_student.cli", *args]


def capture_teacher(out: Path, extra: list[str]) -> dict:
    """``capture-teacher`` of the slice's teacher over every train sample → the capture's summary."""
    subprocess.run(cli("capture-teacher", "--teacher", str(out / "teacher"), "--data", str(out / "data" / "packed"),
                       "--output", str(out / "capture"), "--samples-per-shard", "16", *extra), check=True)
    return json.loads((out / "capture" / "capture.json").read_text())["summary"]


def train_run(out: Path, teacher: str, args) -> tuple[dict, list[dict]]:
    """One ``megatron-student train`` run of the slice's stage B with an ``online`` teacher or the ``offline``
    capture → (its summary, its metrics records)."""
    run = out if teacher == "online" else out / teacher  # the online run where evaluate_slice.py --from looks
    teacher_path = out / "teacher" if teacher == "online" else out / "capture"
    overrides = [
        "student.megatron=null", f"student.hf={out / 'student'}", f"teacher.kind={teacher}",
        f"teacher.path={teacher_path}", f"data.path={out / 'data' / 'packed'}", f"data.seq_len={args.seq_len}",
        "data.micro_batch=1", f"data.global_batch={args.global_batch}", f"steps={args.steps}", "parallel.ep=1",
        f"schedule.warmup_steps={min(5, args.steps)}", "optimizer.lr=1.0e-4", f"checkpoint.dir={run / 'checkpoints'}",
        "checkpoint.every=0", "checkpoint.resume=false", f"logging.dir={run / 'logs'}", "logging.every=1",
        f"logging.peak_tflops={args.peak_tflops}", "eval.every=0", *args.set]
    start = time.perf_counter()
    subprocess.run(cli("train", str(CONFIGS / "stage_b_full_distill.yaml"), *overrides), check=True)
    wall = time.perf_counter() - start
    rows = [r for r in read_metrics(run / "logs" / "metrics.jsonl") if "train/loss" in r]
    steady = [r for r in rows if r["step"] > args.warmup_steps] or rows
    losses = [r["train/loss"] for r in rows]
    summary = {
        "teacher": teacher, "steps": len(rows), "loss_first": losses[0], "loss_last": losses[-1],
        "loss_first5": statistics.mean(losses[:5]), "loss_last5": statistics.mean(losses[-5:]),
        "skipped_steps": int(rows[-1]["train/skipped_steps"]),
        "tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in steady),
        "step_seconds": statistics.median(r["train/step_seconds"] for r in steady),
        "mfu": statistics.median(r.get("train/mfu", 0.0) for r in steady),
        "peak_memory_gib": max(r.get("train/peak_memory_gib", 0.0) for r in rows), "wall_seconds": wall,
    }
    return summary, rows


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
    parser.add_argument("--teachers", nargs="+", choices=("online", "offline"), default=["online"],
                        help="one run per teacher kind; offline trains from a capture of the teacher made first")
    parser.add_argument("--capture-args", nargs="*", default=[], help="extra capture-teacher flags")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in TINY.items()))
    args = parser.parse_args()
    if args.tiny:
        vars(args).update(TINY)
        args.set = ["parallel.dispatcher=allgather", *args.set]  # the alltoall dispatcher needs CUDA streams

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
    capture = None
    if "offline" in args.teachers:
        capture = capture_teacher(out, args.capture_args)
        timings["capture"] = time.perf_counter() - start - sum(timings.values())
    runs, curves = {}, {}
    for teacher in args.teachers:
        runs[teacher], curves[f"stage B, {teacher} teacher"] = train_run(out, teacher, args)
        timings[f"train {teacher}"] = time.perf_counter() - start - sum(timings.values())

    plot_loss_curves(curves, out / "stage_b_slice.png")
    summary = {"layers": args.layers, "experts": args.experts, "hidden": args.hidden, "seq_len": args.seq_len,
               "global_batch": args.global_batch, "runs": runs, "capture": capture, "seconds": timings}
    (out / "stage_b_slice.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nstage B slice: {args.layers} layers at hidden {args.hidden}, {args.experts} experts top-4, "
          f"T={args.seq_len}, global batch {args.global_batch}")
    if capture:
        print(f"capture of the teacher: {capture['rows']:,} positions, {capture['bytes_per_token']:.1f} B/token, "
              f"{capture['rows'] / capture['seconds']:,.0f} positions/s")
    print(f"{'':<20}" + "".join(f"{t + ' teacher':>18}" for t in runs))
    print(f"{'loss first→last':<20}" + "".join(f"{r['loss_first']:>9.4f}→{r['loss_last']:<8.4f}" for r in runs.values()))
    for key, fmt in (("step_seconds", "{:.3f}"), ("tokens_per_s", "{:.0f}"), ("peak_memory_gib", "{:.2f}"),
                     ("mfu", "{:.1%}"), ("skipped_steps", "{}"), ("steps", "{}")):
        print(f"{key:<20}" + "".join(f"{fmt.format(r[key]):>18}" for r in runs.values()))
    print("setup/train seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"curves: {out / 'stage_b_slice.png'}")


if __name__ == "__main__":
    main()
