"""Harmony chat generation with an HF student (or a gpt-oss teacher): render the prompt, generate until a
Harmony stop token, parse the `analysis` and `final` channels and report format problems as check-format names
them.

The model directory's own Python (``auto_map`` in its config.json) runs only with ``--trust-remote-code``: the
student classes come from this package, gpt-oss from transformers."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.check_format import check_tokens
from ..data.schema import SPECIAL_TEXT
from ..harmony_vocab import HARMONY_STOP_TOKEN_IDS, harmony_encoding
from ..teacher.checkpoint import stored_tensor_files

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
    error: str | None  # why the completion is not a well-formed Harmony reply (check-format's issue kinds)

    def __str__(self) -> str:
        lines = [f"[analysis] {self.analysis}", f"[final] {self.final}"]
        if self.error:
            lines.append(f"[format] {self.error}")
        return "\n".join(lines)


def parse_reply(completion: list[int]) -> HarmonyReply:
    from openai_harmony import Role

    enc = harmony_encoding()
    issues = "; ".join(f"{i.kind}: {i.detail}" for i in check_tokens(completion, "generation")) or None
    try:
        messages = enc.parse_messages_from_completion_tokens(completion, Role.ASSISTANT, strict=True)
    except Exception as e:  # noqa: BLE001 - harmony raises its own error types for every malformed stream
        return HarmonyReply(completion, "", "", f"unparseable: {e}; raw text: {enc.decode(completion)!r}"
                            + (f"; {issues}" if issues else ""))
    channels: dict[str, list[str]] = {}
    for message in messages:
        text = "".join(c.text for c in message.content if hasattr(c, "text"))
        channels.setdefault(message.channel or "", []).append(text)
    return HarmonyReply(completion, "\n".join(channels.get("analysis", [])), "\n".join(channels.get("final", [])),
                        issues)


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
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python shipped in the model directory (its config.json auto_map); off by default, "
                             "student and gpt-oss directories do not need it")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    if args.max_new_tokens < 1:
        print(f"error: --max-new-tokens must be at least 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    if args.temperature < 0:
        print(f"error: --temperature must be >= 0, got {args.temperature}", file=sys.stderr)
        return 2
    if not args.prompt.strip():
        print("error: --prompt is empty", file=sys.stderr)
        return 2
    for flag, text in (("--prompt", args.prompt), ("--system", args.system), ("--developer", args.developer)):
        match = SPECIAL_TEXT.search(text or "")
        if match:  # refused in every text field of the training data too (prepare-data)
            print(f"error: {flag} contains Harmony special-token text {match.group()!r}", file=sys.stderr)
            return 2
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        print(f"error: {model_dir}: no config.json (not an HF model directory)", file=sys.stderr)
        return 2
    stored_tensor_files(model_dir)  # names a missing, truncated or damaged safetensors file before loading
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    from .modeling import register_auto_classes

    register_auto_classes()  # our student loads as a registered class, not as the directory's code
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=args.trust_remote_code,
                                                 dtype=dtype).to(device).eval()
    prompt = harmony_prompt(args.prompt, args.system, args.developer, args.reasoning_effort)
    reply = generate_reply(model, prompt, args.max_new_tokens, args.temperature, args.seed)
    print(reply)
    print(f"({len(reply.tokens)} tokens generated)")
    return 0
