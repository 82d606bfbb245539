"""Harmony prompt rendering and reply parsing used by `megatron-student generate`."""

from openai_harmony import Conversation, Message, RenderConversationConfig, Role

from megatron_student.harmony_vocab import harmony_encoding
from megatron_student.student.generate import harmony_prompt, parse_reply


def test_prompt_ends_with_assistant_header():
    enc = harmony_encoding()
    prompt = harmony_prompt("What is 2+2?", developer="Be brief.", reasoning_effort="high")
    text = enc.decode(prompt)
    assert text.endswith("<|start|>assistant")
    assert "Reasoning: high" in text and "Be brief." in text and "What is 2+2?" in text


def test_parse_reply_reads_both_channels_and_flags_bad_streams():
    enc = harmony_encoding()
    convo = Conversation.from_messages([
        Message.from_role_and_content(Role.ASSISTANT, "Two plus two.").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, "4").with_channel("final"),
    ])
    rendered = enc.render_conversation_for_training(convo, RenderConversationConfig(auto_drop_analysis=False))
    # the model continues after "<|start|>assistant": drop those two tokens
    completion = rendered[2:]
    reply = parse_reply(completion)
    assert (reply.analysis, reply.final, reply.error) == ("Two plus two.", "4", None)
    only_analysis = enc.render_conversation(Conversation.from_messages(convo.messages[:1]))[2:]
    assert parse_reply(only_analysis).error.startswith("wrong_stop_token") and "missing_final" in parse_reply(only_analysis).error
    assert parse_reply(enc.encode("just text")).error.startswith("unparseable")
