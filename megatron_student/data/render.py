"""Render a parsed conversation with openai-harmony and label every token.

The conversation is rendered in one call (``render_conversation_for_training`` with
``auto_drop_analysis=False`` on the messages we keep), then message spans are recovered from the
``<|start|>``/``<|message|>`` tokens: message content never contains special ids, so each message owns
exactly one of each. Per token we keep a flags byte (``FLAG_*``) and an analysis weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from openai_harmony import Conversation, RenderConversationConfig

from megatron_student.data.schema import ParsedConversation
from megatron_student.data.weighting import HeuristicWeighter, Weighter, token_byte_lengths, token_weights
from megatron_student.harmony_vocab import ENDOFTEXT, GPT_OSS_VOCAB_SIZE, MESSAGE, START, harmony_encoding

PAD_TOKEN_ID = ENDOFTEXT
MODEL_VOCAB_SIZE = GPT_OSS_VOCAB_SIZE

FLAG_LABEL = 1  # the token is a training target
FLAG_ANALYSIS = 2  # content or terminator of an assistant analysis message
FLAG_FINAL = 4  # content or terminator of an assistant final message
FLAG_COMMENTARY = 8  # content or terminator of an assistant commentary message (tool calls, preambles)
_CHANNEL_FLAG = {"analysis": FLAG_ANALYSIS, "final": FLAG_FINAL, "commentary": FLAG_COMMENTARY}

EARLIER_ANALYSIS = ("harmony", "drop", "keep")
LABEL_SCOPES = ("assistant", "final_turn", "all")


@dataclass(frozen=True)
class RenderConfig:
    """earlier_analysis: what happens to analysis messages before the trained turn.
    ``harmony``: Harmony's own auto-drop rule (drop analysis before the first final when the conversation
    ends on a final); ``drop``: drop every earlier turn's analysis; ``keep``: keep all.
    The trained (last) turn always keeps its analysis.

    label_scope: ``assistant`` (every kept assistant message), ``final_turn`` (only the trained turn's
    assistant messages) or ``all`` (every token). The ``<|start|>assistant`` that opens an assistant turn
    is prompt, not target; a conversation's first token is never a target (nothing predicts it)."""

    earlier_analysis: str = "harmony"
    label_scope: str = "assistant"

    def __post_init__(self):
        if self.earlier_analysis not in EARLIER_ANALYSIS:
            raise ValueError(f"earlier_analysis {self.earlier_analysis!r} is not one of {EARLIER_ANALYSIS}")
        if self.label_scope not in LABEL_SCOPES:
            raise ValueError(f"label_scope {self.label_scope!r} is not one of {LABEL_SCOPES}")


@dataclass
class RenderedConversation:
    input_ids: np.ndarray  # int32 [T]
    flags: np.ndarray  # uint8 [T], FLAG_* bits
    analysis_weight: np.ndarray  # float32 [T], 1.0 outside analysis content

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def labels(self) -> np.ndarray:
        """int64 [T]: the token where it is a target, -100 elsewhere (unshifted, HF convention)."""
        return np.where(self.flags & FLAG_LABEL, self.input_ids.astype(np.int64), -100)

    @property
    def analysis_mask(self) -> np.ndarray:
        return (self.flags & FLAG_ANALYSIS) != 0

    @property
    def final_mask(self) -> np.ndarray:
        return (self.flags & FLAG_FINAL) != 0

    @property
    def commentary_mask(self) -> np.ndarray:
        return (self.flags & FLAG_COMMENTARY) != 0

    def truncated(self, length: int) -> "RenderedConversation":
        return RenderedConversation(self.input_ids[:length], self.flags[:length], self.analysis_weight[:length])


def kept_messages(conversation: ParsedConversation, config: RenderConfig) -> list[int]:
    """Indices of the messages that are rendered."""
    msgs, turn = conversation.messages, conversation.turn_start
    if config.earlier_analysis == "keep":
        return list(range(len(msgs)))
    if config.earlier_analysis == "drop":
        return [i for i, m in enumerate(msgs) if i >= turn or m.channel != "analysis" or m.role != "assistant"]
    # Harmony's auto_drop_analysis rule (when the last assistant message is a final, drop analysis messages
    # before the first final), with the trained turn protected.
    last_assistant = next(m for m in reversed(msgs) if m.role == "assistant")
    if last_assistant.channel != "final":
        return list(range(len(msgs)))
    first_final = next(i for i, m in enumerate(msgs) if m.role == "assistant" and m.channel == "final")
    return [i for i, m in enumerate(msgs)
            if i >= turn or i > first_final or not (m.role == "assistant" and m.channel == "analysis")]


class Renderer:
    """Turns ParsedConversation into RenderedConversation. One per process (holds the encoding)."""

    def __init__(self, config: RenderConfig = RenderConfig(), weighter: Weighter | None = None):
        self.config = config
        self.weighter = weighter if weighter is not None else HeuristicWeighter()
        self.encoding = harmony_encoding()
        self._render_config = RenderConversationConfig(auto_drop_analysis=False)
        self._assistant_prefix = len(self.encoding.encode("assistant", allowed_special=set())) + 1
        token_byte_lengths()  # load once up front, not inside the first timed conversation

    def render(self, conversation: ParsedConversation) -> RenderedConversation:
        keep = kept_messages(conversation, self.config)
        messages = [conversation.messages[i] for i in keep]
        ids = np.asarray(
            self.encoding.render_conversation_for_training(
                Conversation.from_messages([m.message for m in messages]), self._render_config),
            dtype=np.int32)
        starts = np.flatnonzero(ids == START)
        bodies = np.flatnonzero(ids == MESSAGE)
        if len(starts) != len(messages) or len(bodies) != len(messages):
            raise RuntimeError(f"harmony rendered {len(starts)} <|start|> and {len(bodies)} <|message|> tokens "
                               f"for {len(messages)} messages")
        ends = np.append(starts[1:], len(ids))
        flags = np.zeros(len(ids), dtype=np.uint8)
        weights = np.ones(len(ids), dtype=np.float32)
        scope = self.config.label_scope
        if scope == "all":
            flags[:] = FLAG_LABEL
        previous_role = None
        for k, (index, message) in enumerate(zip(keep, messages)):
            start, body, end = starts[k], bodies[k], ends[k]
            if message.role == "assistant":
                in_scope = scope == "assistant" or (scope == "final_turn" and index >= conversation.turn_start)
                if in_scope:
                    # An assistant turn's opening <|start|>assistant is given at inference; later messages
                    # of the same turn are generated whole.
                    flags[start + (self._assistant_prefix if previous_role != "assistant" else 0):end] |= FLAG_LABEL
                flags[body + 1:end] |= _CHANNEL_FLAG[message.channel]
                if message.channel == "analysis":
                    content = ids[body + 1:end - 1]
                    if int(token_byte_lengths()[content].sum()) != len(message.text.encode("utf-8")):
                        raise RuntimeError("analysis content tokens do not decode to the message text")
                    weights[body + 1:end - 1] = token_weights(self.weighter, message.text, content)
            previous_role = message.role
        flags[0] &= ~np.uint8(FLAG_LABEL)
        return RenderedConversation(ids, flags, weights)
