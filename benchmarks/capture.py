"""Offline-teacher capture at gpt-oss-20b width on GPU: capture throughput (positions/s per GPU), bytes/token and
the check-capture fidelity table, through the commands a user runs.

    python benchmarks/capture.py --output runs/capture_bench [--gpus 1 --tp 1] [--teacher /path/to/gpt-oss-20b]

Without ``--teacher`` a random teacher at 20b width (hidden 2880, 64/8 heads, 201,088 vocabulary, 4 layers, 8
experts top-4) is made; its distributions are nearly flat, so its fidelity table says little: pass a real
gpt-oss checkpoint for the numbers that matter. Writes ``results.json`` beside the capture.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_b_slice import WIDTH_20B, make_data  # noqa: E402

from megatron_student.teacher.tiny import make_tiny_teacher  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/capture_bench"))
    parser.add_argument("--teacher", type=Path, default=None, help="a real teacher checkpoint (default: random)")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=2048, help="positions check-capture compares")
    parser.add_argument("--capture-args", nargs="*", default=[], help="extra capture-teacher flags (e.g. --top-k 32)")
    args = parser.parse_args()

    out = args.output
    teacher = args.teacher
    if teacher is None:
        teacher = out / "teacher"
        make_tiny_teacher(teacher, layers=4, experts=8, dtype="bf16", overwrite=True, **WIDTH_20B)
    make_data(out / "data", args.conversations, args.seq_len)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"]
    start = time.perf_counter()
    subprocess.run([*launcher, "-m", "megatron_student.cli", "capture-teacher", "--teacher", str(teacher),
                    "--data", str(out / "data" / "packed"), "--output", str(out / "capture"), "--tp", str(args.tp),
                    "--samples-per-shard", "64", *args.capture_args], check=True)
    wall = time.perf_counter() - start
    subprocess.run([sys.executable, "-m", "megatron_student.cli", "check-capture", str(out / "capture"), "--teacher",
                    str(teacher), "--samples", str(args.samples)], check=True)
    summary = json.loads((out / "capture" / "capture.json").read_text())["summary"]
    fidelity = json.loads((out / "capture" / "check" / "fidelity.json").read_text())
    results = {"gpus": args.gpus, "tp": args.tp, "capture_wall_s": wall, "summary": summary,
               "positions_per_s_per_gpu": summary["rows"] / summary["seconds"] / args.gpus, "fidelity": fidelity}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "fidelity"}, indent=1))


if __name__ == "__main__":
    main()
