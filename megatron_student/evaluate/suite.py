"""Evaluation suites: what ``evaluate`` measures and the gates it enforces, as a YAML file.

``--suite default`` (GPU-sized: needles at 1k–32k tokens) and ``--suite demo`` (CPU-sized) ship in
``megatron_student/assets/eval_suite_*.yaml``; any other value is a path. Keys (all optional, defaults below)::

    name: my-suite
    seed: 0                      # probes are generated from it (evaluate/probes.py)
    agreement:                   # teacher agreement on a prepared split (needs --data and a teacher)
      split: valid
      max_documents: 64
    router: {min_entropy: 0.5}   # the training alarm (logging.router_min_entropy)
    generation:
      max_new_tokens: 256
      repetition_ngram: 4
      prompts:                   # Harmony-rendered user prompts; kind groups them in the report
        - {prompt: "What is 12 + 30?", kind: math, reasoning_effort: low, developer: null}
    probes:
      max_new_tokens: 128
      arithmetic: 8              # probes per family
      word_problems: 8
      logic: 8
      instructions: 9
      needle: {lengths: [1024, 4096, 8192, 16384, 32768], samples: 4, keys: 4}
    gates:                       # each: a dotted path into report.json and a min and/or max
      - {metric: student.generation.compliance_rate, min: 0.9}
      - {metric: student.agreement.final.kl, max: 1.0}

A gate whose metric was not measured fails (naming it); ``evaluate`` exits 1 when any gate fails, training logs a
warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .probes import FAMILIES

BUILTIN = ("default", "demo")
_TOP_KEYS = {"name", "seed", "agreement", "router", "generation", "probes", "gates"}
_SECTION_KEYS = {"agreement": {"split", "max_documents"}, "router": {"min_entropy"},
                 "generation": {"max_new_tokens", "repetition_ngram", "prompts"},
                 "probes": {"max_new_tokens", *FAMILIES}}
_PROMPT_KEYS = {"prompt", "kind", "reasoning_effort", "developer"}


class SuiteError(ValueError):
    """An invalid suite file; the message names the file and the key."""


@dataclass
class Gate:
    metric: str
    min: float | None = None
    max: float | None = None

    def check(self, report: dict) -> dict:
        """{"metric", "value", "passed", "reason"} for ``report``."""
        node = report
        for part in self.metric.split("."):
            if not isinstance(node, dict) or part not in node:
                return {"metric": self.metric, "value": None, "passed": False, "reason": "not measured"}
            node = node[part]
        if not isinstance(node, (int, float)) or isinstance(node, bool):
            return {"metric": self.metric, "value": None, "passed": False, "reason": f"not a number: {node!r}"}
        reasons = []
        if self.min is not None and node < self.min:
            reasons.append(f"{node:.4g} < min {self.min:g}")
        if self.max is not None and node > self.max:
            reasons.append(f"{node:.4g} > max {self.max:g}")
        return {"metric": self.metric, "value": node, "passed": not reasons, "reason": "; ".join(reasons) or "ok"}


@dataclass
class Suite:
    name: str = "default"
    seed: int = 0
    split: str = "valid"
    max_documents: int = 64
    router_min_entropy: float = 0.5
    max_new_tokens: int = 256
    repetition_ngram: int = 4
    prompts: list[dict] = field(default_factory=list)
    probe_max_new_tokens: int = 128
    probes: dict = field(default_factory=dict)
    gates: list[Gate] = field(default_factory=list)
    source: str = "<dict>"


def _need(cond: bool, src: str, key: str, message: str) -> None:
    if not cond:
        raise SuiteError(f"{src}: {key}: {message}")


def _int(value, src: str, key: str, minimum: int = 0) -> int:
    _need(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, src, key,
          f"expected an integer >= {minimum}, got {value!r}")
    return value


def suite_from_dict(data: dict, src: str) -> Suite:
    _need(isinstance(data, dict), src, "<top level>", f"expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - _TOP_KEYS)
    _need(not unknown, src, unknown[0] if unknown else "", f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    for section, keys in _SECTION_KEYS.items():
        value = data.get(section) or {}
        _need(isinstance(value, dict), src, section, f"expected a mapping, got {value!r}")
        extra = sorted(set(value) - keys)
        _need(not extra, src, f"{section}.{extra[0]}" if extra else section,
              f"unknown key (known: {', '.join(sorted(keys))})")
    agreement, router = data.get("agreement") or {}, data.get("router") or {}
    generation, probes = data.get("generation") or {}, dict(data.get("probes") or {})
    suite = Suite(name=str(data.get("name", Path(src).stem)), seed=_int(data.get("seed", 0), src, "seed"), source=src)
    suite.split = str(agreement.get("split", suite.split))
    suite.max_documents = _int(agreement.get("max_documents", suite.max_documents), src, "agreement.max_documents", 1)
    suite.router_min_entropy = router.get("min_entropy", suite.router_min_entropy)
    _need(isinstance(suite.router_min_entropy, (int, float)) and 0 <= suite.router_min_entropy <= 1, src,
          "router.min_entropy", f"must be in [0, 1], got {suite.router_min_entropy!r}")
    suite.max_new_tokens = _int(generation.get("max_new_tokens", suite.max_new_tokens), src,
                                "generation.max_new_tokens", 1)
    suite.repetition_ngram = _int(generation.get("repetition_ngram", suite.repetition_ngram), src,
                                  "generation.repetition_ngram", 1)
    for i, prompt in enumerate(generation.get("prompts") or []):
        key = f"generation.prompts[{i}]"
        _need(isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str) and prompt["prompt"].strip(), src,
              key, "needs a non-empty 'prompt' string")
        extra = sorted(set(prompt) - _PROMPT_KEYS)
        _need(not extra, src, f"{key}.{extra[0]}" if extra else key,
              f"unknown key (known: {', '.join(sorted(_PROMPT_KEYS))})")
        suite.prompts.append({"kind": "general", "reasoning_effort": "medium", "developer": None, **prompt})
    suite.probe_max_new_tokens = _int(probes.pop("max_new_tokens", suite.probe_max_new_tokens), src,
                                      "probes.max_new_tokens", 1)
    for family, spec in probes.items():
        if family == "needle":
            _need(isinstance(spec, dict) and set(spec) == {"lengths", "samples", "keys"}, src, "probes.needle",
                  f"needs exactly lengths, samples and keys, got {spec!r}")
            _need(isinstance(spec["lengths"], list) and spec["lengths"], src, "probes.needle.lengths",
                  "a non-empty list of context lengths in tokens")
            for j, length in enumerate(spec["lengths"]):
                _int(length, src, f"probes.needle.lengths[{j}]", 128)
            _int(spec["samples"], src, "probes.needle.samples", 1)
            _int(spec["keys"], src, "probes.needle.keys", 2)
        else:
            _int(spec, src, f"probes.{family}")
    suite.probes = probes
    for i, gate in enumerate(data.get("gates") or []):
        key = f"gates[{i}]"
        _need(isinstance(gate, dict) and isinstance(gate.get("metric"), str) and set(gate) <= {"metric", "min", "max"}
              and ("min" in gate or "max" in gate), src, key, f"needs metric and min and/or max, got {gate!r}")
        for bound in ("min", "max"):
            _need(gate.get(bound) is None or isinstance(gate[bound], (int, float)), src, f"{key}.{bound}",
                  f"expected a number, got {gate.get(bound)!r}")
        suite.gates.append(Gate(gate["metric"], gate.get("min"), gate.get("max")))
    return suite


def load_suite(name_or_path: str) -> Suite:
    """A built-in suite by name (``default``, ``demo``) or a suite YAML file."""
    if name_or_path in BUILTIN:
        with resources.as_file(resources.files("megatron_student") / "assets" / f"eval_suite_{name_or_path}.yaml") as p:
            return suite_from_dict(yaml.safe_load(p.read_text()), f"<suite {name_or_path}>")
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such suite file (built-in suites: {', '.join(BUILTIN)})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SuiteError(f"{path}: not valid YAML: {e}") from e
    return suite_from_dict(data, str(path))
