"""`megatron-student check-capture DIR --teacher CKPT --samples N`: how faithful is a capture?

Recomputes the dense teacher on the stored positions of randomly chosen packed samples (whole samples, until at
least N positions) and compares it with

* the capture as stored (its real bytes/token: its files' size over its rows, headers and index included),
* the same positions re-encoded at other byte budgets of our format (128/192/256 B/token by default: the
  capture's budget reproduces the stored rows) and at a fixed k (64: every row the same ids), and
* a DistillKit-style baseline implemented from its documented format: top-k ids at ⌈log2 V⌉ bits, the first
  ``exact_k`` log-probs as bf16, a least-squares fit of the remaining sorted log-probs over polynomial terms of
  the normalised rank (fp32 coefficients), the missing mass 1 − Σ spread uniformly over the other ids (its
  ``symmetric_uniform`` densify); bytes/token by its formula ⌈(exact_k·16 + terms·32)/8⌉ + ⌈k·⌈log2 V⌉/8⌉
  (no position index). Its recommended setting (k=128, exact_k=16, terms 1, t, t², t³, t⁴, √t) and its budget
  one (k=50, exact_k=1, terms 1, t, √t).

Per setting: KL(dense ‖ reconstructed) in nats, its mean and p99 over the positions where it is finite and the
fraction where it is infinite (a reconstruction whose stored values carry all the mass, 1 − Σ ≤ 0, while the
teacher has a tail: DistillKit's fitted values can sum to 1 or more; it then has nothing to spread; its values
are renormalised to sum 1), top-1 agreement, the mean absolute error of the tail mass, bytes
per token. Every reconstruction spreads its tail evenly over the ids it does not store. Writes
``fidelity.json`` and ``fidelity.png`` (KL against bytes/token) to ``--report``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from . import format as fmt

DISTILLKIT = {
    "distillkit-recommended": {"k": 128, "exact_k": 16, "terms": ("1", "t", "t2", "t3", "t4", "sqrt")},
    "distillkit-budget": {"k": 50, "exact_k": 1, "terms": ("1", "t", "sqrt")},
}


def reconstruction_metrics(dense_log_p: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor) -> dict:
    """Per-position KL(dense ‖ reconstruction), top-1 match and tail error; the reconstruction puts exp(logprobs)
    on ``ids`` (slots with id −1 are padding) and the rest of the mass (1 − their sum, clamped at 0; if negative
    the stored values are renormalised) evenly on the other ids. float64, [n] each."""
    log_p = dense_log_p.double()
    n, vocab = log_p.shape
    valid = ids >= 0
    head = logprobs.double().masked_fill(~valid, -math.inf)
    head_mass = head.exp().sum(-1)
    over = head_mass > 1
    head = torch.where(over.unsqueeze(-1), head - head_mass.log().unsqueeze(-1), head)
    tail = (1 - head.exp().sum(-1)).clamp_min(0)
    rest = (vocab - valid.sum(-1)).clamp_min(1)
    log_r = (tail / rest).log().unsqueeze(-1).expand(n, vocab + 1).clone()
    log_r.scatter_(-1, torch.where(valid, ids, vocab), head)  # padding lands in the extra column, dropped
    log_r = log_r[:, :vocab]
    p = log_p.exp()
    kl = (p * (log_p - log_r)).nan_to_num(nan=0.0).sum(-1)
    dense_tail = 1 - torch.where(valid, p.gather(-1, ids.clamp_min(0)), 0.0).sum(-1)
    return {"kl": kl, "top1": (ids[:, 0] == log_p.argmax(-1)).double(), "tail_error": (tail - dense_tail).abs()}


def top_rows(log_p: torch.Tensor, k: int):
    """(ids, log-probabilities, log tail) of the top-k of full rows of log-probabilities (or logits)."""
    from ..ops.losses import vocab_parallel_topk

    return vocab_parallel_topk(log_p.float(), k)


def ours(samples: list, compression: fmt.Compression, vocab_size: int):
    """Our encoding of packed samples' rows, each sample sharing its byte budget as in a capture. ``samples``:
    per sample (ids [n, K], log-probabilities [n, K], log mass beyond them [n], rows to return [m]) with K ≥
    ``compression.top_k`` → (decoded ids and log-probabilities of the returned rows, bytes/token with the index
    over all rows)."""
    k = compression.top_k
    out_ids, out_lp, nbytes, rows = [], [], 0, 0
    for ids, values, log_tail, pick in samples:
        values = values.float()
        log_tail = torch.logaddexp(log_tail.double(), torch.logsumexp(values[:, k:].double(), -1)).float() \
            if values.shape[1] > k else log_tail
        ids, values = ids[:, :k].cpu(), values[:, :k].cpu()
        counts = fmt.allocate_counts(ids, values, log_tail, compression, vocab_size)
        data = fmt.encode_rows(ids, values, log_tail.cpu(), counts, compression)
        nbytes += len(data) + fmt.INDEX_BYTES * len(counts)
        rows += len(counts)
        d_ids, d_lp, _ = fmt.decode_rows(data, counts, compression, width=k)
        pick = torch.as_tensor(np.asarray(pick, dtype=np.int64))
        out_ids.append(d_ids[pick])
        out_lp.append(d_lp[pick])
    return torch.cat(out_ids), torch.cat(out_lp), nbytes / max(rows, 1)


def _terms(t: torch.Tensor, names) -> torch.Tensor:
    make = {"1": torch.ones_like, "t": lambda x: x, "t2": lambda x: x ** 2, "t3": lambda x: x ** 3,
            "t4": lambda x: x ** 4, "sqrt": torch.sqrt}
    return torch.stack([make[name](t) for name in names], -1)


def distillkit_style(dense_log_p: torch.Tensor, k: int, exact_k: int, terms) -> tuple[torch.Tensor, torch.Tensor]:
    values, ids = dense_log_p.double().topk(k, dim=-1)
    exact = values[:, :exact_k].to(torch.bfloat16).double()
    rest = values[:, exact_k:]
    if rest.shape[-1]:
        t = torch.linspace(0, 1, rest.shape[-1], dtype=torch.float64)
        basis = _terms(t, terms)  # [m, terms]
        coef = torch.linalg.lstsq(basis, rest.T).solution.T.float().double()  # fp32 coefficients
        rest = coef @ basis.T
    return ids, torch.cat([exact, rest], -1)


def distillkit_bytes(k: int, exact_k: int, terms, id_bits: int) -> int:
    return math.ceil((exact_k * 16 + len(terms) * 32) / 8) + math.ceil(k * id_bits / 8)


def fidelity_table(dense_log_p: torch.Tensor, samples: list, c: fmt.Compression, budgets, fixed_ks,
                   stored: dict | None = None) -> dict:
    """The table of ``check-capture`` for dense rows [n, V] of the positions compared; ``samples``: the packed
    samples they come from, as :func:`ours` takes them (the top rows of every position, the compared ones
    picked); ``stored``: settings already encoded (name → (ids, log-probs, bytes/token)); then ours at each byte
    budget and fixed k (the other knobs of ``c``), and the DistillKit-style baseline."""
    vocab = dense_log_p.shape[-1]
    settings = {name: (*rows, "ours") for name, rows in (stored or {}).items()}
    for budget in budgets:
        setting = dataclasses.replace(c, bytes_per_token=budget)
        settings[f"ours {budget:g} B budget"] = (*ours(samples, setting, vocab), "ours")
    for k in fixed_ks:
        setting = dataclasses.replace(c, top_k=k, min_k=min(c.min_k, k), bytes_per_token=0)
        settings[f"ours k = {k}"] = (*ours(samples, setting, vocab), "ours")
    for name, d in DISTILLKIT.items():
        settings[name] = (*distillkit_style(dense_log_p, d["k"], d["exact_k"], d["terms"]),
                          distillkit_bytes(d["k"], d["exact_k"], d["terms"], c.id_bits), "distillkit")
    table = {}
    for name, (ids_, logprobs_, nbytes, family) in settings.items():
        m = reconstruction_metrics(dense_log_p, ids_, logprobs_)
        finite = torch.isfinite(m["kl"])
        kl = m["kl"][finite] if bool(finite.any()) else m["kl"].new_full((1,), math.inf)
        table[name] = {"family": family, "bytes_per_token": float(nbytes), "kl_mean": kl.mean().item(),
                       "kl_p99": kl.quantile(0.99).item(), "kl_infinite": 1 - finite.double().mean().item(),
                       "top1": m["top1"].mean().item(), "tail_abs_error": m["tail_error"].mean().item()}
    return table


def print_table(table: dict) -> None:
    print("| setting | B/token | KL mean (finite rows) | KL p99 | rows with KL = ∞ | top-1 | tail abs err |\n"
          "|---|---|---|---|---|---|---|")
    for name, r in table.items():
        print(f"| {name} | {r['bytes_per_token']:.1f} | {r['kl_mean']:.3g} | {r['kl_p99']:.3g} | "
              f"{r['kl_infinite']:.1%} | {r['top1']:.4f} | {r['tail_abs_error']:.2e} |")


def check(args) -> dict:
    from megatron.core import parallel_state, tensor_parallel

    from ..data.storage import HarmonyPackedDataset
    from .capture import DTYPES, open_teacher, teacher_logits

    reader = fmt.CaptureReader(args.capture)
    header = reader.header
    split = args.split
    if split not in header["splits"]:
        raise fmt.CaptureError(f"{reader.root / fmt.CAPTURE_FILE}: split {split!r} was not captured "
                               f"(captured: {', '.join(header['splits'])})")
    model, config, config_dict, device = open_teacher(args.teacher, args.tp, args.ep, DTYPES[args.dtype])
    if fmt.vocabulary_hash(config.vocab_size) != header["vocab_sha256"]:
        raise fmt.CaptureError(f"{reader.root / fmt.CAPTURE_FILE}: captured with another vocabulary than "
                               f"{args.teacher}")
    identity = fmt.teacher_identity(args.teacher, config_dict)
    if identity != header["teacher"]:
        raise fmt.CaptureError(f"{reader.root / fmt.CAPTURE_FILE}: captured from another teacher than "
                               f"{args.teacher} (config or weight checksum differs)")
    data = HarmonyPackedDataset(header["data_path"] if args.data is None else args.data, split)
    if fmt.data_identity(data.directory.parent, split) != header["data"][split]:
        raise fmt.CaptureError(f"{reader.root / fmt.CAPTURE_FILE}: {data.directory} is not the data it was "
                               "captured from (file hashes differ)")
    c = reader.compression
    k = max(c.top_k, *args.top_k)
    rng = np.random.default_rng(args.seed)
    dense, stored, samples, compared = [], [], [], 0
    for i in rng.permutation(len(data)):
        positions, _ = reader.sample(split, int(i))
        if not len(positions):
            continue
        _, logits = teacher_logits(model, [data[int(i)]], device)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        logits = logits[torch.from_numpy(positions).long().to(logits.device), :config.vocab_size]
        # every position of the sample is re-encoded (they share its byte budget); a random subset is compared
        pick = np.sort(rng.permutation(len(positions))[:args.samples - compared])
        samples.append((*top_rows(logits, k), pick))
        dense.append(torch.log_softmax(logits[torch.from_numpy(pick).to(logits.device)].double(), -1).cpu())
        stored.append(reader.rows_at(split, int(i), positions[pick], width=c.top_k))
        compared += len(pick)
        if compared >= args.samples:
            break
    dense_log_p = torch.cat(dense)
    ids = torch.cat([s[0] for s in stored])
    logprobs = torch.cat([s[1] for s in stored])
    name = (f"capture ({c.bytes_per_token:g} B budget, k ≤ {c.top_k})" if c.bytes_per_token else
            f"capture (k = {c.top_k})")
    table = fidelity_table(dense_log_p, samples, c, args.bytes_per_token, args.top_k,
                           stored={name: (ids, logprobs, header["summary"]["bytes_per_token"])})
    result = {"capture": str(reader.root), "positions": int(dense_log_p.shape[0]), "settings": table}
    if torch.distributed.get_rank() == 0:
        report = Path(args.report or Path(args.capture) / "check")
        report.mkdir(parents=True, exist_ok=True)
        (report / "fidelity.json").write_text(json.dumps(result, indent=1))
        _plot(table, report / "fidelity.png", result["positions"])
        print(f"fidelity of {reader.root} on {result['positions']} positions (KL in nats):")
        print_table(table)
        print(f"wrote {report / 'fidelity.json'} and {report / 'fidelity.png'}", flush=True)
    return result


def _plot(table: dict, path: Path, positions: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for family, marker in (("ours", "o"), ("distillkit", "s")):
        rows = [(name, r) for name, r in table.items() if r["family"] == family]
        ax.scatter([r["bytes_per_token"] for _, r in rows], [max(r["kl_mean"], 1e-12) for _, r in rows],
                   marker=marker, label="megatron-student" if family == "ours" else "DistillKit-style")
        for name, r in rows:
            ax.annotate(name, (r["bytes_per_token"], max(r["kl_mean"], 1e-12)), fontsize=7)
    ax.set_xlabel("bytes / token")
    ax.set_ylabel("mean KL(dense ‖ reconstructed), nats")
    ax.set_yscale("log")
    ax.set_title(f"capture fidelity ({positions} positions)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("capture", help="capture-teacher output directory")
    parser.add_argument("--teacher", required=True, help="the teacher it was captured from")
    parser.add_argument("--samples", type=int, default=256, help="positions to compare")
    parser.add_argument("--data", default=None, help="prepared data (default: the path the capture records)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--bytes-per-token", type=float, nargs="*", default=[128, 192, 256],
                        help="our byte budgets to compare (the capture's other knobs)")
    parser.add_argument("--top-k", type=int, nargs="*", default=[64],
                        help="our fixed-k settings to compare (every row k ids, no budget)")
    parser.add_argument("--seed", type=int, default=0, help="which samples are drawn")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the teacher")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size of the teacher")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32",
                        help="the dense reference's compute dtype (fp32 unless it does not fit)")
    parser.add_argument("--report", default=None, help="where fidelity.json/.png go (default: CAPTURE/check)")


def run(args: argparse.Namespace) -> int:
    from ..train.trainer import distributed_context

    try:
        with distributed_context():
            check(args)
    except (fmt.CaptureError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
