"""`evaluate` on the gpt-oss-20b-width slice of ``stage_b_slice.py``: student and teacher through the full default
suite (held-out agreement, router health, Harmony generations, probes with needles up to 32k tokens) on one GPU,
with the run time of each part.

With ``--from DIR`` it evaluates a finished ``stage_b_slice.py --output DIR`` run (its stage-B Megatron checkpoint in checkpoints/,
converted on the fly, against its teacher and held-out split); without it, it builds the same slice (random 20b-width
teacher, its student by surgery, the packed demo corpus) and evaluates the freshly initialised student.

    python benchmarks/evaluate_slice.py --output runs/evaluate_slice [--from runs/stage_b_slice] \\
        [--needle-lengths 1024 4096 8192 16384 32768] [--needle-samples 2] [--max-new-tokens 128]

The stage-B slice's teacher is random, so neither model stops early: every generation runs to its token cap, and
``--max-new-tokens`` (prompts and probes alike) sets the run time. ``--hidden 64 --layers 2`` with short needles
is a CPU smoke run of the same code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from megatron_student.evaluate.runner import evaluate
from megatron_student.evaluate.suite import load_suite
from megatron_student.student.surgery import init_student
from megatron_student.teacher.tiny import make_tiny_teacher

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_b_slice import WIDTH_20B, make_data, slice_shape  # noqa: E402  (the same slice and corpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/evaluate_slice"))
    parser.add_argument("--from", dest="source", type=Path, help="a stage_b_slice.py output directory")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=8192, help="packed length of the held-out split")
    parser.add_argument("--needle-lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
    parser.add_argument("--needle-samples", type=int, default=2, help="needles per kind and context length")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="token cap of every generation and probe")
    parser.add_argument("--max-documents", type=int, default=32, help="held-out conversations scored")
    parser.add_argument("--conversations", type=int, default=2000, help="corpus size (without --from)")
    parser.add_argument("--hidden", type=int, default=WIDTH_20B["hidden"], help="width (smaller for a CPU smoke run)")
    args = parser.parse_args()

    start = time.perf_counter()
    if args.source:
        teacher, data = args.source / "teacher", args.source / "data" / "packed"
        student = args.source / "checkpoints"
    else:
        teacher, data, student = args.output / "teacher", args.output / "data" / "packed", args.output / "student"
        make_tiny_teacher(teacher, layers=args.layers, experts=args.experts, dtype="bf16", overwrite=True,
                          **slice_shape(args.hidden))
        init_student(teacher, student, force=True)
        make_data(args.output / "data", args.conversations, args.seq_len)
    setup = time.perf_counter() - start
    suite = load_suite("default")
    needle = {**suite.probes["needle"], "lengths": args.needle_lengths, "samples": args.needle_samples}
    suite = replace(suite, probes={**suite.probes, "needle": needle}, max_documents=args.max_documents,
                    max_new_tokens=args.max_new_tokens, probe_max_new_tokens=args.max_new_tokens)
    start = time.perf_counter()
    report = evaluate(student, args.output / "report", teacher=teacher, data=data, suite=suite)
    total = time.perf_counter() - start
    s, t = report["student"], report["teacher"]
    summary = {
        "setup_s": round(setup, 1), "evaluate_s": round(total, 1), "parts_s": report["timings_s"],
        "kl": {c: row.get("kl") for c, row in s["agreement"].items()},
        "compliance": {"student": s["generation"]["compliance_rate"], "teacher": t["generation"]["compliance_rate"]},
        "probe_accuracy": {"student": s["probes"]["accuracy"], "teacher": t["probes"]["accuracy"]},
        "needle": {"student": s["probes"]["needle"], "teacher": t["probes"]["needle"]},
        "router_collapsing": s["router"]["collapsing_layers"], "gates_passed": report["passed"],
    }
    print(json.dumps(summary, indent=1))
    print(f"evaluate on the 20b-width slice: {total:.1f}s (report {args.output / 'report' / 'report.md'})")


if __name__ == "__main__":
    main()
