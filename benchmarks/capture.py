"""Offline-teacher capture at gpt-oss-20b width on GPU: capture throughput (positions/s per GPU), bytes/token and
the check-capture fidelity table, through the commands a user runs.

    python benchmarks/capture.py --output runs/capture_bench [--gpus 1 --tp 1] [--teacher /path/to/gpt-oss-20b]

Without ``--teacher`` a random teacher at 20b width (hidden 2880, 64/8 heads, 201,088 vocabulary, 4 layers, 8
experts top-4) is made; its distributions are nearly flat, so its fidelity table says little: pass a real
gpt-oss checkpoint for the numbers that matter. Writes ``results.json`` beside the capture.

    python benchmarks/capture.py --synthetic --output runs/capture_synthetic      # CPU, a few minutes

compares the encodings (check-capture's table and plot) on synthetic language-model-like rows over the 201,088
ids instead: ``zipf`` (every row p ∝ rank^-2 with log-normal noise σ 0.5: mean top-1 p 0.57, entropy 1.7
nats) and ``mixed`` (per row a slope in [1.2, 2.8] and a top-1 boost of up to 6 nats: mean top-1 p 0.81,
entropy 1.0, median 0.66), 64 rows per "sample".

    python benchmarks/capture.py --demo --output runs/capture_demo [--teacher runs/demo/teacher]   # CPU

does the same on a real language model's rows: the demo's teacher (``megatron-student demo``: the tiny gpt-oss with
the real 201,088-id vocabulary, trained on the bundled Harmony conversations; trained here as the demo trains it
unless ``--teacher`` gives one so trained) and the demo's data packed at 256, captured (train and valid splits)
and checked on the held-out split's positions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_b_slice import WIDTH_20B, make_data  # noqa: E402

from megatron_student.teacher.tiny import make_tiny_teacher  # noqa: E402


def synthetic_rows(n: int, family: str, generator: torch.Generator) -> torch.Tensor:
    """[n, 201088] float64 log-probabilities of the family described above, ids randomly permuted per row."""
    vocab = 201088
    rank = torch.arange(1, vocab + 1, dtype=torch.float64)
    if family == "zipf":
        slope = torch.full((n, 1), 2.0, dtype=torch.float64)
    else:
        slope = 1.2 + 1.6 * torch.rand(n, 1, generator=generator, dtype=torch.float64)
    logits = -slope * rank.log() + 0.5 * torch.randn(n, vocab, generator=generator, dtype=torch.float64)
    if family == "mixed":
        logits[:, 0] += 6 * torch.rand(n, generator=generator, dtype=torch.float64) ** 2
    perm = torch.argsort(torch.rand(n, vocab, generator=generator), -1)
    return torch.log_softmax(logits.gather(1, perm), -1)


def synthetic(args) -> None:
    from megatron_student.offline import check
    from megatron_student.offline import format as fmt

    c = fmt.Compression.for_vocab(201088)
    results = {}
    for family in ("zipf", "mixed"):
        log_p = synthetic_rows(args.samples, family, torch.Generator().manual_seed(0))
        samples = [(*check.top_rows(log_p[a:a + 64], c.top_k), np.arange(min(64, args.samples - a)))
                   for a in range(0, args.samples, 64)]
        table = check.fidelity_table(log_p, samples, c, [128, 160, 192, 256], [64, 128])
        print(f"{family}: {args.samples} rows (KL in nats)")
        check.print_table(table)
        args.output.mkdir(parents=True, exist_ok=True)
        check._plot(table, args.output / f"fidelity_{family}.png", args.samples)
        results[family] = table
    (args.output / "synthetic.json").write_text(json.dumps(results, indent=1))


def demo_teacher_and_data(out: Path, teacher: Path | None) -> tuple[Path, Path]:
    """The demo's data (``out/data``) and trained teacher (``teacher``, or ``out/teacher`` trained as the demo does)."""
    from importlib import resources

    from megatron_student.data.manifest import load_manifest
    from megatron_student.data.prepare import prepare
    from megatron_student.demo import TEACHER_SHAPE, TEACHER_TRAINING, train_tiny_teacher

    with resources.as_file(resources.files("megatron_student") / "assets" / "demo_manifest.yaml") as manifest:
        prepare(load_manifest(manifest), out / "data", seq_len=256, progress=False)
    if teacher is None:
        teacher = make_tiny_teacher(out / "teacher", **TEACHER_SHAPE, overwrite=True)
        train_tiny_teacher(teacher, out / "data", **TEACHER_TRAINING)
    return teacher, out / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/capture_bench"))
    parser.add_argument("--teacher", type=Path, default=None, help="a real teacher checkpoint (default: random)")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=2048, help="positions check-capture compares")
    parser.add_argument("--capture-args", nargs="*", default=[],
                        help="extra capture-teacher flags (e.g. --bytes-per-token 160)")
    parser.add_argument("--synthetic", action="store_true", help="the encodings on synthetic rows only (CPU)")
    parser.add_argument("--demo", action="store_true", help="the demo's trained teacher and data (CPU)")
    args = parser.parse_args()
    if args.synthetic:
        args.samples = min(args.samples, 256)
        synthetic(args)
        return

    out = args.output
    teacher = args.teacher
    splits = ["--split", "train"]
    if args.demo:
        teacher, data = demo_teacher_and_data(out, teacher)
        splits = ["--split", "train", "--split", "valid"]
    else:
        if teacher is None:
            teacher = out / "teacher"
            make_tiny_teacher(teacher, layers=4, experts=8, dtype="bf16", overwrite=True, **WIDTH_20B)
        make_data(out / "data", args.conversations, args.seq_len)
        data = out / "data" / "packed"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"]
    start = time.perf_counter()
    subprocess.run([*launcher, "-m", "megatron_student.cli", "capture-teacher", "--teacher", str(teacher),
                    "--data", str(data), "--output", str(out / "capture"), "--tp", str(args.tp),
                    "--samples-per-shard", "64", *splits, *args.capture_args], check=True)
    wall = time.perf_counter() - start
    subprocess.run([sys.executable, "-m", "megatron_student.cli", "check-capture", str(out / "capture"), "--teacher",
                    str(teacher), "--samples", str(args.samples), "--split", splits[-1],
                    "--bytes-per-token", "128", "160", "192", "256", "--top-k", "64", "128"], check=True)
    summary = json.loads((out / "capture" / "capture.json").read_text())["summary"]
    fidelity = json.loads((out / "capture" / "check" / "fidelity.json").read_text())
    results = {"gpus": args.gpus, "tp": args.tp, "capture_wall_s": wall, "summary": summary,
               "positions_per_s_per_gpu": summary["rows"] / summary["seconds"] / args.gpus, "fidelity": fidelity}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "fidelity"}, indent=1))


if __name__ == "__main__":
    main()
