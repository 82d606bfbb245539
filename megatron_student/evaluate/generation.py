"""Generation behaviour of Harmony completions: format compliance (``data.check_format``), per-channel lengths,
repetition, empty finals and tokens after the stop token.

A completion is what a model emitted after the prompt's ``<|start|>assistant``. Messages are recovered from the
tokens alone (header up to ``<|message|>``, content up to ``<|end|>``/``<|return|>``/``<|call|>`` or the end of
the stream), so malformed completions are measured too. The repetition rate of a message is the fraction of its
n-grams that repeat an earlier n-gram of the same message (0: none repeated; a model stuck in a loop tends to 1).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ..data.check_format import CHANNEL, check_tokens, summarize
from ..harmony_vocab import CALL, END, ENDOFTEXT, MESSAGE, RETURN, START
from ..harmony_vocab import harmony_encoding

STOPS = (END, RETURN, CALL)


@dataclass
class Message:
    channel: str | None  # None: no <|channel|> in the header
    content: list[int]
    stop: int | None  # the stop token, None when the stream ends inside the content


def split_messages(tokens: list[int]) -> list[Message]:
    """The messages of a completion (the first header has no ``<|start|>``: the prompt ended with it)."""
    enc = harmony_encoding()
    messages, i, n = [], 0, len(tokens)
    while i < n:
        try:
            body = tokens.index(MESSAGE, i)
        except ValueError:
            break  # a header without content
        header = tokens[i:body]
        channel = None
        if CHANNEL in header:
            words = enc.decode([t for t in header[header.index(CHANNEL) + 1:] if t < ENDOFTEXT]).split()
            channel = words[0] if words else ""
        j = body + 1
        while j < n and tokens[j] not in STOPS:
            j += 1
        messages.append(Message(channel, tokens[body + 1:j], tokens[j] if j < n else None))
        if j >= n or tokens[j] != END or j + 1 >= n or tokens[j + 1] != START:
            break
        i = j + 2
    return messages


def repetition_rate(tokens: list[int], n: int = 4) -> float:
    """Fraction of the n-grams of ``tokens`` that already occurred earlier in it (0 with fewer than n tokens)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def tokens_after_stop(tokens: list[int]) -> int:
    """Tokens other than ``<|endoftext|>`` padding after the first ``<|return|>`` or ``<|call|>``."""
    for i, t in enumerate(tokens):
        if t in (RETURN, CALL):
            return sum(1 for u in tokens[i + 1:] if u != ENDOFTEXT)
    return 0


def completion_record(tokens: list[int], ngram: int = 4) -> dict:
    """What one completion shows: format issues, channel lengths, repetition, empty final, tokens after stop."""
    issues = check_tokens(tokens, mode="generation")
    messages = split_messages(tokens)
    analysis = [t for m in messages if m.channel == "analysis" for t in m.content]
    finals = [m for m in messages if m.channel == "final"]
    final = [t for m in finals for t in m.content]
    return {
        "tokens": len(tokens),
        "issues": sorted({i.kind for i in issues}),
        "analysis_tokens": len(analysis),
        "final_tokens": len(final),
        "repetition": max((repetition_rate(m.content, ngram) for m in messages), default=0.0),
        "empty_final": bool(finals) and not harmony_encoding().decode(final).strip(),
        "tokens_after_stop": tokens_after_stop(tokens),
    }


def _distribution(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def quantile(q):
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"count": len(values), "mean": statistics.fmean(values), "p50": quantile(0.5), "p90": quantile(0.9),
            "max": ordered[-1], "values": values}


def summarize_completions(labelled: list[tuple[str, str, list[int]]], ngram: int = 4) -> dict:
    """``labelled``: (label, kind, completion tokens). Compliance overall and by prompt kind, length
    distributions of the analysis and final channels, mean/max repetition, empty finals and tokens after stop."""
    records = [completion_record(tokens, ngram) for _, _, tokens in labelled]
    overall = summarize((label, check_tokens(tokens, mode="generation")) for label, _, tokens in labelled)
    by_kind: dict[str, list[bool]] = {}
    for (_, kind, _), record in zip(labelled, records):
        by_kind.setdefault(kind, []).append(not record["issues"])
    repetition = [r["repetition"] for r in records]
    return {
        "compliance": overall.to_dict(),
        "compliance_rate": overall.compliance_rate,
        "compliance_by_kind": {k: sum(v) / len(v) for k, v in by_kind.items()},
        "analysis_tokens": _distribution([r["analysis_tokens"] for r in records]),
        "final_tokens": _distribution([r["final_tokens"] for r in records]),
        "repetition_mean": statistics.fmean(repetition) if repetition else 0.0,
        "repetition_max": max(repetition, default=0.0),
        "empty_final_rate": sum(r["empty_final"] for r in records) / len(records) if records else 0.0,
        "tokens_after_stop": sum(r["tokens_after_stop"] for r in records),
        "records": [{"label": label, "kind": kind, **r} for (label, kind, _), r in zip(labelled, records)],
    }
