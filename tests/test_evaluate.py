"""The evaluation suite's parts: each metric on a hand-computed case, deterministic probes whose checkers accept
the reference answers and reject wrong ones, suite files and gates. (Evaluate on real models: test_demo.py.)"""

import json
import math

import pytest
import torch

from megatron_student.harmony_vocab import RETURN
from megatron_student.evaluate.agreement import AgreementTotals, Document, RouterCounts
from megatron_student.evaluate.generation import (
    completion_record,
    repetition_rate,
    split_messages,
    summarize_completions,
    tokens_after_stop,
)
from megatron_student.evaluate.probes import FAMILIES, make_probes
from megatron_student.evaluate.runner import retention, summarize_probes
from megatron_student.evaluate.suite import Gate, SuiteError, load_suite, suite_from_dict
from megatron_student.harmony_vocab import harmony_encoding

LN2, LN3 = math.log(2), math.log(3)


def test_agreement_against_hand_computed_values():
    # Vocabulary of 3, four rows: an analysis target, a final target, an unscored row and a final target.
    # Row 0: teacher uniform, student q = (1/2, 1/4, 1/4); label 0.
    #   KL = Σ 1/3 (log 1/3 − log q) = −ln3 + (ln2 + 2·2ln2)/3 = −ln3 + 5/3·ln2; CE = ln2; teacher CE = ln3.
    # Row 1: teacher p = (1/4, 1/2, 1/4), student uniform; label 1.
    #   KL = Σ p log p − Σ p log(1/3) = (−¼·2ln2·2 − ½ln2) + ln3 = ln3 − 3/2·ln2; CE = ln3; teacher CE = ln2.
    #   argmax: student 0 (first of ties), teacher 1 → disagree. Row 0: both 0 → agree.
    # Row 3 is row 0 again, scored as final.
    row0_s, row0_t = [LN2, 0.0, 0.0], [0.0, 0.0, 0.0]
    row1_s, row1_t = [0.0, 0.0, 0.0], [0.0, LN2, 0.0]
    student = torch.tensor([row0_s, row1_s, [5.0, 0.0, 0.0], row0_s], dtype=torch.float64)
    teacher = torch.tensor([row0_t, row1_t, [0.0, 5.0, 0.0], row0_t], dtype=torch.float64)
    doc = Document(input_ids=torch.zeros(4, dtype=torch.long), targets=torch.tensor([0, 1, -100, 0]),
                   analysis=torch.tensor([True, False, False, False]), final=torch.tensor([False, True, False, True]))
    totals = AgreementTotals()
    totals.add(student, teacher, doc, chunk_size=3)
    out = totals.summary(with_teacher=True)
    kl0, kl1 = -LN3 + 5 / 3 * LN2, LN3 - 1.5 * LN2
    assert out["analysis"]["tokens"] == 1 and out["final"]["tokens"] == 2 and out["all"]["tokens"] == 3
    assert out["analysis"]["kl"] == pytest.approx(kl0, rel=1e-9)
    assert out["final"]["kl"] == pytest.approx((kl1 + kl0) / 2, rel=1e-9)
    assert out["all"]["kl"] == pytest.approx((2 * kl0 + kl1) / 3, rel=1e-9)
    assert out["final"]["ce"] == pytest.approx((LN3 + LN2) / 2, rel=1e-9)
    assert out["final"]["perplexity"] == pytest.approx(math.sqrt(6), rel=1e-9)
    assert out["final"]["teacher_ce"] == pytest.approx((LN2 + LN3) / 2, rel=1e-9)
    assert out["analysis"]["top1_agreement"] == 1.0 and out["final"]["top1_agreement"] == 0.5
    assert out["all"]["top1_agreement"] == pytest.approx(2 / 3)
    alone = AgreementTotals()
    alone.add(student, None, doc)
    assert alone.summary(with_teacher=False)["analysis"] == {"tokens": 1, "ce": pytest.approx(LN2),
                                                             "perplexity": pytest.approx(2.0)}


def test_router_health_counts_dead_experts_and_collapse():
    # Layer 0: every token picks experts 0 and 1 (top-2) → fractions ½, ½, 0, 0: entropy ln2/ln4 = ½, dead [2, 3].
    # Layer 1: tokens cycle through the pairs (0,1), (2,3) → uniform: entropy 1, nothing dead.
    layer0 = torch.tensor([[3.0, 2.0, 0.0, -1.0]] * 4)
    layer1 = torch.tensor([[3.0, 2.0, 0.0, -1.0], [0.0, -1.0, 3.0, 2.0]] * 2)
    counts = RouterCounts(top_k=2)
    counts.add((layer0[:2], layer1[:2]))
    counts.add((layer0[2:], layer1[2:]))
    health = counts.health(min_entropy=0.6)
    l0, l1 = health["layers"]["layer_0"], health["layers"]["layer_1"]
    assert l0["fractions"] == [0.5, 0.5, 0.0, 0.0] and l0["dead_experts"] == [2, 3]
    assert l0["entropy"] == pytest.approx(0.5) and l0["max_share"] == 0.5 and l0["collapsing"]
    assert l1["fractions"] == [0.25] * 4 and l1["entropy"] == pytest.approx(1.0) and not l1["collapsing"]
    assert health["collapsing_layers"] == ["layer_0"] and health["dead_experts"] == 2


def _tokens(text: str) -> list[int]:
    return harmony_encoding().encode(text, allowed_special="all")


def test_generation_metrics_on_hand_built_completions():
    assert repetition_rate([1, 2, 3, 1, 2, 3], n=3) == pytest.approx(0.25)  # (1,2,3) twice among 4 trigrams
    assert repetition_rate([1, 2, 3, 4], n=2) == 0.0 and repetition_rate([1, 2], n=4) == 0.0
    assert tokens_after_stop([5, RETURN, 7, 8]) == 2 and tokens_after_stop([5, RETURN]) == 0
    good = _tokens("<|channel|>analysis<|message|>Add them up.<|end|><|start|>assistant<|channel|>final"
                   "<|message|>42<|return|>")
    messages = split_messages(good)
    assert [m.channel for m in messages] == ["analysis", "final"]
    assert messages[0].content == _tokens("Add them up.") and messages[1].content == _tokens("42")
    record = completion_record(good)
    assert record["issues"] == [] and record["analysis_tokens"] == len(_tokens("Add them up."))
    assert record["final_tokens"] == len(_tokens("42")) and not record["empty_final"]
    loop = _tokens("<|channel|>analysis<|message|>" + "yes no " * 8)
    looped = completion_record(loop)
    assert looped["issues"] == ["missing_final", "unterminated"] and looped["repetition"] > 0.5
    assert looped["final_tokens"] == 0
    empty = completion_record(_tokens("<|channel|>final<|message|> <|return|>"))
    assert empty["empty_final"] and "empty_final" in empty["issues"]
    summary = summarize_completions([("a", "math", good), ("b", "math", loop), ("c", "code", good)])
    assert summary["compliance_rate"] == pytest.approx(2 / 3)
    assert summary["compliance_by_kind"] == {"math": 0.5, "code": 1.0}
    assert summary["compliance"]["issues_by_kind"] == {"missing_final": 1, "unterminated": 1}
    assert summary["final_tokens"]["values"] == [1, 0, 1] and summary["empty_final_rate"] == 0.0


def test_probes_are_deterministic_and_checkers_accept_references_only():
    spec = {"arithmetic": 6, "word_problems": 6, "logic": 6, "instructions": 6,
            "needle": {"lengths": [256, 600], "samples": 2, "keys": 3}}
    probes = make_probes(spec, seed=7)
    again = make_probes(spec, seed=7)
    assert [(p.id, p.prompt, p.reference) for p in probes] == [(p.id, p.prompt, p.reference) for p in again]
    assert [p.prompt for p in make_probes(spec, seed=8)] != [p.prompt for p in probes]
    assert {p.family for p in probes} == set(FAMILIES)
    assert len([p for p in probes if p.family == "needle"]) == 2 * 2 * 2
    for p in probes:
        assert p.check(p.reference), (p.id, p.reference)
        assert not p.check(""), p.id
    wrong = {
        "arithmetic": lambda p: f"The answer is {p.expected['value'] + 1}.",
        "word_problems": lambda p: f"{p.expected['value']} ... no wait, {p.expected['value'] - 1}",
        "logic": lambda p: ("No." if p.expected["answer"] == "yes" else "Yes.") if p.kind == "syllogism"
        else " and ".join(p.expected["people"]),
        "instructions": lambda p: {"word_limit": " ".join(["word"] * (p.expected.get("max_words", 0) + 1)),
                                   "json": json.dumps({**p.expected.get("object", {}), "extra": 1}),
                                   "keyword": "A sentence without it."}[p.kind],
        "needle": lambda p: " ".join([p.expected["value"], *p.expected["distractors"]]) if p.kind == "multi"
        else str(int(p.expected["value"]) + 1),
    }
    for p in probes:
        assert not p.check(wrong[p.family](p)), (p.id, wrong[p.family](p))
    from megatron_student.student.generate import harmony_prompt

    for p in probes:
        if p.family == "needle":  # the rendered prompt is about the requested length
            assert abs(len(harmony_prompt(p.prompt, reasoning_effort="low")) - p.context_tokens) < 0.05 * p.context_tokens
            assert p.prompt.count("The special magic number for") == (1 if p.kind == "single" else 3)


def test_probe_summary_and_retention():
    records = [{"family": "needle", "kind": "multi", "context_tokens": 256, "correct": c} for c in (True, False)]
    records += [{"family": "arithmetic", "kind": "+", "context_tokens": 0, "correct": True}]
    student = {"generation": {"compliance_rate": 0.5}, "probes": summarize_probes(records)}
    assert student["probes"]["accuracy"] == pytest.approx(2 / 3)
    assert student["probes"]["needle"] == {"multi": {"256": 0.5}}
    teacher_records = [dict(r, correct=True) for r in records]
    teacher = {"generation": {"compliance_rate": 1.0}, "probes": summarize_probes(teacher_records)}
    ratios = retention(student, teacher)
    assert ratios["generation.compliance_rate"] == 0.5 and ratios["needle.multi.256"] == 0.5
    assert ratios["probes.arithmetic"] == 1.0
    teacher["generation"]["compliance_rate"] = 0.0
    assert retention(student, teacher)["generation.compliance_rate"] is None


def test_suites_and_gates(tmp_path):
    for name in ("default", "demo"):
        suite = load_suite(name)
        assert suite.prompts and suite.gates
    assert load_suite("default").probes["needle"]["lengths"] == [1024, 4096, 8192, 16384, 32768]
    bad = tmp_path / "bad.yaml"
    bad.write_text("probes: {needle: {lengths: [1024], samples: 1}}\n")
    with pytest.raises(SuiteError, match=r"bad.yaml: probes.needle: needs exactly"):
        load_suite(str(bad))
    with pytest.raises(SuiteError, match=r"<x>: generation.colour: unknown key"):
        suite_from_dict({"generation": {"colour": 1}}, "<x>")
    with pytest.raises(FileNotFoundError, match="built-in suites"):
        load_suite(str(tmp_path / "missing.yaml"))
    report = {"student": {"generation": {"compliance_rate": 0.8}}}
    assert Gate("student.generation.compliance_rate", min=0.9).check(report)["reason"] == "0.8 < min 0.9"
    assert Gate("student.generation.compliance_rate", min=0.5, max=0.9).check(report)["passed"]
    assert Gate("student.agreement.final.kl", max=1.0).check(report) == {
        "metric": "student.agreement.final.kl", "value": None, "passed": False, "reason": "not measured"}
