"""`megatron-student handoff`: the bundle the next (NVFP4) phase receives, and its readiness check.

``handoff --student DIR --teacher DIR --runs RUN_DIR... [--evaluation DIR] --output DIR`` writes::

    student/          the BF16 HF student as exported (config with the per-layer attention plan, safetensors, code
                      shims, generation_config.json with the Harmony stop tokens) plus the teacher's tokenizer
                      files and chat template when the teacher has them
    runs/<stage>/     per run: config.yaml (the resolved config the stage ran with) and metrics.jsonl
    data/<name>/      per prepared dataset the runs used: manifest.yaml, stats.json, prepare_command.txt
    evaluation/       an `evaluate` output (report.md/json, plots) and the suite it ran
    notes.md          per stage: frozen parameters, loss weights, tokens, NaN-skipped steps, router alarms, eval
    teacher_reference.json   what the student must share with its teacher (tokenizer file hashes, special tokens,
                      chat template, context length) and the canary generation
    readiness.json    the readiness check's results
    manifest.json     SHA-256 and size of every other file

The readiness check (the seed's gate): the student reloads twice with bit-identical logits; its tokenizer files,
special tokens, chat template and context length equal the teacher's; a canary Harmony generation is well-formed;
``--verify`` also checks every file against the manifest and the canary tokens against the recorded ones (same
device type). A bundle that fails is not written; the error names each failed check. ``handoff --verify DIR`` runs
the check on a received bundle and exits 0 only when everything matches.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from .checkpoint import TRACKER_NAME, resolve_megatron_dir
from .convert.megatron_to_hf import TOKENIZER_FILES
from .files import sha256_file

CANARY_PROMPT = "What is 2 + 3?"
# A budget that holds a low-effort analysis and the final: at 64 tokens the demo's tiny student, whose analysis
# rambles, was cut inside its final message and the check failed on length rather than on format.
CANARY_MAX_NEW_TOKENS = 192
MANIFEST = "manifest.json"
REFERENCE = "teacher_reference.json"
READINESS = "readiness.json"
# Config keys that fix the tokenizer's special ids and the context the student inherits from its teacher.
SPECIAL_TOKEN_KEYS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
# (gpt-oss's legacy initial_context_length is the YaRN original_max_position_embeddings, compared inside "rope".)
CONTEXT_KEYS = ("max_position_embeddings", "sliding_window")


class HandoffError(RuntimeError):
    """The bundle fails its readiness check (or cannot be assembled); the message names why."""


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _rope(config: dict):
    """gpt-oss's released configs spell RoPE as rope_scaling + rope_theta; HF v5 configs as rope_parameters."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta"))
    return params


def model_reference(directory: Path) -> dict:
    """What a student must share with its teacher, read from an HF directory (either of them)."""
    config = _json(directory / "config.json")
    tokenizer_config = _json(directory / "tokenizer_config.json")
    template = directory / "chat_template.jinja"
    return {
        "tokenizer_files": {f: sha256_file(directory / f) for f in TOKENIZER_FILES if (directory / f).is_file()},
        "special_tokens": {k: config.get(k) for k in SPECIAL_TOKEN_KEYS},
        "chat_template": sha256_file(template) if template.is_file() else tokenizer_config.get("chat_template"),
        "context": {**{k: config.get(k) for k in CONTEXT_KEYS}, "rope": _rope(config)},
    }


def teacher_reference(teacher: Path) -> dict:
    if not (teacher / "config.json").is_file():
        raise HandoffError(f"{teacher}: no config.json (the teacher's HF directory is needed for the reference)")
    return {"teacher": str(teacher), **model_reference(teacher)}


def _compare(name: str, student, teacher) -> Check:
    if student == teacher:
        return Check(name, True, "identical to the teacher's")
    if isinstance(student, dict) and isinstance(teacher, dict):
        keys = sorted(k for k in set(student) | set(teacher) if student.get(k) != teacher.get(k))
        detail = "; ".join(f"{k}: student {student.get(k)!r}, teacher {teacher.get(k)!r}" for k in keys)
    else:
        detail = f"student {student!r}, teacher {teacher!r}"
    return Check(name, False, f"differs from the teacher's: {detail}")


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_student(student: Path):
    import torch

    from .student.modeling import StudentForCausalLM

    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return StudentForCausalLM.from_pretrained(student, dtype=dtype).to(device).eval()


def readiness_checks(student: Path, reference: dict) -> tuple[list[Check], dict]:
    """The checks on an HF student directory against a teacher reference; also returns the canary record."""
    import torch

    from .data.check_format import check_tokens
    from .student.generate import generate_reply, harmony_prompt
    from .student.modeling import HARMONY_STOP_TOKEN_IDS

    checks: list[Check] = []
    mine = model_reference(student)
    checks.append(_compare("tokenizer files", mine["tokenizer_files"], reference["tokenizer_files"]))
    checks.append(_compare("special tokens", mine["special_tokens"], reference["special_tokens"]))
    generation = _json(student / "generation_config.json")
    stops = generation.get("eos_token_id") or []
    missing = [t for t in HARMONY_STOP_TOKEN_IDS if t not in (stops if isinstance(stops, list) else [stops])]
    checks.append(Check("generation stop tokens", not missing,
                        f"eos_token_id {stops}" + (f" lacks Harmony stops {missing}" if missing else " has the Harmony stops")))
    checks.append(_compare("chat template", mine["chat_template"], reference["chat_template"]))
    checks.append(_compare("context length", mine["context"], reference["context"]))
    prompt = harmony_prompt(CANARY_PROMPT, reasoning_effort="low")
    ids = torch.tensor([prompt], device=_device())
    with torch.no_grad():
        first = _load_student(student)(input_ids=ids).logits
        second_model = _load_student(student)
        second = second_model(input_ids=ids).logits
    identical = torch.equal(first, second)
    checks.append(Check("reload determinism", identical, "two loads give bit-identical logits" if identical else
                        f"two loads differ by up to {float((first - second).abs().max()):.3g} in the logits"))
    reply = generate_reply(second_model, prompt, max_new_tokens=CANARY_MAX_NEW_TOKENS)
    issues = check_tokens(reply.tokens, mode="generation")
    checks.append(Check("canary generation", not issues,
                        f"{CANARY_PROMPT!r} → final {reply.final[:80]!r}" if not issues else
                        f"{CANARY_PROMPT!r} → " + "; ".join(f"{i.kind}: {i.detail}" for i in issues[:3])))
    canary = {"prompt": CANARY_PROMPT, "device": _device().type, "tokens": reply.tokens, "final": reply.final}
    return checks, canary


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path) -> dict:
    manifest = {"files": {str(p.relative_to(root)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                          for p in _files(root)}}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def manifest_checks(root: Path) -> list[Check]:
    path = root / MANIFEST
    if not path.is_file():
        return [Check("manifest", False, f"{path}: missing")]
    recorded = json.loads(path.read_text())["files"]
    present = {str(p.relative_to(root)): p for p in _files(root)}
    problems = [f"{name}: missing" for name in sorted(set(recorded) - set(present))]
    problems += [f"{name}: not in the manifest" for name in sorted(set(present) - set(recorded))]
    problems += [f"{name}: SHA-256 differs from the manifest" for name in sorted(set(recorded) & set(present))
                 if sha256_file(present[name]) != recorded[name]["sha256"]]
    return [Check("manifest", not problems, "; ".join(problems) if problems else f"{len(recorded)} files match")]


# --------------------------------------------------------------------------------------------------------------
# Assembling


def _run_record(run: Path) -> tuple[str, dict, Path]:
    """(stage name, resolved config, checkpoint dir) of a training run directory (its ``checkpoint.dir``)."""
    if not (run / TRACKER_NAME).is_file():
        raise HandoffError(f"{run}: not a training run directory (no {TRACKER_NAME}; pass the stage's checkpoint.dir)")
    checkpoint = resolve_megatron_dir(run)
    config_path = checkpoint / "config.yaml"
    if not config_path.is_file():
        raise HandoffError(f"{config_path}: missing; the run's resolved config is part of the bundle")
    config = yaml.safe_load(config_path.read_text())
    return config["stage"], config, checkpoint


def _notes(stage: str, config: dict, metrics: list[dict]) -> list[str]:
    train = [r for r in metrics if "train/loss" in r]
    last = train[-1] if train else {}
    alarms = [r["step"] for r in train if r.get("router/collapsing_layers", 0) > 0]
    evals = [r for r in metrics if "eval/forward_kl" in r]
    incidents = [f"step {r['step']}: {int(r['suite/gates_failed'])} evaluation-suite gate(s) failed"
                 for r in metrics if r.get("suite/gates_failed")]
    losses = config["losses"]
    lines = [f"## {stage}", "",
             f"- steps: {config['steps']} (logged {len(train)}), tokens: {int(last.get('train/tokens_seen', 0))}",
             f"- frozen (regex): {config['optimizer']['freeze'] or 'nothing'}",
             "- loss weights: " + ", ".join(f"{i['kind']} {i['weight']} (T={i['temperature']})" for i in losses["logits"])
             + f", hidden {losses['hidden']['weight']}, attention {losses['attention']['weight']}",
             f"- NaN/Inf-skipped steps: {int(last.get('train/skipped_steps', 0))}",
             f"- router alarms (normalised entropy < {config['logging']['router_min_entropy']}): "
             + (f"{len(alarms)} logged steps, first at {alarms[0]}" if alarms else "none"),
             "- held-out eval: " + (", ".join(f"step {r['step']} KL {r['eval/forward_kl']:.4f}" for r in evals)
                                    if evals else "not run"),
             "- incidents: " + ("; ".join(incidents) if incidents else "none"), ""]
    return lines


def _prepare_command(stats: dict, data_dir: str) -> str:
    command = (f"megatron-student prepare-data --manifest {stats['manifest']} --output {data_dir} "
               f"--seq-len {stats['seq_len']}")
    return command + (f" --overlong {stats['overlong']}" if stats.get("overlong") else "")


def assemble(student: str | Path, teacher: str | Path, runs: list[str | Path], output: str | Path,
             evaluation: str | Path | None = None, force: bool = False) -> list[Check]:
    """Write the bundle to ``output`` when it passes the readiness check, else raise :class:`HandoffError`."""
    from .convert.megatron_to_hf import convert_megatron_to_hf

    student, teacher, output = Path(student), Path(teacher), Path(output)
    if output.exists() and not force:
        raise FileExistsError(f"{output}: already exists; pass --force to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        if (student / TRACKER_NAME).is_file() or (student / "metadata.json").is_file():
            convert_megatron_to_hf(student, tmp / "student", teacher_dir=None)
        else:
            if not (student / "config.json").is_file():
                raise HandoffError(f"{student}: neither an HF student (config.json) nor a Megatron checkpoint")
            shutil.copytree(student, tmp / "student")
        for name in (*TOKENIZER_FILES, "chat_template.jinja"):
            if (teacher / name).is_file():
                shutil.copyfile(teacher / name, tmp / "student" / name)
        reference = teacher_reference(teacher)
        notes = ["# Handoff notes", "", f"Student: {student}", f"Teacher: {teacher}", ""]
        datasets = {}
        for run in map(Path, runs):
            stage, config, checkpoint = _run_record(run)
            target = tmp / "runs" / stage
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(checkpoint / "config.yaml", target / "config.yaml")
            metrics_path = Path(config["logging"]["dir"]) / "metrics.jsonl"
            metrics = []
            if metrics_path.is_file():
                shutil.copyfile(metrics_path, target / "metrics.jsonl")
                metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            notes += _notes(stage, config, metrics)
            datasets[config["data"]["path"]] = None
        for data_dir in datasets:
            stats_path = Path(data_dir) / "stats.json"
            if not stats_path.is_file():
                raise HandoffError(f"{stats_path}: missing; the runs' prepared data must carry its stats")
            stats = json.loads(stats_path.read_text())
            target = tmp / "data" / stats["name"]
            target.mkdir(parents=True, exist_ok=True)
            for name in ("stats.json", "manifest.yaml"):
                if (Path(data_dir) / name).is_file():
                    shutil.copyfile(Path(data_dir) / name, target / name)
            (target / "prepare_command.txt").write_text(_prepare_command(stats, data_dir) + "\n")
        if evaluation is not None:
            evaluation = Path(evaluation)
            if not (evaluation / "report.json").is_file():
                raise HandoffError(f"{evaluation}: no report.json (pass an `evaluate --output` directory)")
            shutil.copytree(evaluation, tmp / "evaluation")
            report = json.loads((evaluation / "report.json").read_text())
            _copy_suite(report, tmp / "evaluation")
            notes += ["## Evaluation", "", f"Suite `{report['suite']}`: gates "
                      + ("passed" if report["passed"] else "FAILED"), ""]
        (tmp / "notes.md").write_text("\n".join(notes))
        checks, canary = readiness_checks(tmp / "student", reference)
        failed = [c for c in checks if not c.passed]
        if failed:
            raise HandoffError("the bundle fails its readiness check: "
                               + "; ".join(f"{c.name}: {c.detail}" for c in failed))
        (tmp / REFERENCE).write_text(json.dumps(reference | {"canary": canary}, indent=1) + "\n")
        (tmp / READINESS).write_text(json.dumps([asdict(c) for c in checks], indent=1) + "\n")
        write_manifest(tmp)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return checks


def _copy_suite(report: dict, target: Path) -> None:
    """The suite the evaluation ran (its prompt sets and probe settings) beside the report."""
    from importlib import resources

    source = report["suite_source"]
    if source.startswith("<suite "):
        name = source.removeprefix("<suite ").removesuffix(">")
        with resources.as_file(resources.files("megatron_student") / "assets" / f"eval_suite_{name}.yaml") as p:
            shutil.copyfile(p, target / "suite.yaml")
    elif Path(source).is_file():
        shutil.copyfile(source, target / "suite.yaml")


def verify(bundle: str | Path) -> list[Check]:
    """The readiness check of a received bundle against its manifest and recorded teacher reference."""
    bundle = Path(bundle)
    checks = manifest_checks(bundle)
    reference_path = bundle / REFERENCE
    if not reference_path.is_file():
        return checks + [Check("teacher reference", False, f"{reference_path}: missing")]
    reference = json.loads(reference_path.read_text())
    try:
        student_checks, canary = readiness_checks(bundle / "student", reference)
    except Exception as e:  # noqa: BLE001 - a damaged student must fail verification with its cause, not crash
        return checks + [Check("student loads", False, f"{bundle / 'student'}: {type(e).__name__}: {e}")]
    checks += student_checks
    recorded = reference["canary"]
    if recorded["device"] == canary["device"]:
        same = recorded["tokens"] == canary["tokens"]
        checks.append(Check("canary reproducible", same, "the canary generation matches the recorded tokens" if same
                            else f"canary final now {canary['final'][:60]!r}, recorded {recorded['final'][:60]!r}"))
    return checks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verify", metavar="BUNDLE", help="re-run the readiness check on an existing bundle")
    parser.add_argument("--student", help="HF student dir (convert-megatron-to-hf output) or Megatron checkpoint")
    parser.add_argument("--teacher", help="the teacher's HF directory (tokenizer files, special tokens, context)")
    parser.add_argument("--runs", nargs="+", default=[], metavar="RUN_DIR", help="the stages' checkpoint.dir, in order")
    parser.add_argument("--evaluation", help="an `evaluate --output` directory to include")
    parser.add_argument("--output", help="bundle directory to create")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def _print(checks: list[Check]) -> None:
    for c in checks:
        print(f"[{'ok' if c.passed else 'FAIL'}] {c.name}: {c.detail}")


def run(args: argparse.Namespace) -> int:
    if args.verify:
        checks = verify(args.verify)
        _print(checks)
        failed = [c.name for c in checks if not c.passed]
        if failed:
            print(f"error: {args.verify}: bundle fails verification ({', '.join(failed)})", file=sys.stderr)
            return 1
        return 0
    missing = [f"--{k}" for k in ("student", "teacher", "output") if not getattr(args, k)]
    if missing:
        print(f"error: {', '.join(missing)} required (or --verify BUNDLE)", file=sys.stderr)
        return 2
    try:
        checks = assemble(args.student, args.teacher, args.runs, args.output, args.evaluation, args.force)
    except (HandoffError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _print(checks)
    print(f"wrote handoff bundle {args.output}")
    return 0
