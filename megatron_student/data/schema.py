"""Input schema: one JSON object per line, turned into Harmony messages.

Two record shapes are accepted (see README "Harmony data" for the full table):

* conversations: ``{"messages": [...], "reasoning_effort"?, "developer"?, "tools"?, "id"?, "metadata"?, ...}``
* pairs: ``{"prompt": str, "response": str, "thinking"?, "developer"?, "reasoning_effort"?, "id"?, ...}``

Unknown keys are errors, not ignored: a misspelt ``reasoning`` field would otherwise vanish from training.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from openai_harmony import (
    Author,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
)

CHANNELS = ("analysis", "commentary", "final")
_EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
# Harmony encodes these as plain text inside content, but a text-level parser downstream would not.
SPECIAL_TEXT = re.compile(r"<\|(?:start|end|message|channel|constrain|return|call|endoftext|startoftext|reserved_\d+)\|>")

_SYSTEM_KEYS = {"model_identity", "knowledge_cutoff", "conversation_start_date"}
_CONVERSATION_KEYS = {"id", "metadata", "messages", "reasoning_effort", "developer", "tools"} | _SYSTEM_KEYS
_PAIR_KEYS = {"id", "metadata", "prompt", "response", "thinking", "reasoning_content", "reasoning_effort",
              "developer", "tools"} | _SYSTEM_KEYS
_MESSAGE_KEYS = {
    "system": {"role", "content"},
    "developer": {"role", "content"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "thinking", "reasoning_content", "tool_calls", "channel", "recipient",
                  "content_type"},
    "tool": {"role", "content", "name"},
}


class RecordError(ValueError):
    """A record that cannot be converted; the message is the reject reason."""


@dataclass(frozen=True)
class HarmonyMessage:
    """One Harmony message plus the plain facts the renderer needs without touching pydantic objects."""

    message: Message
    role: str  # "system", "developer", "user", "assistant" or "tool"
    channel: str | None
    text: str


@dataclass(frozen=True)
class ParsedConversation:
    messages: list[HarmonyMessage]
    # Index of the first message of the trained (last) assistant turn: everything after the last
    # system/developer/user message. Tool results inside that turn belong to it.
    turn_start: int
    has_function_tools: bool


def _text(value, where: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{where} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"{where} is empty")
    match = SPECIAL_TEXT.search(value)
    if match:
        raise RecordError(f"{where} contains Harmony special-token text {match.group()!r}")
    return value


def _check_keys(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise RecordError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}")


def _tool_name(name, where: str) -> str:
    name = _text(name, where, allow_empty=False)
    if re.search(r"\s", name):
        raise RecordError(f"{where} {name!r} contains whitespace")
    # Harmony addresses developer-defined functions as functions.<name>.
    return name if "." in name else f"functions.{name}"


def _thinking(msg: dict, where: str) -> str | None:
    thinking, reasoning = msg.get("thinking"), msg.get("reasoning_content")
    if thinking is not None and reasoning is not None and thinking != reasoning:
        raise RecordError(f"{where} has both 'thinking' and 'reasoning_content' with different text")
    value = thinking if thinking is not None else reasoning
    return None if value is None else _text(value, f"{where}.thinking", allow_empty=False)


def _assistant(role: str, text: str, channel: str, recipient: str | None = None,
               content_type: str | None = None) -> HarmonyMessage:
    message = Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)
    if recipient is not None:
        message = message.with_recipient(recipient)
    if content_type is not None:
        message = message.with_content_type(content_type)
    return HarmonyMessage(message, role, channel, text)


def _assistant_messages(msg: dict, where: str) -> list[HarmonyMessage]:
    if "channel" in msg:
        if {"thinking", "reasoning_content", "tool_calls"} & set(msg):
            raise RecordError(f"{where} mixes an explicit 'channel' with thinking/tool_calls")
        channel = msg["channel"]
        if channel not in CHANNELS:
            raise RecordError(f"{where}.channel {channel!r} is not one of {', '.join(CHANNELS)}")
        text = _text(msg.get("content"), f"{where}.content", allow_empty=channel != "final")
        recipient = msg.get("recipient")
        if recipient is not None:
            recipient = _tool_name(recipient, f"{where}.recipient")
        content_type = msg.get("content_type")
        if content_type is not None:
            content_type = _text(content_type, f"{where}.content_type", allow_empty=False)
        if channel == "final" and recipient is not None:
            raise RecordError(f"{where} is a final message with a recipient; tool calls go to commentary")
        return [_assistant("assistant", text, channel, recipient, content_type)]
    if "recipient" in msg or "content_type" in msg:
        raise RecordError(f"{where} has 'recipient'/'content_type' without an explicit 'channel'")

    out: list[HarmonyMessage] = []
    thinking = _thinking(msg, where)
    if thinking is not None:
        out.append(_assistant("assistant", thinking, "analysis"))
    calls = msg.get("tool_calls")
    content = msg.get("content")
    if calls is not None:
        if not isinstance(calls, list) or not calls:
            raise RecordError(f"{where}.tool_calls must be a non-empty list")
        if content is not None and content != "":
            # Text beside a tool call is a user-visible preamble: Harmony puts it on commentary.
            out.append(_assistant("assistant", _text(content, f"{where}.content"), "commentary"))
        for j, call in enumerate(calls):
            cwhere = f"{where}.tool_calls[{j}]"
            if not isinstance(call, dict):
                raise RecordError(f"{cwhere} must be an object")
            _check_keys(call, {"name", "arguments"}, cwhere)
            args = call.get("arguments", {})
            if isinstance(args, dict):
                args = json.dumps(args, ensure_ascii=False)
            args = _text(args, f"{cwhere}.arguments")
            out.append(_assistant("assistant", args, "commentary", _tool_name(call.get("name"), f"{cwhere}.name"),
                                  "<|constrain|>json"))
        return out
    out.append(_assistant("assistant", _text(content, f"{where}.content", allow_empty=False), "final"))
    return out


def _tools(raw, where: str) -> list[ToolDescription]:
    if not isinstance(raw, list):
        raise RecordError(f"{where} must be a list of tool descriptions")
    tools = []
    for j, tool in enumerate(raw):
        twhere = f"{where}[{j}]"
        if not isinstance(tool, dict):
            raise RecordError(f"{twhere} must be an object")
        _check_keys(tool, {"name", "description", "parameters"}, twhere)
        name = _text(tool.get("name"), f"{twhere}.name", allow_empty=False)
        if "." in name or re.search(r"\s", name):
            raise RecordError(f"{twhere}.name {name!r} must be a bare identifier (it lives in 'functions')")
        params = tool.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise RecordError(f"{twhere}.parameters must be a JSON-schema object")
            _text(json.dumps(params, ensure_ascii=False), f"{twhere}.parameters")  # rendered into the prompt too
        tools.append(ToolDescription.new(name, _text(tool.get("description", ""), f"{twhere}.description"), params))
    return tools


def _system_message(record: dict) -> HarmonyMessage:
    content = SystemContent.new()
    effort = record.get("reasoning_effort")
    if effort is not None:
        if effort not in _EFFORTS:
            raise RecordError(f"reasoning_effort {effort!r} is not one of low, medium, high")
        content = content.with_reasoning_effort(_EFFORTS[effort])
    if "model_identity" in record:
        content = content.with_model_identity(_text(record["model_identity"], "model_identity", allow_empty=False))
    if "knowledge_cutoff" in record:
        content = content.with_knowledge_cutoff(_text(record["knowledge_cutoff"], "knowledge_cutoff",
                                                      allow_empty=False))
    if "conversation_start_date" in record:
        content = content.with_conversation_start_date(
            _text(record["conversation_start_date"], "conversation_start_date", allow_empty=False))
    return HarmonyMessage(Message.from_role_and_content(Role.SYSTEM, content), "system", None, "")


def pair_to_conversation(record: dict) -> dict:
    """A prompt/response pair as the equivalent conversation record."""
    _check_keys(record, _PAIR_KEYS, "record")
    assistant = {"role": "assistant", "content": record.get("response")}
    for key in ("thinking", "reasoning_content"):
        if key in record:
            assistant[key] = record[key]
    conversation = {k: v for k, v in record.items() if k in _CONVERSATION_KEYS}
    conversation["messages"] = [{"role": "user", "content": record.get("prompt")}, assistant]
    return conversation


def parse_record(record) -> ParsedConversation:
    """Convert one decoded JSON record; raises RecordError naming the offending field."""
    if not isinstance(record, dict):
        raise RecordError(f"record must be a JSON object, got {type(record).__name__}")
    if "messages" not in record:
        if "prompt" not in record or "response" not in record:
            raise RecordError("record has neither 'messages' nor 'prompt' and 'response'")
        record = pair_to_conversation(record)
    _check_keys(record, _CONVERSATION_KEYS, "record")
    raw_messages = record["messages"]
    if not isinstance(raw_messages, list) or not raw_messages:
        raise RecordError("'messages' must be a non-empty list")

    instructions: list[str] = []
    if "developer" in record:
        instructions.append(_text(record["developer"], "developer", allow_empty=False))
    tools = _tools(record["tools"], "tools") if "tools" in record else []
    body: list[HarmonyMessage] = []
    turn_start = 0
    for i, msg in enumerate(raw_messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RecordError(f"{where} must be an object")
        role = msg.get("role")
        if role not in _MESSAGE_KEYS:
            raise RecordError(f"{where}.role {role!r} is not one of {', '.join(_MESSAGE_KEYS)}")
        _check_keys(msg, _MESSAGE_KEYS[role], where)
        if role in ("system", "developer"):
            if body:
                raise RecordError(f"{where}: {role} messages must come before the first user message")
            # Harmony's system message is fixed metadata; chat-style system prompts are developer instructions.
            instructions.append(_text(msg.get("content"), f"{where}.content", allow_empty=False))
        elif role == "user":
            text = _text(msg.get("content"), f"{where}.content", allow_empty=False)
            body.append(HarmonyMessage(Message.from_role_and_content(Role.USER, text), "user", None, text))
            turn_start = len(body)
        elif role == "tool":
            name = _tool_name(msg.get("name"), f"{where}.name")
            text = _text(msg.get("content"), f"{where}.content")
            message = (Message.from_author_and_content(Author.new(Role.TOOL, name), text)
                       .with_channel("commentary").with_recipient("assistant"))
            body.append(HarmonyMessage(message, "tool", "commentary", text))
        else:
            body.extend(_assistant_messages(msg, where))
    if not body or body[-1].role != "assistant":
        raise RecordError("conversation must end with an assistant message (the turn to train)")
    if turn_start == len(body) or all(m.role != "assistant" for m in body[turn_start:]):
        raise RecordError("conversation has no assistant message after the last user message")
    last = body[-1]
    if last.channel != "final" and last.message.recipient is None:
        # Rendered, it would end in <|end|> without a final answer: check-format's missing_final/wrong_stop_token.
        raise RecordError(f"the trained turn ends with an assistant {last.channel} message; it must end with a "
                          "final message (content) or a tool call")

    head = [_system_message(record)]
    if instructions or tools:
        developer = DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions("\n\n".join(instructions))
        if tools:
            developer = developer.with_function_tools(tools)
        head.append(HarmonyMessage(Message.from_role_and_content(Role.DEVELOPER, developer), "developer", None, ""))
    return ParsedConversation(head + body, turn_start + len(head), bool(tools))


def record_key(record: dict) -> str:
    """What the held-out split hashes: the record's ``id`` if it has one, else its canonical JSON."""
    if "id" in record:
        return "id:" + str(record["id"])
    return "content:" + json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
