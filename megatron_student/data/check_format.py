"""Harmony format compliance of token streams, and `megatron-student check-format`.

``check_tokens(tokens)`` parses one stream with openai-harmony's ``StreamableParser`` (strict) while
tracking which token ends each message, and returns ``FormatIssue``s of these kinds:

- ``invalid_token``: an id outside the model vocabulary (0..201087); checking stops there.
- ``broken_header``: the parser rejects a header, a header holds another special token, an assistant
  message has no or an unknown channel, something other than ``<|start|>`` follows a message, or the
  stream ends inside a header.
- ``leaked_special_token``: a special or reserved token id inside message content, or special-token text
  (``<|end|>`` …) in decoded content.
- ``wrong_stop_token``: a tool call not ending in ``<|call|>``, ``<|call|>``/``<|return|>`` on a message that
  cannot take it, or the stream's last message ending in ``<|end|>`` (a turn ends in ``<|return|>`` or
  ``<|call|>``).
- ``unterminated``: the stream ends inside message content, with no stop token.
- ``tokens_after_stop``: anything but ``<|endoftext|>`` padding after ``<|return|>``.
- ``missing_final`` / ``empty_final``: the last turn has no assistant ``final`` message (and does not end
  in a tool call), or its final text is blank.

Streams are full renderings (start with ``<|start|>``) or generations: what a model emitted after the
prompt's ``<|start|>assistant``; ``role=None`` picks by the first token.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from openai_harmony import HarmonyError, Role, StreamableParser, StreamState

from megatron_student.data.render import MODEL_VOCAB_SIZE
from megatron_student.data.schema import CHANNELS, SPECIAL_TEXT
from megatron_student.harmony_vocab import (CALL, CHANNEL, CONSTRAIN, END, ENDOFTEXT, MESSAGE, RETURN, START,
                                            STARTOFTEXT, harmony_encoding)

ISSUE_KINDS = ("invalid_token", "broken_header", "leaked_special_token", "wrong_stop_token", "unterminated",
               "tokens_after_stop", "missing_final", "empty_final")
FIRST_SPECIAL = STARTOFTEXT
_HEADER_SPECIALS = {CHANNEL, CONSTRAIN, MESSAGE}
_STOPS = {END, RETURN, CALL}
_NO_STOP = -1  # a message the stream ends inside


@dataclass(frozen=True)
class FormatIssue:
    kind: str  # one of ISSUE_KINDS
    position: int  # token index in the stream (-1: the stream as a whole)
    detail: str


@dataclass(frozen=True)
class _Closed:
    role: str
    channel: str | None
    recipient: str | None
    text: str
    stop: int
    position: int  # index of the stop token


MODES = ("auto", "generation", "rendered")


def check_tokens(tokens: Sequence[int], mode: str = "auto") -> list[FormatIssue]:
    """Issues in one token stream; [] when it is well-formed Harmony.

    ``mode``: ``generation`` (tokens a model emitted after ``<|start|>assistant``), ``rendered`` (a full
    rendering, starting with ``<|start|>``) or ``auto`` (rendered if the first token is ``<|start|>``)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    tokens = [int(t) for t in tokens]
    if not tokens:
        return [FormatIssue("missing_final", -1, "empty stream")]
    generation = mode == "generation" or (mode == "auto" and tokens[0] != START)
    encoding = harmony_encoding()
    parser = StreamableParser(encoding, Role.ASSISTANT if generation else None, strict=True)
    issues: list[FormatIssue] = []
    closed: list[_Closed] = []
    end = len(tokens)
    for pos, tok in enumerate(tokens):
        if not 0 <= tok < MODEL_VOCAB_SIZE:
            issues.append(FormatIssue("invalid_token", pos, f"token id {tok} outside 0..{MODEL_VOCAB_SIZE - 1}"))
            return issues
        state = parser.state
        if state == StreamState.EXPECT_START and tok != START:
            if closed and closed[-1].stop in (RETURN, CALL):
                if any(t != ENDOFTEXT for t in tokens[pos:]):
                    issues.append(FormatIssue("tokens_after_stop", pos,
                                              f"{len(tokens) - pos} tokens after {encoding.decode([closed[-1].stop])}"))
            else:
                issues.append(FormatIssue("broken_header", pos,
                                          f"expected <|start|>, got {encoding.decode([tok])!r}"))
            end = pos
            break
        if state == StreamState.HEADER and tok >= FIRST_SPECIAL and tok not in _HEADER_SPECIALS:
            issues.append(FormatIssue("broken_header", pos, f"{encoding.decode([tok])} inside a message header"))
            return issues
        if state == StreamState.CONTENT:
            if tok in _STOPS:
                closed.append(_Closed(parser.current_role.value if parser.current_role else "",
                                      parser.current_channel, parser.current_recipient,
                                      parser.current_content, tok, pos))
            elif tok >= FIRST_SPECIAL:
                issues.append(FormatIssue("leaked_special_token", pos,
                                          f"{encoding.decode([tok])} inside {parser.current_channel or 'message'} content"))
        try:
            parser.process(tok)
        except HarmonyError as e:
            issues.append(FormatIssue("broken_header", pos, str(e)))
            return issues
    if end == len(tokens):
        if parser.state == StreamState.HEADER:
            issues.append(FormatIssue("broken_header", len(tokens), "stream ends inside a message header"))
            return issues
        if parser.state == StreamState.CONTENT:
            issues.append(FormatIssue("unterminated", len(tokens), "stream ends inside message content"))
            closed.append(_Closed(parser.current_role.value if parser.current_role else "", parser.current_channel,
                                  parser.current_recipient, parser.current_content, _NO_STOP, len(tokens)))
    # After a structural break the turn is unknown: only per-message checks still mean something.
    issues.extend(_message_issues(closed, encoding, whole_stream=not issues or issues[-1].kind != "broken_header"))
    return issues


def _message_issues(closed: list[_Closed], encoding, whole_stream: bool) -> list[FormatIssue]:
    issues = []
    for i, m in enumerate(closed):
        last = whole_stream and i == len(closed) - 1
        leaked = SPECIAL_TEXT.search(m.text)
        if leaked:
            issues.append(FormatIssue("leaked_special_token", m.position, f"text {leaked.group()!r} in content"))
        if m.stop == _NO_STOP:
            continue  # reported as unterminated
        stop = encoding.decode([m.stop])
        if m.role == "assistant":
            if m.channel not in CHANNELS:
                issues.append(FormatIssue("broken_header", m.position,
                                          f"assistant message on channel {m.channel!r}, not one of {CHANNELS}"))
            tool_call = m.recipient is not None and m.recipient != "assistant"
            if tool_call and m.stop != CALL:
                issues.append(FormatIssue("wrong_stop_token", m.position, f"tool call to {m.recipient} ends with {stop}"))
            elif not tool_call and m.stop == CALL:
                issues.append(FormatIssue("wrong_stop_token", m.position, "<|call|> on a message without a recipient"))
            elif m.stop == RETURN and m.channel != "final":
                issues.append(FormatIssue("wrong_stop_token", m.position, f"<|return|> ends a {m.channel} message"))
        elif m.stop != END:
            issues.append(FormatIssue("wrong_stop_token", m.position, f"{m.role} message ends with {stop}"))
        if m.stop == RETURN and not last:
            issues.append(FormatIssue("wrong_stop_token", m.position, "<|return|> before the end of the stream"))
        if last and m.stop == END:
            issues.append(FormatIssue("wrong_stop_token", m.position,
                                      "the last message ends with <|end|>; a turn ends with <|return|> or <|call|>"))
    if not whole_stream:
        return issues
    turn_start = max((i + 1 for i, m in enumerate(closed) if m.role in ("system", "developer", "user")), default=0)
    turn = closed[turn_start:]
    finals = [m for m in turn if m.role == "assistant" and m.channel == "final"]
    ends_in_call = bool(turn) and turn[-1].stop == CALL
    if not finals and not ends_in_call:
        issues.append(FormatIssue("missing_final", -1, "no assistant final message in the last turn"))
    issues.extend(FormatIssue("empty_final", m.position, "final message text is empty")
                  for m in finals if not m.text.strip())
    return issues


@dataclass
class FormatSummary:
    streams: int
    compliant: int
    issues_by_kind: dict[str, int]  # number of streams with at least one issue of that kind
    examples: list[dict]  # first few failing streams: {"stream": index or label, "issues": [...]}

    @property
    def compliance_rate(self) -> float:
        return self.compliant / self.streams if self.streams else 1.0

    def to_dict(self) -> dict:
        return asdict(self) | {"compliance_rate": self.compliance_rate}

    def table(self) -> str:
        lines = [f"streams     {self.streams}", f"compliant   {self.compliant} ({self.compliance_rate:.1%})"]
        lines += [f"{kind:<22}{self.issues_by_kind.get(kind, 0)}" for kind in ISSUE_KINDS]
        return "\n".join(lines)


def summarize(results: Iterable[tuple[object, list[FormatIssue]]], max_examples: int = 10) -> FormatSummary:
    """Aggregate ``(label, check_tokens(...))`` pairs; labels name streams in the examples."""
    streams = compliant = 0
    by_kind: Counter = Counter()
    examples = []
    for label, issues in results:
        streams += 1
        if not issues:
            compliant += 1
            continue
        by_kind.update({i.kind for i in issues})
        if len(examples) < max_examples:
            examples.append({"stream": label, "issues": [asdict(i) for i in issues]})
    return FormatSummary(streams, compliant, dict(by_kind), examples)


def _generation_tokens(value, where: str) -> list[int]:
    if isinstance(value, dict):
        keys = [k for k in ("tokens", "output_ids", "token_ids") if k in value]
        if len(keys) != 1:
            raise ValueError(f"{where}: an object needs exactly one of tokens/output_ids/token_ids")
        value = value[keys[0]]
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ValueError(f"{where}: expected a list of token ids")
    return value


def iter_streams(path: Path, split: str = "train"):
    """(label, tokens) from prepared data (a directory) or a JSONL of token id lists."""
    if path.is_dir():
        from megatron_student.data.storage import HarmonyPackedDataset

        for k, tokens in enumerate(HarmonyPackedDataset(path, split).conversations()):
            yield f"{split}[{k}]", tokens
        return
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e.msg}") from None
            yield where, _generation_tokens(value, where)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="prepare-data output directory, or JSONL with one token id "
                        "list (or {\"tokens\": [...]}) per line")
    parser.add_argument("--split", default="train", help="split to check in a prepared directory")
    parser.add_argument("--mode", choices=MODES, default="auto",
                        help="generation: streams follow <|start|>assistant; rendered: full renderings; "
                        "auto: by the first token")
    parser.add_argument("--report", type=Path, help="write the summary as JSON here")
    parser.add_argument("--max-failure-fraction", type=float, default=0.0,
                        help="exit 1 when more streams than this fraction fail (default 0)")


def run(args: argparse.Namespace) -> int:
    try:
        summary = summarize((label, check_tokens(tokens, args.mode))
                            for label, tokens in iter_streams(args.input, args.split))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.table())
    for example in summary.examples:
        print(f"  {example['stream']}: " + "; ".join(f"{i['kind']}@{i['position']}: {i['detail']}"
                                                     for i in example["issues"]))
    if args.report:
        args.report.write_text(json.dumps(summary.to_dict(), indent=1))
    failed = summary.streams - summary.compliant
    return 1 if summary.streams and failed / summary.streams > args.max_failure_fraction else 0
