"""`megatron-student capture-teacher --teacher CKPT --data PREPARED_DIR --output DIR`: run the teacher once over
every packed sample of a prepared dataset and store its compressed top-k distributions (format.py).

Single process, or under torchrun / Slurm (one task per GPU) like training: the teacher is a Megatron model with
TP (and EP) over ``--tp``/``--ep`` ranks; the remaining data-parallel ranks take whole shards round-robin. The
top-k is taken across the TP shards of the vocabulary without gathering it (ops.losses.vocab_parallel_topk).
Finished shards are skipped, so rerunning the same command resumes a killed capture.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import format as fmt

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TOPK_CHUNK_ROWS = 1024


class _Channels:
    # make_micro_batch builds loss weights too; capture needs only its targets (which positions are trained).
    final = analysis = other = 1.0


def open_teacher(path: str, tp: int, ep: int, dtype: torch.dtype):
    """(Megatron teacher for this rank, HF config, config dict, device); torch.distributed must be up."""
    from megatron.core import parallel_state  # noqa: F401  (initialises Megatron's modules before the model)

    from ..megatron import ParallelConfig, initialize_parallel
    from ..checkpoint import VOCAB_DIVISIBLE_BY, load_model

    parallel = ParallelConfig(tensor_parallel=tp, expert_parallel=ep, params_dtype=dtype,
                              make_vocab_size_divisible_by=VOCAB_DIVISIBLE_BY)
    initialize_parallel(parallel)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model, config, config_dict = load_model(path, "teacher", parallel)
    model.to(device).eval().requires_grad_(False)
    return model, config, config_dict, device


def teacher_logits(model, items: list[dict], device):
    """(the trainer's micro-batch of ``items``, the teacher's vocab-parallel logits [B·S, V_local])."""
    from ..train.batches import make_micro_batch

    mb = make_micro_batch(items, _Channels, device)
    with torch.no_grad():
        return mb, model(mb.tokens, None, None, packed_seq_params=mb.packed)[0]


def teacher_rows(model, items: list[dict], device, vocab_size: int, k: int, all_positions: bool, tp_group):
    """For each item: (positions int32, ids, log-probabilities, log tail) of its stored positions."""
    from ..ops.losses import IGNORE_INDEX, vocab_parallel_topk

    mb, logits = teacher_logits(model, items, device)
    seq_len = items[0]["input_ids"].shape[0]
    if all_positions:
        keep = torch.zeros(len(items), seq_len, dtype=torch.bool)
        for b, item in enumerate(items):
            keep[b, :item["num_tokens"]] = True
        keep = keep.reshape(-1)
    else:
        keep = (mb.targets != IGNORE_INDEX).cpu()
    flat = keep.nonzero().squeeze(-1)
    # In chunks of rows: the top-k works in fp32 on [rows, V_local] and keeps a few copies of it.
    parts = [vocab_parallel_topk(logits[chunk.to(device)], k, vocab_size=vocab_size, tp_group=tp_group)
             for chunk in flat.split(TOPK_CHUNK_ROWS) or (flat,)]
    ids, logprobs, log_tail = (torch.cat(p) for p in zip(*parts))
    out = []
    for b in range(len(items)):
        here = (flat >= b * seq_len) & (flat < (b + 1) * seq_len)
        out.append(((flat[here] - b * seq_len).numpy().astype(np.int32), ids[here.to(device)].cpu(),
                    logprobs[here.to(device)].cpu(), log_tail[here.to(device)].cpu()))
    return out


def _shard_done(path: Path, header: dict) -> bool:
    if not path.is_file():
        return False
    try:
        shard = fmt.Shard(path)
    except fmt.CaptureError:
        return False  # an unfinished or damaged shard is redone
    return all(shard.header.get(key) == value for key, value in header.items())


def capture(args) -> dict:
    from megatron.core import parallel_state

    from ..data.storage import HarmonyPackedDataset

    rank = dist.get_rank()
    model, config, config_dict, device = open_teacher(args.teacher, args.tp, args.ep, DTYPES[args.dtype])
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    vocab_size = config.vocab_size
    compression = fmt.Compression.for_vocab(vocab_size, **compression_knobs(args))
    output = Path(args.output)
    datasets = {split: HarmonyPackedDataset(args.data, split) for split in args.split}
    for split, data in datasets.items():
        if (data.seq_len * args.micro_batch) % args.tp:
            raise ValueError(f"{data.directory}: seq_len {data.seq_len} × micro-batch {args.micro_batch} must be "
                             f"divisible by --tp {args.tp} (sequence parallelism)")

    identity = [None]
    if rank == 0:
        identity = [{"teacher": fmt.teacher_identity(args.teacher, config_dict),
                     "vocab_sha256": fmt.vocabulary_hash(vocab_size),
                     "data": {split: fmt.data_identity(args.data, split) for split in datasets}}]
    dist.broadcast_object_list(identity, src=0)
    identity = identity[0]
    header = fmt.header_dict(compression, teacher=identity["teacher"], vocab_sha256=identity["vocab_sha256"],
                             vocab_size=vocab_size, samples_per_shard=args.samples_per_shard,
                             all_positions=args.all_positions)
    header_path = output / fmt.CAPTURE_FILE
    problem = [None]  # rank 0's refusal, shared so that no rank is left waiting for it
    if rank == 0:
        full = {**header, "data": identity["data"], "teacher_path": str(Path(args.teacher).resolve()),
                "data_path": str(Path(args.data).resolve()),
                "splits": {s: {"samples": len(d), "seq_len": d.seq_len} for s, d in datasets.items()}}
        if header_path.is_file():
            old = json.loads(header_path.read_text())
            differing = sorted(key for key in full if key not in ("teacher_path", "data_path")
                               and old.get(key) != full[key])
            if differing:
                problem = [f"{header_path}: an existing capture of another teacher, data or settings (differs in "
                           f"{', '.join(differing)}); use a fresh --output"]
        else:
            for split in datasets:
                (output / split).mkdir(parents=True, exist_ok=True)
            tmp = header_path.with_name(header_path.name + ".tmp")
            tmp.write_text(json.dumps(full, indent=1, sort_keys=True))
            os.replace(tmp, header_path)
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise fmt.CaptureError(problem[0])

    # Rank 0 decides which shards are left (so every rank agrees) and they are dealt round-robin over DP.
    plan = [None]
    if rank == 0:
        pending, skipped = [], 0
        for split, data in datasets.items():
            for s in range(math.ceil(len(data) / args.samples_per_shard)):
                first = s * args.samples_per_shard
                if _shard_done(fmt.shard_path(output, split, s), {**header, "split": split, "first_sample": first}):
                    skipped += 1
                else:
                    pending.append((split, s))
        plan = [(pending, skipped)]
    dist.broadcast_object_list(plan, src=0)
    pending, skipped = plan[0]
    mine = pending[dp_rank::dp_size]
    # Expert parallelism exchanges tokens between data-parallel ranks inside every forward: all ranks must run as
    # many forwards, so those with less work run extra ones on a sample whose result is dropped.
    spans = {(split, s): (s * args.samples_per_shard, min((s + 1) * args.samples_per_shard, len(datasets[split])))
             for split, s in mine}
    forwards = torch.tensor(sum(math.ceil((b - a) / args.micro_batch) for a, b in spans.values()), device=device)
    dist.all_reduce(forwards, op=dist.ReduceOp.MAX)
    extra = int(forwards) - sum(math.ceil((b - a) / args.micro_batch) for a, b in spans.values())

    start = time.perf_counter()
    done_tokens = 0
    for split, s in mine:
        data = datasets[split]
        n_shards = math.ceil(len(data) / args.samples_per_shard)
        path = fmt.shard_path(output, split, s)
        first, last = spans[(split, s)]
        shard_header = {**header, "split": split, "first_sample": first}
        offsets, byte_offsets, positions, counts, rows = [0], [0], [], [], []
        for a in range(first, last, args.micro_batch):
            items = [data[i] for i in range(a, min(a + args.micro_batch, last))]
            for pos, ids, logprobs, log_tail in teacher_rows(model, items, device, vocab_size, compression.top_k,
                                                             args.all_positions, tp_group):
                # each packed sample shares its own byte budget: the rows do not depend on the micro-batch
                count = fmt.allocate_counts(ids, logprobs, log_tail, compression, vocab_size)
                rows.append(fmt.encode_rows(ids, logprobs, log_tail, count, compression))
                positions.append(pos)
                counts.append(count)
                offsets.append(offsets[-1] + len(pos))
                byte_offsets.append(byte_offsets[-1] + len(rows[-1]))
        if tp_rank == 0:
            fmt.write_shard(path, shard_header, np.array(offsets), np.array(byte_offsets), np.concatenate(positions),
                            np.concatenate(counts), np.concatenate(rows))
        done_tokens += offsets[-1]
        elapsed = time.perf_counter() - start
        if tp_rank == 0:
            print(f"[capture dp {dp_rank}/{dp_size}] {split} shard {s + 1}/{n_shards}: {offsets[-1]} rows, "
                  f"{done_tokens / elapsed:,.0f} tokens/s", flush=True)
    filler = next(iter(datasets.values()))
    for _ in range(extra):
        teacher_logits(model, [filler[0]] * args.micro_batch, device)
    dist.barrier()
    elapsed = time.perf_counter() - start
    summary = {}
    if rank == 0:
        rows_total = bytes_total = ids_total = 0
        for split, data in datasets.items():
            for s in range(math.ceil(len(data) / args.samples_per_shard)):
                shard = fmt.Shard(fmt.shard_path(output, split, s))
                rows_total += shard.header["rows"]
                ids_total += int(np.asarray(shard.counts, dtype=np.int64).sum())
                bytes_total += shard.path.stat().st_size
        summary = {"rows": rows_total, "bytes": bytes_total, "bytes_per_token": bytes_total / max(rows_total, 1),
                   "ids_per_row": ids_total / max(rows_total, 1), "seconds": round(elapsed, 3),
                   "shards_written": len(pending), "shards_skipped": skipped, "world": dist.get_world_size()}
        full = json.loads(header_path.read_text())
        full["summary"] = summary
        tmp = header_path.with_name(header_path.name + ".tmp")
        tmp.write_text(json.dumps(full, indent=1, sort_keys=True))
        os.replace(tmp, header_path)
        print(f"captured {rows_total:,} positions into {output}: {summary['bytes_per_token']:.1f} B/token "
              f"({summary['ids_per_row']:.1f} ids/row), {elapsed:.1f} s; {skipped} finished shard(s) skipped from "
              "an earlier run", flush=True)
    return summary


def compression_knobs(args: argparse.Namespace) -> dict:
    return {"top_k": args.top_k, "min_k": args.min_k, "bytes_per_token": args.bytes_per_token,
            "exact_k": args.exact_k, "quant_bits": args.quant_bits}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = fmt.Compression()
    parser.add_argument("--teacher", required=True, help="teacher checkpoint: HF directory or Megatron torch_dist")
    parser.add_argument("--data", required=True, help="prepare-data output directory")
    parser.add_argument("--output", required=True, help="capture directory (rerun the same command to resume)")
    parser.add_argument("--split", action="append", default=None, help="split(s) to capture (default: train)")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="most token ids stored per position")
    parser.add_argument("--min-k", type=int, default=d.min_k, help="fewest token ids stored per position")
    parser.add_argument("--bytes-per-token", type=float, default=d.bytes_per_token,
                        help="average bytes per stored position (row + 6-byte index) that each packed sample's "
                             "rows share, the ids going where they lower the KL most; 0: top-k ids in every row")
    parser.add_argument("--exact-k", type=int, default=d.exact_k, help="largest log-probs stored exactly (bf16)")
    parser.add_argument("--quant-bits", type=int, default=d.quant_bits,
                        help="bits per remaining log-prob (uniform grid in log space below the exact ones)")
    parser.add_argument("--all-positions", action="store_true",
                        help="store every real position, not only trained ones (label ≠ -100)")
    parser.add_argument("--samples-per-shard", type=int, default=1024, help="packed samples per shard file")
    parser.add_argument("--micro-batch", type=int, default=1, help="packed samples per teacher forward")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the teacher")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size of the teacher")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="teacher compute dtype (default: bf16 on GPU, fp32 on CPU)")


def run(args: argparse.Namespace) -> int:
    from ..train.trainer import distributed_context

    args.split = args.split or ["train"]
    args.dtype = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    if args.samples_per_shard < 1 or args.micro_batch < 1:
        print("error: --samples-per-shard and --micro-batch must be >= 1", file=sys.stderr)
        return 2
    try:
        fmt.Compression(**compression_knobs(args))
        with distributed_context():
            capture(args)
    except (fmt.CaptureError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
