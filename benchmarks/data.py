"""Harmony data pipeline throughput: `prepare` end to end vs raw openai-harmony rendering.

    python benchmarks/data.py [--conversations 20000] [--seq-len 4096]

Both run in this process on the same conversations (the bundled demo set, repeated with distinct ids,
so split hashing sees distinct records). Rows:

- raw harmony render: ``render_conversation_for_training`` on prebuilt ``Conversation`` objects, nothing else;
- prepare end to end: JSONL read, JSON decode, schema checks, render, masks, weights, split, packing,
  shard writes, stats and histogram.

tokens/s/core divides tokens by the process CPU time, so it is per core however many threads ran.
Target: prepare >= 60% of raw rendering.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import yaml
from openai_harmony import Conversation, RenderConversationConfig

from megatron_student.data.manifest import load_manifest
from megatron_student.data.prepare import prepare
from megatron_student.data.schema import parse_record
from megatron_student.data.weighting import token_byte_lengths
from megatron_student.harmony_vocab import harmony_encoding

DEMO = Path(__file__).resolve().parents[1] / "megatron_student" / "assets" / "demo_conversations.jsonl"
TARGET = 0.60


def make_corpus(path: Path, n: int) -> list[dict]:
    base = [json.loads(line) for line in DEMO.read_text().splitlines()]
    records = []
    for i in range(n):
        record = dict(base[i % len(base)])
        record["id"] = f"{record.get('id', 'rec')}-{i}"
        records.append(record)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=20000)
    parser.add_argument("--seq-len", type=int, default=4096)
    args = parser.parse_args()

    encoding = harmony_encoding()
    token_byte_lengths()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records = make_corpus(tmp / "corpus.jsonl", args.conversations)
        conversations = [Conversation.from_messages([m.message for m in parse_record(r).messages]) for r in records]
        config = RenderConversationConfig(auto_drop_analysis=False)

        def raw_render():
            return sum(len(encoding.render_conversation_for_training(c, config)) for c in conversations)

        raw_tokens, raw_wall, raw_cpu = timed(raw_render)
        (tmp / "manifest.yaml").write_text(yaml.safe_dump({
            "name": "bench", "license": "CC0-1.0", "split": {"valid_fraction": 0.05},
            "sources": [{"path": "corpus.jsonl", "license": "CC0-1.0", "conversion": "demo set, repeated"}]}))
        manifest = load_manifest(tmp / "manifest.yaml")
        # Warm-up on a copy of the manifest over the first records: lazy imports (Megatron-Core,
        # matplotlib) and first-call costs stay outside the timed run.
        (tmp / "warmup.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:200]))
        prepare(replace(manifest, sources=(replace(manifest.sources[0], files=(tmp / "warmup.jsonl",)),)),
                tmp / "warmup", args.seq_len, progress=False)
        stats, prep_wall, prep_cpu = timed(
            lambda: prepare(manifest, tmp / "out", args.seq_len, progress=False))
        prep_tokens = sum(s["tokens"] for s in stats["splits"].values())

    rows = [("raw harmony render", raw_tokens, raw_wall, raw_cpu),
            ("prepare end to end", prep_tokens, prep_wall, prep_cpu)]
    print(f"{args.conversations} conversations, seq_len {args.seq_len}, "
          f"{stats['records']['accepted']} accepted\n")
    print(f"{'stage':<22}{'tokens':>12}{'wall s':>10}{'cpu s':>10}{'tokens/s':>12}{'tokens/s/core':>15}")
    for name, tokens, wall, cpu in rows:
        print(f"{name:<22}{tokens:>12}{wall:>10.2f}{cpu:>10.2f}{tokens / wall:>12.0f}{tokens / cpu:>15.0f}")
    ratio = (prep_tokens / prep_cpu) / (raw_tokens / raw_cpu)
    print(f"\nprepare / raw (per core): {ratio:.1%}  (target >= {TARGET:.0%}: {'met' if ratio >= TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
