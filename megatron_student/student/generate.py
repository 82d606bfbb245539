"""Harmony chat generation with an HF student (or a gpt-oss teacher): render the prompt, generate until a
Harmony stop token, parse the `analysis` and `final` channels."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from ..harmony_vocab import HARMONY_STOP_TOKEN_IDS, harmony_encoding

REASONING_EFFORTS = ("low", "medium", "high")


def harmony_prompt(user: str, system: str | None = None, developer: str | None = None,
                   reasoning_effort: str = "medium") -> list[int]:
    from openai_harmony import (Conversation, DeveloperContent, Message, ReasoningEffort, Role,
                                SystemContent)

    enc = harmony_encoding()
    system_content = SystemContent.new().with_reasoning_effort(ReasoningEffort(reasoning_effort.capitalize()))
    if system:
        system_content = system_content.with_model_identity(system)
    messages = [Message.from_role_and_content(Role.SYSTEM, system_content)]
    if developer:
        messages.append(Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(developer)))
    messages.append(Message.from_role_and_content(Role.USER, user))
    return enc.render_conversation_for_completion(Conversation.from_messages(messages), Role.ASSISTANT)


@dataclass
class HarmonyReply:
    tokens: list[int]
    analysis: str
    final: str
    error: str | None  # why the completion is not a well-formed Harmony reply, if it is not

    def __str__(self) -> str:
        lines = [f"[analysis] {self.analysis}", f"[final] {self.final}"]
        if self.error:
            lines.append(f"[format] {self.error}")
        return "\n".join(lines)


def parse_reply(completion: list[int]) -> HarmonyReply:
    from openai_harmony import Role

    enc = harmony_encoding()
    try:
        messages = enc.parse_messages_from_completion_tokens(completion, Role.ASSISTANT, strict=True)
    except Exception as e:  # noqa: BLE001 - harmony raises its own error types for every malformed stream
        return HarmonyReply(completion, "", "", f"unparseable: {e}; raw text: {enc.decode(completion)!r}")
    channels: dict[str, list[str]] = {}
    for message in messages:
        text = "".join(c.text for c in message.content if hasattr(c, "text"))
        channels.setdefault(message.channel or "", []).append(text)
    error = None if channels.get("final") else "no final channel"
    return HarmonyReply(completion, "\n".join(channels.get("analysis", [])), "\n".join(channels.get("final", [])), error)


@torch.no_grad()
def generate_reply(model, prompt: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
                   seed: int = 0) -> HarmonyReply:
    torch.manual_seed(seed)
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or None,
        top_p=None, top_k=None, eos_token_id=HARMONY_STOP_TOKEN_IDS, pad_token_id=HARMONY_STOP_TOKEN_IDS[-1])
    return parse_reply(out[0, len(prompt):].tolist())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF student (or gpt-oss) checkpoint directory")
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--system", help="model identity for the system message")
    parser.add_argument("--developer", help="developer instructions")
    parser.add_argument("--reasoning-effort", choices=REASONING_EFFORTS, default="medium")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=dtype).to(device).eval()
    prompt = harmony_prompt(args.prompt, args.system, args.developer, args.reasoning_effort)
    reply = generate_reply(model, prompt, args.max_new_tokens, args.temperature, args.seed)
    print(reply)
    print(f"({len(reply.tokens)} tokens generated)")
    return 0
