"""`megatron-student evaluate`: run a suite on a student (and its teacher) and write report.md, report.json and
PNG plots.

Models: an HF student directory, an HF gpt-oss directory (``load_teacher_model``: MXFP4 experts dequantised), or a
Megatron student checkpoint (converted to a temporary HF bundle with ``convert_megatron_to_hf`` first). The
student and the teacher go through the same functions: teacher-forced scoring of the held-out conversations
(``agreement.py``), greedy Harmony generation with the model's cache one prompt at a time (``generation.py``) and
the probes (``probes.py``). With a teacher, the report gives each score for both and the student/teacher retention
ratio. Gates (``suite.py``) decide the exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import TRACKER_NAME
from .agreement import AgreementTotals, RouterCounts, prepared_conversations
from .generation import summarize_completions
from .probes import Probe, make_probes
from .suite import Suite, load_suite

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def is_megatron_checkpoint(path: Path) -> bool:
    return (path / "metadata.json").is_file() or (path / TRACKER_NAME).is_file()


def load_eval_model(path: str | Path, device: torch.device, dtype: torch.dtype, workdir: Path | None = None):
    """(model in eval mode on ``device``, "student" or "teacher"). A Megatron checkpoint is exported to an HF bundle
    under ``workdir`` first (a student only: teacher checkpoints are evaluated from their HF directory)."""
    path = Path(path)
    if is_megatron_checkpoint(path):
        from ..convert.megatron_to_hf import convert_megatron_to_hf

        if workdir is None:
            raise ValueError(f"{path}: a Megatron checkpoint needs a work directory for its HF export")
        hf = workdir / f"hf-{path.name}"
        convert_megatron_to_hf(path, hf, force=True)
        path = hf
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: neither an HF checkpoint (config.json) nor a Megatron checkpoint "
                                f"(metadata.json or {TRACKER_NAME})")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type == "gpt_oss":
        from ..teacher.attention import use_sink_attention
        from ..teacher.checkpoint import load_teacher_model

        teacher = load_teacher_model(path, dtype=dtype, device=device)
        use_sink_attention(teacher)  # eager gpt-oss attention cannot hold the long needles' [T, T] scores
        return teacher, "teacher"
    from ..student.modeling import StudentForCausalLM

    if model_type != StudentForCausalLM.config_class.model_type:
        raise ValueError(f"{config_path}: model_type {model_type!r} is neither gpt_oss nor "
                         f"{StudentForCausalLM.config_class.model_type!r}")
    return StudentForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval(), "student"


def _forward(model, ids: torch.Tensor, kind: str):
    """(logits [T, V], router logits per layer) of one unpacked sequence."""
    if kind == "teacher":
        out = model(input_ids=ids[None], output_router_logits=True, use_cache=False)
    else:
        out = model(input_ids=ids[None])
    return out.logits[0], out.router_logits


@torch.no_grad()
def score_documents(student, teacher, docs, progress) -> tuple[dict, dict, dict | None]:
    """(agreement per channel, student router counts, teacher router counts) over ``docs``."""
    (s_model, s_kind), t = student, teacher
    totals = AgreementTotals()
    s_router = RouterCounts(s_model.config.num_experts_per_tok)
    t_router = RouterCounts(t[0].config.num_experts_per_tok) if t else None
    device = next(s_model.parameters()).device
    for doc in docs:
        ids = doc.input_ids.to(device)
        s_logits, s_routes = _forward(s_model, ids, s_kind)
        s_router.add(s_routes)
        t_logits = None
        if t:
            t_logits, t_routes = _forward(t[0], ids, t[1])
            t_router.add(t_routes)
            vocab = min(s_logits.shape[-1], t_logits.shape[-1])
            s_logits, t_logits = s_logits[:, :vocab].float(), t_logits[:, :vocab].float()
        totals.add(s_logits.float(), t_logits, doc)
        progress.update(1)
    return totals.summary(t is not None), s_router, t_router


def _generate(model, prompt_tokens: list[int], max_new_tokens: int):
    from ..student.generate import generate_reply

    return generate_reply(model, prompt_tokens, max_new_tokens=max_new_tokens)


def run_generation(model, suite: Suite, progress) -> dict:
    from ..student.generate import harmony_prompt

    labelled = []
    for i, p in enumerate(suite.prompts):
        tokens = harmony_prompt(p["prompt"], developer=p["developer"], reasoning_effort=p["reasoning_effort"])
        reply = _generate(model, tokens, suite.max_new_tokens)
        labelled.append((f"prompt[{i}]: {p['prompt'][:60]}", p["kind"], reply.tokens))
        progress.update(1)
    return summarize_completions(labelled, suite.repetition_ngram)


def run_probes(model, probes: list[Probe], max_new_tokens: int, progress) -> dict:
    from ..student.generate import harmony_prompt

    records = []
    for probe in probes:
        reply = _generate(model, harmony_prompt(probe.prompt, reasoning_effort="low"), max_new_tokens)
        records.append({"id": probe.id, "family": probe.family, "kind": probe.kind,
                        "context_tokens": probe.context_tokens, "correct": probe.check(reply.final),
                        "answer": reply.final[:300], "format_error": reply.error})
        progress.update(1)
    return summarize_probes(records)


def _accuracy(rows: list[dict]) -> float:
    return sum(r["correct"] for r in rows) / len(rows)


def summarize_probes(records: list[dict]) -> dict:
    """Accuracy overall, per family, per family/kind and, for needles, per kind and context length."""
    if not records:
        return {"count": 0}
    groups: dict[str, dict[str, list[dict]]] = {"family": {}, "kind": {}}
    needle: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        groups["family"].setdefault(r["family"], []).append(r)
        groups["kind"].setdefault(f"{r['family']}/{r['kind']}", []).append(r)
        if r["family"] == "needle":
            needle.setdefault(r["kind"], {}).setdefault(str(r["context_tokens"]), []).append(r)
    return {"count": len(records), "accuracy": _accuracy(records),
            "by_family": {k: _accuracy(v) for k, v in groups["family"].items()},
            "by_kind": {k: _accuracy(v) for k, v in groups["kind"].items()},
            "needle": {kind: {length: _accuracy(rows) for length, rows in by_length.items()}
                       for kind, by_length in needle.items()},
            "records": records}


def _ratio(student: float | None, teacher: float | None) -> float | None:
    if student is None or teacher is None or teacher == 0:
        return None
    return student / teacher


def retention(student: dict, teacher: dict) -> dict:
    """Student score / teacher score for each score both have (None where the teacher scores 0)."""
    out = {"generation.compliance_rate": _ratio(student["generation"].get("compliance_rate"),
                                                teacher["generation"].get("compliance_rate"))}
    sp, tp = student["probes"], teacher["probes"]
    if sp.get("count"):
        out["probes.accuracy"] = _ratio(sp["accuracy"], tp["accuracy"])
        out |= {f"probes.{k}": _ratio(v, tp["by_family"].get(k)) for k, v in sp["by_family"].items()}
        for kind, by_length in sp["needle"].items():
            out |= {f"needle.{kind}.{n}": _ratio(v, tp["needle"][kind].get(n)) for n, v in by_length.items()}
    return out


def evaluate(model: str | Path, output: str | Path, *, teacher: str | Path | None = None, data: str | Path | None = None,
             suite: Suite | str = "default", device: str | None = None, dtype: str | None = None,
             score_teacher: bool = True, show_progress: bool = True) -> dict:
    """Run ``suite`` and write ``output``/report.{md,json} and plots; returns the report (``report["passed"]``:
    every gate held). ``score_teacher=False`` uses the teacher for agreement only (no teacher generations,
    probes or retention ratios)."""
    suite = load_suite(suite) if isinstance(suite, str) else suite
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = DTYPES[dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    timings: dict[str, float] = {}
    report: dict = {"suite": suite.name, "suite_source": suite.source, "seed": suite.seed, "device": str(dev),
                    "dtype": str(torch_dtype).removeprefix("torch."), "models": {}}
    probes = make_probes(suite.probes, suite.seed)
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="evaluate-")))
        start = time.perf_counter()
        student = load_eval_model(model, dev, torch_dtype, workdir)
        report["models"]["student"] = {"path": str(model), "kind": student[1]}
        t = None
        if teacher is not None:
            t = load_eval_model(teacher, dev, torch_dtype, workdir)
            report["models"]["teacher"] = {"path": str(teacher), "kind": t[1]}
        timings["load"] = time.perf_counter() - start
        docs = prepared_conversations(data, suite.split, suite.max_documents) if data is not None else []
        models = {"student": student[0]} | ({"teacher": t[0]} if t and score_teacher else {})
        total = len(docs) + len(models) * (len(suite.prompts) + len(probes))
        progress = stack.enter_context(tqdm(total=total, desc="evaluate", unit="item", disable=not show_progress,
                                            file=sys.stderr))
        results: dict[str, dict] = {name: {} for name in ("student", "teacher")[:1 + (t is not None)]}
        if docs:
            start = time.perf_counter()
            progress.set_postfix_str("held-out agreement")
            agreement, s_router, t_router = score_documents(student, t, docs, progress)
            results["student"]["agreement"] = agreement
            results["student"]["router"] = s_router.health(suite.router_min_entropy)
            if t_router is not None:
                results["teacher"]["router"] = t_router.health(suite.router_min_entropy)
            timings["agreement"] = time.perf_counter() - start
        for name, m in models.items():
            start = time.perf_counter()
            progress.set_postfix_str(f"{name} generation")
            results[name]["generation"] = run_generation(m, suite, progress)
            progress.set_postfix_str(f"{name} probes")
            results[name]["probes"] = run_probes(m, probes, suite.probe_max_new_tokens, progress)
            timings[name] = time.perf_counter() - start
    report |= results
    if "teacher" in models:
        report["retention"] = retention(results["student"], results["teacher"])
    report["gates"] = [gate.check(report) for gate in suite.gates]
    report["passed"] = all(g["passed"] for g in report["gates"])
    report["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    from .report import write_report

    write_report(report, output)
    return report


def training_suite(config, step: int, device: torch.device) -> tuple[dict[str, float], list[dict]]:
    """``eval.suite`` during training: evaluate the latest checkpoint of ``config.checkpoint.dir`` (the one just
    written) into ``<logging.dir>/suite/step_N``; returns (scalars for the metrics sink, failed gates)."""
    from ..checkpoint import resolve_megatron_dir

    e = config.eval
    teacher = e.suite_teacher or (config.teacher.path if (Path(config.teacher.path) / "config.json").is_file()
                                  else None)
    report = evaluate(resolve_megatron_dir(config.checkpoint.dir),
                      Path(config.logging.dir) / "suite" / f"step_{step:07d}", teacher=teacher,
                      data=config.data.path, suite=e.suite, device=str(device), show_progress=False)
    student = report["student"]
    scalars = {"suite/compliance_rate": student["generation"]["compliance_rate"],
               "suite/gates_failed": float(sum(not g["passed"] for g in report["gates"]))}
    if student["probes"].get("count"):
        scalars["suite/probe_accuracy"] = student["probes"]["accuracy"]
    for channel, row in student.get("agreement", {}).items():
        scalars |= {f"suite/{key}_{channel}": row[key] for key in ("kl", "ce", "top1_agreement") if key in row}
    return scalars, [g for g in report["gates"] if not g["passed"]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF student dir, HF gpt-oss dir or Megatron student checkpoint")
    parser.add_argument("--teacher", help="HF gpt-oss teacher dir: agreement, and scores for retention ratios")
    parser.add_argument("--data", help="prepare-data output whose held-out split scores teacher agreement")
    parser.add_argument("--suite", default="default", help="default | demo | a suite YAML (evaluate/suite.py)")
    parser.add_argument("--output", required=True, help="directory for report.md, report.json and the plots")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .suite import SuiteError

    try:
        report = evaluate(args.model, args.output, teacher=args.teacher, data=args.data, suite=args.suite,
                          device=args.device, dtype=args.dtype, show_progress=not args.no_progress)
    except (SuiteError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((Path(args.output) / "report.md").read_text())
    failed = [g for g in report["gates"] if not g["passed"]]
    for g in failed:
        print(f"GATE FAILED: {g['metric']}: {g['reason']}", file=sys.stderr)
    return 1 if failed else 0
