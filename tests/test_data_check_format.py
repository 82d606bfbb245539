"""check_tokens: every issue kind on hand-made streams, and the CLI on generation JSONL."""

import json

import pytest

from megatron_student.cli import main as cli_main
from megatron_student.data.check_format import check_tokens, summarize
from megatron_student.data.render import Renderer
from megatron_student.data.schema import parse_record
from megatron_student.harmony_vocab import harmony_encoding


def gen(text: str) -> list[int]:
    """A generation (what follows <|start|>assistant) written with special tokens as text."""
    return harmony_encoding().encode(text, allowed_special="all")


def kinds(tokens, mode="auto"):
    return sorted({i.kind for i in check_tokens(tokens, mode)})


GOOD = "<|channel|>analysis<|message|>2 + 2 = 4<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>"
TOOL_CALL = "<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>{\"q\": 1}<|call|>"


def test_well_formed_generations_and_renderings_pass():
    assert check_tokens(gen(GOOD)) == []
    assert check_tokens(gen(TOOL_CALL)) == []
    assert check_tokens(gen(GOOD) + [199999, 199999]) == []  # EOS padding after <|return|>
    record = {"tools": [{"name": "lookup", "description": "d"}], "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "thinking": "t", "tool_calls": [{"name": "lookup", "arguments": {"q": 1}}]},
        {"role": "tool", "name": "lookup", "content": "r"},
        {"role": "assistant", "content": "a"}]}
    assert check_tokens(Renderer().render(parse_record(record)).input_ids) == []


@pytest.mark.parametrize("stream,expected", [
    ("<|channel|>analysis<|message|>thinking only<|end|>", ["missing_final", "wrong_stop_token"]),
    ("<|channel|>final<|message|>   <|return|>", ["empty_final"]),
    ("<|channel|>final<|message|>4<|end|>", ["wrong_stop_token"]),
    ("<|channel|>analysis<|message|>x<|return|>", ["missing_final", "wrong_stop_token"]),
    ("<|channel|>commentary to=functions.f<|message|>{}<|return|>", ["missing_final", "wrong_stop_token"]),
    ("<|channel|>final<|message|>4<|call|>", ["wrong_stop_token"]),
    ("<|channel|>final<|message|>4 and more", ["unterminated"]),
    ("<|channel|>final<|message|>4<|return|>trailing", ["tokens_after_stop"]),
    ("<|channel|>final<|message|>a<|start|>b<|return|>", ["leaked_special_token"]),
    ("<|channel|>final<|message|>a<|reserved_200020|>b<|return|>", ["leaked_special_token"]),
    ("<|channel|>final<|message|>text <|end|> text<|return|>", ["leaked_special_token"]),
    ("<|channel|><|message|>x<|return|>", ["broken_header"]),
    ("<|channel|>final<|end|><|message|>x<|return|>", ["broken_header"]),
    ("<|channel|>chat<|message|>x<|return|>", ["broken_header", "missing_final", "wrong_stop_token"]),
    ("<|channel|>final", ["broken_header"]),
    ("<|channel|>analysis<|message|>x<|end|>assistant<|channel|>final<|message|>4<|return|>", ["broken_header"]),
])
def test_each_failure_kind(stream, expected):
    tokens = gen(stream)
    if "text <|end|> text" in stream:  # special-token *text* inside content, not the special id
        enc = harmony_encoding()
        tokens = gen("<|channel|>final<|message|>") + enc.encode("text <|end|> text", disallowed_special=()) + [200002]
    assert kinds(tokens, "generation") == sorted(expected)


def test_invalid_token_and_rendering_mode():
    assert kinds(gen(GOOD)[:3] + [201088] + gen(GOOD)[3:]) == ["invalid_token"]
    assert kinds(gen(GOOD), "rendered") == ["broken_header"]  # a rendering must open with <|start|>
    issues = check_tokens(gen("<|channel|>final<|message|>4<|end|>"), "generation")
    assert issues[0].position == len(gen("<|channel|>final<|message|>4<|end|>")) - 1


def test_summary_and_cli_on_generations(tmp_path, capsys):
    lines = [gen(GOOD), {"tokens": gen(TOOL_CALL)}, gen("<|channel|>final<|message|>4<|end|>"),
             {"output_ids": gen("<|channel|>final<|message|><|return|>")}]
    path = tmp_path / "gens.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    summary = summarize((i, check_tokens(t if isinstance(t, list) else next(iter(t.values()))))
                        for i, t in enumerate(lines))
    assert (summary.streams, summary.compliant) == (4, 2)
    assert summary.issues_by_kind == {"wrong_stop_token": 1, "empty_final": 1}
    report = tmp_path / "report.json"
    assert cli_main(["check-format", str(path), "--report", str(report)]) == 1
    assert f"{path}:3" in capsys.readouterr().out
    assert json.loads(report.read_text())["compliance_rate"] == 0.5
    assert cli_main(["check-format", str(path), "--max-failure-fraction", "0.5"]) == 0
    path.write_text('{"tokens": [1, "x"]}\n')
    assert cli_main(["check-format", str(path)]) == 2
    assert f"{path}:1: expected a list of token ids" in capsys.readouterr().err
