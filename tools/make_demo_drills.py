"""Write ``megatron_student/assets/demo_drills.jsonl``: single-turn Harmony conversations from templates with a fixed
seed (arithmetic, linear equations, lists, comparisons, capitals, translations, one-line Python functions).

The demo's tiny teacher learns the Harmony format from the bundled conversations; with the 112 hand-written ones
alone it ended about one demo prompt in seven in the wrong place (an analysis closed by ``<|return|>``, a channel
header inside a message). These drills repeat the format over varied content. No prompt of the demo's evaluation
suite (``assets/eval_suite_demo.yaml``) is generated: the suite stays held out.

    python tools/make_demo_drills.py [--count 300] [--output megatron_student/assets/demo_drills.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import yaml

ASSETS = Path(__file__).resolve().parents[1] / "megatron_student" / "assets"
CAPITALS = {"Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo", "Peru": "Lima", "Egypt": "Cairo",
            "Canada": "Ottawa", "Kenya": "Nairobi", "Norway": "Oslo", "Chile": "Santiago", "India": "New Delhi"}
WORDS = {"hello": ("French", "bonjour"), "water": ("German", "Wasser"), "cat": ("Spanish", "gato"),
         "good night": ("Italian", "buona notte"), "yes": ("Japanese", "hai"), "book": ("French", "livre"),
         "friend": ("Spanish", "amigo"), "house": ("German", "Haus")}
FUNCTIONS = [
    ("returns the square of a number", "square", "def square(x: int) -> int:\n    return x * x"),
    ("checks whether a number is odd", "is_odd", "def is_odd(n: int) -> bool:\n    return n % 2 == 1"),
    ("returns the last element of a list", "last", "def last(xs: list):\n    return xs[-1]"),
    ("counts the vowels in a string", "count_vowels",
     "def count_vowels(s: str) -> int:\n    return sum(c in 'aeiou' for c in s.lower())"),
    ("returns the absolute value of a number", "absolute", "def absolute(x: float) -> float:\n    return -x if x < 0 else x"),
    ("joins a list of words with spaces", "join_words", "def join_words(words: list[str]) -> str:\n    return ' '.join(words)"),
    ("returns the larger of two numbers", "larger", "def larger(a: int, b: int) -> int:\n    return a if a >= b else b"),
    ("doubles every item of a list", "double_all", "def double_all(xs: list[int]) -> list[int]:\n    return [2 * x for x in xs]"),
]
SEQUENCES = {"even numbers": lambda k: 2 * k, "multiples of 3": lambda k: 3 * k, "odd numbers": lambda k: 2 * k - 1}


def drill(rng: random.Random) -> tuple[str, str, str]:
    """(user prompt, analysis, final) of one templated exchange."""
    kind = rng.choice(["add", "sub", "mul", "equation", "capital", "translate", "code", "sequence", "compare"])
    if kind in ("add", "sub", "mul"):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op, result = {"add": ("+", a + b), "sub": ("-", a - b), "mul": ("*", a * b)}[kind]
        prompt = rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"Quick: {a}{op}{b}",
                             f"How much is {a} {op} {b}?"])
        return (prompt, f"The user asks for {a} {op} {b}. Compute: {a} {op} {b} = {result}. Double-check: yes, {result}.",
                f"{a} {op} {b} = {result}.")
    if kind == "equation":
        a, x, b = rng.randint(2, 9), rng.randint(1, 20), rng.randint(1, 30)
        c = a * x + b
        return (f"Solve {a}x + {b} = {c}.",
                f"Subtract {b} from both sides: {a}x = {c - b}.\nDivide by {a}: x = {x}.\nCheck: {a}*{x} + {b} = {c}.",
                f"x = {x}")
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        city = CAPITALS[country]
        return (f"What is the capital of {country}?", f"Okay, the user asks for the capital of {country}. Answer: {city}.",
                f"The capital of {country} is {city}.")
    if kind == "translate":
        word = rng.choice(sorted(WORDS))
        language, translation = WORDS[word]
        return (f"Translate '{word}' to {language}.",
                f"Okay, the user asks: translate '{word}' to {language}. Answer: {translation}.",
                f"'{word}' in {language} is '{translation}'.")
    if kind == "code":
        description, name, body = rng.choice(FUNCTIONS)
        return (f"Write a Python function that {description}.",
                f"The user wants a function that {description}. One line is enough.",
                f"```python\n{body}\n```\n`{name}` {description}.")
    if kind == "sequence":
        n, what = rng.randint(3, 8), rng.choice(sorted(SEQUENCES))
        items = ", ".join(str(SEQUENCES[what](k)) for k in range(1, n + 1))
        return f"List the first {n} {what}.", f"The first {n} {what}: {items}.", items
    a, b = rng.sample(range(1, 200), 2)
    return f"Which is larger, {a} or {b}?", f"Compare {a} and {b}: {max(a, b)} is larger.", f"{max(a, b)} is larger."


def drills(count: int, seed: int = 0) -> list[dict]:
    held_out = {p["prompt"] for p in yaml.safe_load((ASSETS / "eval_suite_demo.yaml").read_text())["generation"]["prompts"]}
    rng = random.Random(seed)
    records = []
    while len(records) < count:
        prompt, analysis, final = drill(rng)
        if prompt in held_out:
            continue
        records.append({"id": f"drill-{len(records):03d}", "reasoning_effort": rng.choice(["low", "medium", "high"]),
                        "messages": [{"role": "user", "content": prompt},
                                     {"role": "assistant", "thinking": analysis, "content": final}]})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--output", type=Path, default=ASSETS / "demo_drills.jsonl")
    args = parser.parse_args()
    args.output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in drills(args.count)))
    print(f"wrote {args.count} conversations to {args.output}")


if __name__ == "__main__":
    main()
