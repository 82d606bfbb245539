"""Probes with checkable answers, generated deterministically from a seed (nothing is downloaded).

Families (each probe is one user prompt; the model's ``final`` channel is checked):

- ``arithmetic``: ``a + b``, ``a - b``, ``a × b`` with two- and three-digit numbers; correct when the last integer
  of the answer is the result.
- ``word_problems``: one- and two-step GSM8K-like stories (buying, sharing, rates); checked the same way.
- ``logic``: a three-person ordering ("who is the tallest?": correct when the answer names that person and no
  other) and two-premise syllogisms answered yes/no (the first yes/no word counts).
- ``instructions``: constraints a program can check: a word limit, a JSON object with given keys and values, a
  required keyword.
- ``needle``: RULER-style retrieval. A haystack of seeded filler sentences of about ``length`` prompt tokens
  holds ``keys`` needles "The special magic number for <key> is <7 digits>." at seeded depths; the question asks
  for one key's number. ``single`` has one needle; ``multi`` has several keys (the others are distractors) and is
  correct only when the answer holds the queried number and none of the distractors' numbers. Multi-key
  retrieval is where students without global softmax layers are known to fail; it is measured per length.

``make_probes(spec, seed)`` returns the same list for the same arguments on every machine; every probe carries a
``reference`` answer that its checker accepts.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

from ..harmony_vocab import harmony_encoding

FAMILIES = ("arithmetic", "word_problems", "logic", "instructions", "needle")
NAMES = ("Alice", "Bruno", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivan", "Jade", "Kofi", "Lena")
ITEMS = ("apple", "pencil", "marble", "stamp", "book", "coin", "card", "shell")
TOPICS = ("the ocean", "a bicycle", "winter", "a library", "the moon", "coffee", "a garden", "trains")
KEYWORDS = ("blue", "quiet", "journey", "bright", "river", "simple", "ancient", "gentle")
NOUNS = ("wug", "blick", "dax", "fep", "zorp", "tove", "mimsy", "glorp", "snark", "quell")
_WORDS = ("amber", "falcon", "cedar", "harbor", "lumen", "quartz", "tundra", "velvet", "willow", "zephyr", "cobalt",
          "ember", "granite", "meadow", "nimbus", "orchid", "prairie", "saffron", "thistle", "umber")
_FILLER_SUBJECTS = ("The committee", "A traveller", "The old bridge", "Every morning the baker", "The river",
                    "A small village", "The library", "The engineer", "A flock of birds", "The market")
_FILLER_VERBS = ("considered", "crossed", "remembered", "described", "watched", "followed", "repaired", "visited")
_FILLER_OBJECTS = ("the long road north", "a quiet afternoon", "the changing seasons", "an unfinished letter",
                   "the distant hills", "a crowded square", "the evening light", "a forgotten song")


@dataclass
class Probe:
    id: str
    family: str
    kind: str  # sub-kind within the family (e.g. "json", "multi")
    prompt: str
    reference: str  # an answer the checker accepts
    expected: dict = field(default_factory=dict)  # what the checker compares against
    context_tokens: int = 0  # needle probes: the haystack's target length

    def check(self, answer: str) -> bool:
        return CHECKERS[self.family](self, answer)


_INT = re.compile(r"-?\d[\d,]*")


def last_integer(text: str) -> int | None:
    found = _INT.findall(text)
    return int(found[-1].replace(",", "")) if found else None


def _check_number(probe: Probe, answer: str) -> bool:
    return last_integer(answer) == probe.expected["value"]


def _check_logic(probe: Probe, answer: str) -> bool:
    if probe.kind == "syllogism":
        word = re.search(r"\b(yes|no)\b", answer.lower())
        return word is not None and word.group(1) == probe.expected["answer"]
    named = {n for n in probe.expected["people"] if re.search(rf"\b{n}\b", answer)}
    return named == {probe.expected["answer"]}


def _strip_fence(text: str) -> str:
    text = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.S)
    return fenced.group(1) if fenced else text


def _check_instruction(probe: Probe, answer: str) -> bool:
    e = probe.expected
    if probe.kind == "word_limit":
        return 1 <= len(answer.split()) <= e["max_words"]
    if probe.kind == "json":
        try:
            value = json.loads(_strip_fence(answer))
        except json.JSONDecodeError:
            return False
        return isinstance(value, dict) and set(value) == set(e["object"]) and all(
            value[k] == v for k, v in e["object"].items())
    return e["keyword"] in re.findall(r"[a-z]+", answer.lower())


def _check_needle(probe: Probe, answer: str) -> bool:
    found = set(re.findall(r"\d{7}", answer))
    return probe.expected["value"] in found and not found & set(probe.expected["distractors"])


CHECKERS = {"arithmetic": _check_number, "word_problems": _check_number, "logic": _check_logic,
            "instructions": _check_instruction, "needle": _check_needle}


def _arithmetic(rng: random.Random, i: int) -> Probe:
    op = ("+", "-", "*")[i % 3]
    a, b = (rng.randint(10, 999), rng.randint(10, 999)) if op != "*" else (rng.randint(2, 99), rng.randint(2, 30))
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    shown = {"+": "+", "-": "-", "*": "times"}[op]
    return Probe(f"arithmetic-{i}", "arithmetic", op, f"What is {a} {shown} {b}?", f"{a} {op} {b} = {value}.",
                 {"value": value})


def _word_problem(rng: random.Random, i: int) -> Probe:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(5, 40), rng.randint(2, 20), rng.randint(1, 5)
    kind = ("buy_give", "groups", "rate")[i % 3]
    if kind == "buy_give":
        prompt = (f"{name} has {a} {item}s, buys {b} more and then gives {c} away. "
                  f"How many {item}s does {name} have now?")
        value = a + b - c
    elif kind == "groups":
        prompt = f"A box holds {b} {item}s. How many {item}s are there in {c + 1} boxes?"
        value = b * (c + 1)
    else:
        prompt = f"{name} reads {b} pages every day. How many pages does {name} read in {a} days?"
        value = a * b
    return Probe(f"word_problems-{i}", "word_problems", kind, prompt, f"The answer is {value}.", {"value": value})


def _logic(rng: random.Random, i: int) -> Probe:
    if i % 2 == 0:
        people = rng.sample(NAMES, 3)  # tallest first
        ask_tallest = rng.random() < 0.5
        facts = [f"{people[0]} is taller than {people[1]}.", f"{people[1]} is taller than {people[2]}."]
        rng.shuffle(facts)
        answer = people[0] if ask_tallest else people[2]
        prompt = " ".join(facts) + f" Who is the {'tallest' if ask_tallest else 'shortest'}?"
        return Probe(f"logic-{i}", "logic", "ordering", prompt, f"{answer}.",
                     {"answer": answer, "people": sorted(people)})
    x, y, z = rng.sample(NOUNS, 3)
    if rng.random() < 0.5:
        prompt, answer = f"All {x}s are {y}s. All {y}s are {z}s. Is every {x} a {z}? Answer yes or no.", "yes"
    else:
        prompt, answer = f"All {x}s are {y}s. No {y} is a {z}. Can a {x} be a {z}? Answer yes or no.", "no"
    return Probe(f"logic-{i}", "logic", "syllogism", prompt, answer.capitalize() + ".", {"answer": answer})


def _instruction(rng: random.Random, i: int) -> Probe:
    kind = ("word_limit", "json", "keyword")[i % 3]
    topic = rng.choice(TOPICS)
    if kind == "word_limit":
        n = rng.randint(5, 12)
        return Probe(f"instructions-{i}", "instructions", kind, f"Describe {topic} in at most {n} words.",
                     " ".join(["It", "is", "calm", "and", "wide."][:min(n, 5)]), {"max_words": n})
    if kind == "json":
        obj = {"name": rng.choice(NAMES), "age": rng.randint(18, 90)}
        prompt = (f'Reply with only a JSON object with the keys "name" and "age" for a person called {obj["name"]} '
                  f"who is {obj['age']} years old.")
        return Probe(f"instructions-{i}", "instructions", kind, prompt, json.dumps(obj), {"object": obj})
    keyword = rng.choice(KEYWORDS)
    return Probe(f"instructions-{i}", "instructions", kind,
                 f'Write one sentence about {topic} that includes the word "{keyword}".',
                 f"Thinking of {topic} feels {keyword} to me.", {"keyword": keyword})


def _filler(rng: random.Random) -> str:
    return f"{rng.choice(_FILLER_SUBJECTS)} {rng.choice(_FILLER_VERBS)} {rng.choice(_FILLER_OBJECTS)}."


_NEEDLE_INTRO = "Read the text below and answer the question after it."


def _needle(rng: random.Random, i: int, length: int, keys: int, kind: str) -> Probe:
    """A haystack of about ``length`` tokens (the question and Harmony framing included) with the needles."""
    from ..student.generate import harmony_prompt

    encoding = harmony_encoding()
    count = 1 if kind == "single" else keys
    names = set()
    while len(names) < count:
        names.add(f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}")
    needles = {name: str(rng.randint(1_000_000, 9_999_999)) for name in sorted(names)}
    if len(set(needles.values())) < count:  # distinct numbers: a distractor's number must not be the answer
        return _needle(rng, i, length, keys, kind)
    query = rng.choice(sorted(needles))
    question = f"What is the special magic number for {query}? Answer with the number."
    facts = [f"The special magic number for {name} is {value}." for name, value in needles.items()]
    frame = _NEEDLE_INTRO + "\n\n" + " ".join(facts) + "\n\n" + question
    budget = length - len(harmony_prompt(frame, reasoning_effort="low"))  # as evaluate renders it
    sentences, used = [], 0
    while True:
        sentence = _filler(rng)
        used += len(encoding.encode(" " + sentence, allowed_special="all"))
        if used > budget:
            break
        sentences.append(sentence)
    for fact in facts:
        sentences.insert(rng.randint(0, len(sentences)), fact)
    prompt = _NEEDLE_INTRO + "\n\n" + " ".join(sentences) + "\n\n" + question
    return Probe(f"needle-{kind}-{length}-{i}", "needle", kind, prompt,
                 f"The special magic number for {query} is {needles[query]}.",
                 {"value": needles[query], "distractors": [v for k, v in needles.items() if k != query]},
                 context_tokens=length)


def make_probes(spec: dict, seed: int) -> list[Probe]:
    """Probes for ``spec`` = {family: count, ..., "needle": {"lengths": [...], "samples": n, "keys": k}}; each
    family draws from its own seeded generator, so changing one count leaves the other families unchanged."""
    unknown = set(spec) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown probe families {sorted(unknown)}; known: {list(FAMILIES)}")
    makers = {"arithmetic": _arithmetic, "word_problems": _word_problem, "logic": _logic,
              "instructions": _instruction}
    probes = []
    for family in FAMILIES:
        if family not in spec:
            continue
        rng = random.Random(f"{seed}-{family}")
        if family == "needle":
            needle = spec[family]
            for length in needle["lengths"]:
                for kind in ("single", "multi"):
                    probes += [_needle(rng, i, length, needle["keys"], kind) for i in range(needle["samples"])]
        else:
            probes += [makers[family](rng, i) for i in range(spec[family])]
    return probes
