"""`megatron-student <command>`: each command lives in its own module with ``add_arguments`` and ``run``.

Modules are imported only for the command that runs, so `--help` and light commands stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .kernels import configure_caches

COMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny-teacher": ("megatron_student.teacher.tiny", "write a random gpt-oss-shaped HF checkpoint"),
    "init-student": ("megatron_student.student.surgery", "initialise an HF student from a gpt-oss teacher"),
    "generate": ("megatron_student.student.generate", "Harmony chat generation with an HF student or teacher"),
    "prepare-data": ("megatron_student.data.prepare", "render, mask, pack and store Harmony training data"),
    "check-format": ("megatron_student.data.check_format", "check Harmony format compliance of token streams"),
    "convert-hf-to-megatron": ("megatron_student.convert.hf_to_megatron",
                               "HF gpt-oss teacher or HF student → Megatron torch_dist checkpoint"),
    "convert-megatron-to-hf": ("megatron_student.convert.megatron_to_hf",
                               "Megatron student checkpoint (any TP/EP) → HF bf16 bundle"),
    "train": ("megatron_student.train.cli", "run a distillation stage"),
    "capture-teacher": ("megatron_student.offline.capture", "store a teacher's compressed top-k distributions"),
    "check-capture": ("megatron_student.offline.check", "measure a capture's fidelity against the dense teacher"),
    "evaluate": ("megatron_student.evaluate.runner",
                 "teacher agreement, router health, Harmony behaviour and probes → report + gates"),
    "handoff": ("megatron_student.handoff", "assemble or verify the bundle for the next (NVFP4) phase"),
    "demo": ("megatron_student.demo", "end-to-end demo on a tiny embedded model (CPU or GPU)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: megatron-student <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    name = argv[0]
    configure_caches()  # before any kernel compiles: Triton/Inductor caches in one reusable place
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"megatron-student {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
