"""`megatron-student prepare-data`: JSONL conversations -> rendered, masked, weighted, packed shards.

Streams every source line by line; only the packer's open bins and one int per conversation (its length,
for the percentiles) stay in memory. Writes under OUTPUT: ``train/`` and ``valid/`` (see storage.py),
``stats.json``, ``rejects.jsonl`` (file, line, kind, reason of every rejected record), ``truncated.jsonl``
(every truncated record), ``length_histogram.png`` and a copy of the manifest.

Everything is written into a temporary sibling of OUTPUT, renamed onto it at the end (an existing OUTPUT only
with ``--force``): a killed run leaves OUTPUT as it was. A failed run (too many rejects, no training sample)
leaves its report (stats.json with ``failed``, rejects.jsonl, …) in OUTPUT but no ``train/``/``valid/``, so that
nothing can train on it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from array import array
from pathlib import Path

import numpy as np
from openai_harmony import HarmonyError

from megatron_student.data.manifest import OVERLONG, Manifest, ManifestError, load_manifest
from megatron_student.data.packing import FirstFitPacker
from megatron_student.data.render import FLAG_ANALYSIS, FLAG_COMMENTARY, FLAG_FINAL, FLAG_LABEL, Renderer
from megatron_student.data.schema import RecordError, parse_record, record_key
from megatron_student.data.split import SPLITS, split_of
from megatron_student.data.storage import PackedShardWriter
from megatron_student.data.weighting import load_weighter
from megatron_student.hf_io import replace_directory, sweep_temp_siblings, temp_sibling


class PrepareFailed(RuntimeError):
    """The run finished but its output must not be trained on; OUTPUT holds the report only."""


class RejectFractionExceeded(PrepareFailed):
    pass


class NoTrainingSamples(PrepareFailed):
    pass


class _SplitStats:
    def __init__(self):
        self.lengths = array("I")
        self.samples = 0
        self.tokens = 0
        self.label = self.analysis = self.final = self.commentary = 0

    def add(self, length: int, flags: np.ndarray) -> None:
        self.lengths.append(length)
        self.tokens += len(flags)
        self.label += int(np.count_nonzero(flags & FLAG_LABEL))
        self.analysis += int(np.count_nonzero(flags & FLAG_ANALYSIS))
        self.final += int(np.count_nonzero(flags & FLAG_FINAL))
        self.commentary += int(np.count_nonzero(flags & FLAG_COMMENTARY))

    def report(self, seq_len: int, shards: int) -> dict:
        lengths = np.frombuffer(self.lengths, dtype=np.uint32) if len(self.lengths) else np.zeros(0)
        percentiles = ({f"p{q}": float(np.percentile(lengths, q)) for q in (5, 25, 50, 75, 90, 95, 99)}
                       | {"min": int(lengths.min()), "max": int(lengths.max()), "mean": float(lengths.mean())}
                       if len(lengths) else {})

        def ratio(a, b):
            return a / b if b else None

        return {
            "conversations": len(self.lengths), "samples": self.samples, "shards": shards,
            "tokens": self.tokens, "padding_fraction": ratio(self.samples * seq_len - self.tokens,
                                                             self.samples * seq_len),
            "label_tokens": self.label, "analysis_tokens": self.analysis, "final_tokens": self.final,
            "commentary_tokens": self.commentary,
            "analysis_fraction_of_tokens": ratio(self.analysis, self.tokens),
            "final_fraction_of_tokens": ratio(self.final, self.tokens),
            "analysis_to_final_ratio": ratio(self.analysis, self.final),
            "rendered_length_percentiles": percentiles,
        }


def _write_histogram(path: Path, stats: dict[str, _SplitStats], seq_len: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for split, s in stats.items():
        if len(s.lengths):
            ax.hist(np.frombuffer(s.lengths, dtype=np.uint32), bins=50, alpha=0.6, label=f"{split} ({len(s.lengths)})")
    ax.axvline(seq_len, color="k", linestyle="--", label=f"seq_len {seq_len}")
    ax.set_xlabel("rendered conversation length (tokens)")
    ax.set_ylabel("conversations")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prepare(manifest: Manifest, output: Path, seq_len: int, *, overlong: str | None = None,
            max_reject_fraction: float | None = None, shard_tokens: int = 1 << 28, progress: bool = True,
            force: bool = False) -> dict:
    """Prepare ``manifest`` into ``output`` (replacing an existing one only when ``force``); returns the stats
    (also written to stats.json).

    Raises RejectFractionExceeded when rejects exceed the allowed fraction and NoTrainingSamples when no sample
    reaches the train split, after writing the report (but no split) to ``output``."""
    overlong = overlong or manifest.overlong
    if overlong not in OVERLONG:
        raise ValueError(f"overlong {overlong!r} is not one of {OVERLONG}")
    max_reject_fraction = manifest.max_reject_fraction if max_reject_fraction is None else max_reject_fraction
    final = Path(output)
    if final.exists() and not force:
        raise FileExistsError(f"{final}: already exists; pass --force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_temp_siblings(final)
    work = temp_sibling(final)
    try:
        stats = _prepare(manifest, work, final, seq_len, overlong, max_reject_fraction, shard_tokens, progress)
        if stats["failed"]:
            for split in SPLITS:
                shutil.rmtree(work / split)
        work.chmod(0o755)  # mkdtemp creates it 0700
        replace_directory(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if stats["failed"]:
        failure = NoTrainingSamples if stats["failed"]["kind"] == "no_training_samples" else RejectFractionExceeded
        raise failure(stats["failed"]["reason"])
    return stats


def _prepare(manifest: Manifest, output: Path, final: Path, seq_len: int, overlong: str, max_reject_fraction: float,
             shard_tokens: int, progress: bool) -> dict:
    """Everything ``prepare`` writes, into ``output`` (messages name ``final``, where it will be)."""
    started = time.perf_counter()
    renderer = Renderer(manifest.render, load_weighter(manifest.weighting))
    packers = {s: FirstFitPacker(seq_len, manifest.open_bins) for s in SPLITS}
    writers = {s: PackedShardWriter(output / s, seq_len, shard_tokens) for s in SPLITS}
    split_stats = {s: _SplitStats() for s in SPLITS}
    counts = {"read": 0, "accepted": 0, "rejected": 0, "truncated": 0, "blank_lines": 0}
    rejected_by_kind: dict[str, int] = {}
    per_source = []
    files = [f for src in manifest.sources for f in src.files]

    from tqdm import tqdm

    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="prepare-data",
               disable=not progress)
    with open(output / "rejects.jsonl", "w", encoding="utf-8") as rejects, \
            open(output / "truncated.jsonl", "w", encoding="utf-8") as truncations:

        def reject(file: Path, line: int, kind: str, reason: str) -> None:
            counts["rejected"] += 1
            rejected_by_kind[kind] = rejected_by_kind.get(kind, 0) + 1
            source_counts["rejected"] += 1
            rejects.write(json.dumps({"file": str(file), "line": line, "kind": kind, "reason": reason}) + "\n")

        for file in files:
            source_counts = {"file": str(file), "read": 0, "accepted": 0, "rejected": 0}
            per_source.append(source_counts)
            with open(file, "rb") as f:
                for line_no, raw in enumerate(f, start=1):
                    bar.update(len(raw))
                    if not raw.strip():
                        counts["blank_lines"] += 1
                        continue
                    counts["read"] += 1
                    source_counts["read"] += 1
                    try:
                        record = json.loads(raw)
                    except UnicodeDecodeError as e:
                        reject(file, line_no, "invalid_json", f"not UTF-8: {e.reason} at byte {e.start}")
                        continue
                    except json.JSONDecodeError as e:
                        reject(file, line_no, "invalid_json", f"invalid JSON: {e.msg} at column {e.colno}")
                        continue
                    try:
                        rendered = renderer.render(parse_record(record))
                    except RecordError as e:
                        reject(file, line_no, "invalid_record", str(e))
                        continue
                    except HarmonyError as e:
                        reject(file, line_no, "render_error", f"openai-harmony refused the record: {e}")
                        continue
                    length = len(rendered)
                    if length > seq_len:
                        if overlong == "drop":
                            reject(file, line_no, "too_long", f"{length} tokens > seq_len {seq_len} (overlong: drop)")
                            continue
                        rendered = rendered.truncated(seq_len)
                    if not (rendered.flags & FLAG_LABEL).any():
                        reject(file, line_no, "no_trained_tokens",
                               "no token is trained" + (f" in its first {seq_len} tokens (overlong: truncate)"
                                                         if length > seq_len else ""))
                        continue
                    if length > seq_len:
                        counts["truncated"] += 1
                        truncations.write(json.dumps({"file": str(file), "line": line_no, "tokens": length,
                                                      "kept": seq_len}) + "\n")
                    counts["accepted"] += 1
                    source_counts["accepted"] += 1
                    split = split_of(record_key(record), manifest.valid_fraction, manifest.split_salt)
                    split_stats[split].add(length, rendered.flags)
                    for sample in packers[split].add(rendered):
                        writers[split].write_sample(sample)
                        split_stats[split].samples += 1
    bar.close()
    splits = {}
    for s in SPLITS:
        for sample in packers[s].flush():
            writers[s].write_sample(sample)
            split_stats[s].samples += 1
        splits[s] = split_stats[s].report(seq_len, len(writers[s].close()["shards"]))

    elapsed = time.perf_counter() - started
    reject_fraction = counts["rejected"] / counts["read"] if counts["read"] else 0.0
    failed = None
    if reject_fraction > max_reject_fraction:
        failed = {"kind": "reject_fraction", "reason": (
            f"{counts['rejected']} of {counts['read']} records rejected ({reject_fraction:.2%}) > "
            f"max_reject_fraction {max_reject_fraction:.2%}; see {final / 'rejects.jsonl'}")}
    elif splits["train"]["samples"] == 0:
        failed = {"kind": "no_training_samples", "reason": (
            f"{manifest.path}: no training sample: {counts['read']} records read ({counts['blank_lines']} blank lines "
            f"skipped), {counts['accepted']} accepted, {splits['valid']['samples']} samples in the valid split"
            + (f"; see {final / 'rejects.jsonl'}" if counts["rejected"] else ""))}
    stats = {
        "name": manifest.name, "manifest": str(manifest.path), "license": manifest.license,
        "seq_len": seq_len, "overlong": overlong, "render": vars(manifest.render) | {"weighting": manifest.weighting},
        "split": {"valid_fraction": manifest.valid_fraction, "salt": manifest.split_salt},
        "records": counts | {"rejected_by_kind": rejected_by_kind},
        "reject_fraction": reject_fraction, "max_reject_fraction": max_reject_fraction,
        "sources": per_source, "splits": splits, "failed": failed,
        "elapsed_s": elapsed,
        "tokens_per_s": sum(s.tokens for s in split_stats.values()) / elapsed if elapsed else None,
    }
    (output / "stats.json").write_text(json.dumps(stats, indent=1))
    shutil.copyfile(manifest.path, output / "manifest.yaml")
    _write_histogram(output / "length_histogram.png", split_stats, seq_len, manifest.name)
    return stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, type=Path, help="dataset manifest (YAML)")
    parser.add_argument("--output", required=True, type=Path, help="output directory")
    parser.add_argument("--seq-len", required=True, type=int, help="packed sequence length in tokens")
    parser.add_argument("--overlong", choices=OVERLONG, help="conversations longer than --seq-len "
                        "(default: the manifest's packing.overlong, else truncate)")
    parser.add_argument("--max-reject-fraction", type=float,
                        help="fail when more records are rejected (default: the manifest's, else 0.01)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard (default 2^28)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    try:
        manifest = load_manifest(args.manifest)
        stats = prepare(manifest, args.output, args.seq_len, overlong=args.overlong,
                        max_reject_fraction=args.max_reject_fraction, shard_tokens=args.shard_tokens,
                        progress=not args.no_progress, force=args.force)
    except (ManifestError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PrepareFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    records = stats["records"]
    print(f"{records['accepted']} accepted, {records['rejected']} rejected, {records['truncated']} truncated; "
          + ", ".join(f"{s}: {v['samples']} samples / {v['tokens']} tokens" for s, v in stats["splits"].items())
          + f"; {stats['tokens_per_s']:.0f} tokens/s -> {args.output}")
    return 0
