"""Rendering: round trip through openai-harmony, masks against Harmony's own stream parser, drop rules."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai_harmony import Conversation, Role, StreamableParser, StreamState

from megatron_student.data.render import (
    FLAG_ANALYSIS,
    FLAG_COMMENTARY,
    FLAG_FINAL,
    FLAG_LABEL,
    START,
    RenderConfig,
    Renderer,
    kept_messages,
)
from megatron_student.data.schema import parse_record
from megatron_student.data.weighting import HeuristicWeighter, token_weights
from megatron_student.harmony_vocab import harmony_encoding

TOOL = {"name": "lookup", "description": "Look something up",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}

text = st.lists(st.sampled_from(list("abcdefxyz0123456789 +-*=().,:;{}`\n") + ["é", "中", "😀", "def ", "Okay, "]),
                min_size=1, max_size=25).map("".join).filter(lambda s: s.strip())


@st.composite
def assistant_turn(draw, with_tools: bool):
    messages = []
    if draw(st.booleans()):  # explicit channels
        if draw(st.booleans()):
            messages.append({"role": "assistant", "channel": "analysis", "content": draw(text)})
        messages.append({"role": "assistant", "channel": "final", "content": draw(text)})
        return messages
    for _ in range(draw(st.integers(0, 2)) if with_tools else 0):
        call = {"role": "assistant", "tool_calls": [{"name": "lookup", "arguments": {"q": draw(text)}}]}
        if draw(st.booleans()):
            call["thinking"] = draw(text)
        if draw(st.booleans()):
            call["content"] = draw(text)  # a preamble
        messages += [call, {"role": "tool", "name": "lookup", "content": draw(text)}]
    final = {"role": "assistant", "content": draw(text)}
    if draw(st.booleans()):
        final[draw(st.sampled_from(["thinking", "reasoning_content"]))] = draw(text)
    return messages + [final]


@st.composite
def conversations(draw):
    with_tools = draw(st.booleans())
    record = {"messages": []}
    if with_tools:
        record["tools"] = [TOOL]
    if draw(st.booleans()):
        record["developer"] = draw(text)
    if draw(st.booleans()):
        record["reasoning_effort"] = draw(st.sampled_from(["low", "medium", "high"]))
    for _ in range(draw(st.integers(1, 3))):
        record["messages"].append({"role": "user", "content": draw(text)})
        record["messages"] += draw(assistant_turn(with_tools))
    return record


def parser_labels(tokens):
    """Per token, from Harmony's StreamableParser alone: (message index, channel of the content it belongs
    to or None for header tokens), plus the parsed messages."""
    parser = StreamableParser(harmony_encoding(), None, strict=True)
    out, index = [], -1
    for tok in tokens:
        if tok == START and parser.state == StreamState.EXPECT_START:
            index += 1
        in_content = parser.state == StreamState.CONTENT  # content and its stop token
        out.append((index, parser.current_channel if in_content else None,
                    parser.current_role if in_content else None))
        parser.process(int(tok))
    assert parser.state == StreamState.EXPECT_START
    return out, parser.messages


def expected_flags(tokens, scope_turn_start=None):
    labels, messages = parser_labels(tokens)
    flags = np.zeros(len(tokens), dtype=np.uint8)
    last_user = max(i for i, m in enumerate(messages) if m.author.role in (Role.USER, Role.SYSTEM, Role.DEVELOPER))
    for t, (index, channel, role) in enumerate(labels):
        message = messages[index]
        if role == Role.ASSISTANT:
            flags[t] |= {"analysis": FLAG_ANALYSIS, "final": FLAG_FINAL, "commentary": FLAG_COMMENTARY}[channel]
        if message.author.role == Role.ASSISTANT and (scope_turn_start is None or index > last_user):
            opens_turn = messages[index - 1].author.role != Role.ASSISTANT
            first_of_message = t == 0 or labels[t - 1][0] != index
            second_of_message = t >= 2 and labels[t - 2][0] != index and labels[t - 1][0] == index
            if not (opens_turn and (first_of_message or second_of_message)):
                flags[t] |= FLAG_LABEL
    return flags, messages


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations(), st.sampled_from(["harmony", "drop", "keep"]), st.sampled_from(["assistant", "final_turn"]))
def test_masks_match_harmony_parser(record, earlier, scope):
    renderer = Renderer(RenderConfig(earlier_analysis=earlier, label_scope=scope))
    parsed = parse_record(record)
    out = renderer.render(parsed)
    flags, messages = expected_flags(out.input_ids, scope_turn_start=True if scope == "final_turn" else None)
    np.testing.assert_array_equal(out.flags, flags)
    # the trained turn keeps every analysis message; the rendered messages are exactly the kept ones
    kept = [parsed.messages[i] for i in kept_messages(parsed, renderer.config)]
    assert [(m.author.role.value, m.channel, m.content[0].text if m.author.role != Role.SYSTEM and
             m.author.role != Role.DEVELOPER else "") for m in messages] == \
        [(k.role, k.channel, k.text) for k in kept]
    trained_analysis = [m for m in parsed.messages[parsed.turn_start:] if m.channel == "analysis"]
    assert all(m in kept for m in trained_analysis)
    # weights only differ from 1 on analysis content tokens
    assert np.all(out.analysis_weight[(out.flags & FLAG_ANALYSIS) == 0] == 1.0)


@settings(max_examples=100, deadline=None)
@given(conversations())
def test_render_detokenize_parse_round_trip(record):
    enc = harmony_encoding()
    parsed = parse_record(record)
    out = Renderer(RenderConfig(earlier_analysis="keep")).render(parsed)
    text = enc.decode(out.input_ids.tolist())
    retokenized = enc.encode(text, allowed_special="all")
    original = enc.parse_messages_from_completion_tokens(out.input_ids.tolist(), None)
    again = enc.parse_messages_from_completion_tokens(retokenized, None)
    assert again == original
    body = [m for m in original if m.author.role not in (Role.SYSTEM, Role.DEVELOPER)]
    assert [(m.author.role.value, m.author.name, m.channel, m.recipient, m.content[0].text) for m in body] == \
        [(h.role, h.message.author.name, h.channel, h.message.recipient, h.text)
         for h in parsed.messages if h.role not in ("system", "developer")]
    assert out.input_ids[-1] == (200012 if parsed.messages[-1].message.recipient else 200002)


def two_turn():
    return {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "thinking": "first thoughts", "content": "hello"},
        {"role": "user", "content": "and 2+2?"},
        {"role": "assistant", "thinking": "2 + 2 = 4", "content": "4"}]}


def test_harmony_policy_equals_harmony_default_on_multi_turn():
    enc = harmony_encoding()
    parsed = parse_record(two_turn())
    ours = Renderer(RenderConfig(earlier_analysis="harmony")).render(parsed).input_ids.tolist()
    default = enc.render_conversation_for_training(Conversation.from_messages([m.message for m in parsed.messages]))
    assert ours == default
    assert "first thoughts" not in enc.decode(ours) and "2 + 2 = 4" in enc.decode(ours)


def test_single_turn_keeps_the_trained_analysis_that_harmony_default_drops():
    enc = harmony_encoding()
    parsed = parse_record({"prompt": "2+2?", "thinking": "2 + 2 = 4", "response": "4"})
    ours = enc.decode(Renderer().render(parsed).input_ids.tolist())
    default = enc.decode(enc.render_conversation_for_training(Conversation.from_messages([m.message for m in parsed.messages])))
    assert "<|channel|>analysis<|message|>2 + 2 = 4<|end|>" in ours
    assert "2 + 2 = 4" not in default


@pytest.mark.parametrize("policy,kept_first", [("drop", False), ("keep", True)])
def test_earlier_analysis_policies(policy, kept_first):
    out = Renderer(RenderConfig(earlier_analysis=policy)).render(parse_record(two_turn()))
    assert ("first thoughts" in harmony_encoding().decode(out.input_ids.tolist())) == kept_first


def test_label_scope_all_and_final_turn():
    parsed = parse_record(two_turn())
    everything = Renderer(RenderConfig(label_scope="all")).render(parsed)
    assert everything.flags[0] & FLAG_LABEL == 0 and np.all(everything.flags[1:] & FLAG_LABEL)
    last = Renderer(RenderConfig(label_scope="final_turn")).render(parsed)
    labelled = harmony_encoding().decode(last.input_ids[(last.flags & FLAG_LABEL) != 0].tolist())
    assert "hello" not in labelled and labelled.endswith("4<|return|>")
    assert (last.labels[(last.flags & FLAG_LABEL) == 0] == -100).all()


def test_heuristic_weighting_by_chunk():
    enc = harmony_encoding()
    text = "Okay, the user wants a sum.\nCompute 12 * 7 = 84.\n```python\nprint(84)\n```\nThat is the answer."
    tokens = np.array(enc.encode(text, allowed_special=set()))
    weights = token_weights(HeuristicWeighter(), text, tokens)
    by_piece = {}
    for tok, w in zip(tokens, weights):
        by_piece.setdefault(float(w), []).append(int(tok))
    assert "Okay, the user wants a sum." in enc.decode(by_piece[0.5])
    assert "12 * 7 = 84" in enc.decode(by_piece[1.5]) and "print(84)" in enc.decode(by_piece[1.5])
    assert "That is the answer." in enc.decode(by_piece[1.0])


def test_weights_follow_multibyte_text():
    enc = harmony_encoding()
    text = "中文 😀 prose.\nx = 3 + 4 é"
    tokens = np.array(enc.encode(text, allowed_special=set()))
    weights = token_weights(HeuristicWeighter(math_weight=2.0), text, tokens)
    heavy = enc.decode([int(t) for t, w in zip(tokens, weights) if w == 2.0])
    assert heavy == "x = 3 + 4 é"
