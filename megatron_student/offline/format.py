"""The compressed on-disk form of a captured teacher: one variable-length row per stored position.

A capture directory::

    capture.json                 the capture header (below) and, once finished, its summary
    <split>/shard_00000.cap      samples [0, S) of the split, S = ``samples_per_shard``
    <split>/shard_00001.cap      samples [S, 2S) …

A shard is keyed by the prepared dataset's sample indices alone, so it does not depend on the capture's or a
training run's TP/EP/DP, micro-batch, seed or sampler order: a reader asks for (split, sample, position).

Shard file (format version 3): ``MAGIC`` (8 bytes), u64 little-endian header length, the header as UTF-8 JSON,
zero padding to 8 bytes, then ``offsets`` int64 [samples + 1] (row range of each sample), ``byte_offsets`` int64
[samples + 1] (its byte range in ``data``), ``positions`` int32 [rows] (the logits row within the sample, 0-based:
position t holds the teacher's distribution of token t + 1), ``counts`` uint16 [rows] (ids stored in each row),
``data`` uint8 [bytes] (each sample's rows). The header records every length, so a truncated file is detected
from its size; rows that do not decode to exactly their sample's bytes are reported as damage.

A row (``Compression``) holds temperature-1 log-probabilities of ``n`` ids sorted by descending probability:

* the tail mass ``1 − Σ_stored p`` as float32 log (−inf when the row covers the vocabulary), computed from the
  dense logits by a log-sum-exp over the other ids, not by subtraction;
* the first ``exact_k`` log-probabilities as bf16, then the row's smallest stored one (the *floor*) as bf16;
* the order k (5 bits) of the Exp-Golomb code of its id gaps, then the ``exact_k`` most probable ids,
  ``id_bits`` bits each (18 for gpt-oss's 201,088 ids);
* the other ``n − exact_k`` ids as a set: in increasing id order, each with a ``quant_bits``-bit code of its
  log-probability on a uniform grid in log space between the last exact value and the floor (error ≤ half a step),
  and the gaps between consecutive ids (id − previous − 1, the first from −1) in Exp-Golomb order k: g as the m + 1
  bits of g + 2^k behind m − k zeros (m = ⌊log2(g + 2^k)⌋), 2m − k + 1 bits; k is the row's cheapest. A set of
  ~100 ids of 201,088 then costs ~12–13 bits an id instead of 18 (the entropy of a random such set is ~12.4) and
  less when the ids cluster, as a language model's likely tokens do in a BPE vocabulary.

Rows are written in chunks of ``ENCODE_CHUNK_ROWS``, each chunk starting on a byte: the fixed part of every row
(tail, exact values, floor, order, exact ids), then every row's codes, then the gaps' zero-prefixes, then their
remaining bits, so that a chunk decodes with array operations (the prefixes end at the ones; their lengths give
the rest).

How many ids a row stores (``n`` in [``min_k``, ``top_k``]) is chosen per packed sample: with a byte budget
(``bytes_per_token`` > 0) the sample's rows share ``bytes_per_token × rows`` bytes (the index included), and each
extra id goes where it lowers the reconstruction KL most (``allocate_counts``): a confident position keeps a few
ids, a flat one many. ``bytes_per_token`` = 0 stores ``top_k`` ids in every row.

Decoding rescales the stored probabilities so that they sum to exactly ``1 − tail``: the tail bucket is kept exact
and the quantisation error stays among the stored ids. Decoded rows are padded to a common width with id −1 and
log-probability −inf (``ops.losses.sparse_logit_losses`` skips those slots); the order of the ids within a row does
not matter to the losses. Format 2 (18-bit ids in probability order) is refused with its version named.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import sha256_file

VERSION = 3
MAGIC = b"MSTCAP03"
MAGIC_PREFIX = b"MSTCAP"
CAPTURE_FILE = "capture.json"
SHARD_SUFFIX = ".cap"
INDEX_BYTES = 6  # per row: its int32 position and its uint16 count
PAD_ID = -1
ORDER_BITS = 5  # a row's Exp-Golomb order of its id gaps
ENCODE_CHUNK_ROWS = 1024  # rows encoded together; each chunk starts on a byte


class CaptureError(ValueError):
    """A capture that cannot be used as asked; the message names the file."""


@dataclass(frozen=True)
class Compression:
    """Knobs of the row encoding (``capture-teacher --top-k --min-k --bytes-per-token --exact-k --quant-bits``):
    at most ``top_k`` and at least ``min_k`` ids a row, ``bytes_per_token`` the average budget of a sample's rows
    with their index (0: every row ``top_k`` ids), the ``exact_k`` largest log-probs as bf16, the others
    ``quant_bits``-bit codes; ``id_bits`` = ⌈log2 vocabulary⌉."""

    top_k: int = 256
    min_k: int = 4
    bytes_per_token: float = 192.0
    exact_k: int = 2
    quant_bits: int = 4
    id_bits: int = 18

    def __post_init__(self):
        if not 2 <= self.top_k < 1 << 16:
            raise ValueError(f"top-k must be in [2, 65535], got {self.top_k}")
        if not 1 <= self.exact_k < self.top_k:
            raise ValueError(f"exact-k must be in [1, top-k={self.top_k}), got {self.exact_k}")
        if not self.exact_k < self.min_k <= self.top_k:
            raise ValueError(f"min-k must be in (exact-k={self.exact_k}, top-k={self.top_k}], got {self.min_k}")
        if not 1 <= self.quant_bits <= 16:
            raise ValueError(f"quant-bits must be in [1, 16], got {self.quant_bits}")
        if not 1 <= self.id_bits <= 30:
            raise ValueError(f"id-bits must be in [1, 30], got {self.id_bits}")
        smallest = (self.fixed_bits(self.min_k) + (self.min_k - self.exact_k) * self.id_bits + 7) // 8 + INDEX_BYTES
        if self.bytes_per_token and self.bytes_per_token < smallest:
            raise ValueError(f"bytes-per-token {self.bytes_per_token} is below a row of min-k={self.min_k} ids "
                             f"(~{smallest} B with its index)")

    @staticmethod
    def for_vocab(vocab_size: int, **knobs) -> "Compression":
        return Compression(id_bits=max(1, math.ceil(math.log2(vocab_size))), **knobs)

    def fixed_bits(self, count):
        """Bits of a row of ``count`` ids other than its id gaps' codes: the tail, the exact values and the floor,
        the gaps' code order, the exact ids, a code per other id."""
        return 32 + 16 * self.exact_k + 16 + ORDER_BITS + self.exact_k * self.id_bits + \
            (count - self.exact_k) * self.quant_bits


def _bit_length(x: np.ndarray) -> np.ndarray:
    """⌊log2 x⌋ + 1 of positive ints (exact: frexp of a float64 holding an int < 2^53)."""
    return np.frexp(x.astype(np.float64))[1].astype(np.int64)


def _by_id(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ids in increasing order and their ranks (places in the row by descending probability)."""
    rank = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, rank, 1), rank


def _gaps(ordered: np.ndarray, rank: np.ndarray, counts: np.ndarray, exact_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids a row codes by gap (ranks in [exact_k, count)), in increasing order → (which of ``ordered`` they are
    [n, K], their gaps [n, K]: id − previous such id − 1, the first one's the id itself; 0 elsewhere)."""
    coded = (rank >= exact_k) & (rank < counts[:, None])
    last = np.maximum.accumulate(np.where(coded, ordered, -1), axis=1)
    previous = np.concatenate([np.full((len(ordered), 1), -1, np.int64), last[:, :-1]], 1)
    return coded, np.where(coded, ordered - previous - 1, 0)


def _exp_golomb(gaps: np.ndarray, coded: np.ndarray, id_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row the Exp-Golomb order with the fewest bits for its gaps and that many bits ([n] each).

    Order k writes g as the m + 1 bits of v = g + 2^k (m = ⌊log2 v⌋ ≥ k) behind m − k zeros: 2m − k + 1 bits, k + 1
    for g < 2^k. A histogram of the gaps' bit lengths b prices every order at once (2b − k − 1 for g ≥ 2^k, off by
    at most 2 bits a gap); the exact sizes then decide between the best such order and its neighbours. A language
    model's ids cluster, so the best order is well below log2 of the mean gap."""
    n, width = len(gaps), id_bits + 2
    lengths = _bit_length(gaps)  # 0 for g = 0
    hist = np.bincount((np.arange(n)[:, None] * width + lengths)[coded], minlength=n * width).reshape(n, width)
    orders = np.arange(min(id_bits, (1 << ORDER_BITS) - 1) + 1)
    short = np.cumsum(hist, 1)[:, orders]  # gaps below 2^k
    long_bits = (hist * np.arange(width)).sum(1, keepdims=True) - np.cumsum(hist * np.arange(width), 1)[:, orders]
    priced = (orders + 1) * short + 2 * long_bits - (orders + 1) * (hist.sum(1, keepdims=True) - short)
    guess = priced.argmin(1)
    best_k, best_bits = np.zeros(n, np.int64), np.full(n, np.iinfo(np.int64).max)
    for shift in (-1, 0, 1):
        k = np.clip(guess + shift, 0, orders[-1])
        bits = np.where(coded, 2 * _bit_length(gaps + (1 << k)[:, None]) - k[:, None] - 1, 0).sum(1)
        better = bits < best_bits
        best_k, best_bits = np.where(better, k, best_k), np.where(better, bits, best_bits)
    return best_k, best_bits


def allocate_counts(ids: torch.Tensor, logprobs: torch.Tensor, log_tail: torch.Tensor, c: Compression,
                    vocab_size: int) -> np.ndarray:
    """How many ids each row of one packed sample stores: [n, top_k] ids and log-probabilities by descending
    probability and the log mass beyond them [n] → counts int64 [n].

    Storing the (j+1)-th id of a row lowers its reconstruction KL (the tail spread evenly over the unstored ids)
    by g_j = p_j log p_j − T_j log(T_j / (V − j)) + T_{j+1} log(T_{j+1} / (V − j − 1)), T_j the mass beyond the
    first j. With a budget, the extra ids (beyond ``min_k``) with the largest gains are kept, as many as the
    sample's bytes allow (found by regula falsi on the exact encoded size); each row's gains are made
    non-increasing (a running minimum) so that the kept ids of a row are its most probable ones."""
    n, k = logprobs.shape
    counts = np.full(n, c.top_k, dtype=np.int64)
    if not c.bytes_per_token or n == 0:
        return counts
    lp = logprobs.double().cpu()
    p = lp.exp()
    beyond = log_tail.double().cpu().exp().unsqueeze(-1)
    tails = torch.cat([p.flip(-1).cumsum(-1).flip(-1), torch.zeros(n, 1, dtype=torch.float64)], -1) + beyond
    rest = vocab_size - torch.arange(k + 1, dtype=torch.float64)

    def spread(t, r):  # T log(T / r), 0 when T = 0 or nothing is left to spread over
        return torch.where((t > 0) & (r > 0), t * torch.log(t.clamp_min(1e-300) / r.clamp_min(1)), 0.0)

    gains = torch.where(p > 0, p * lp, 0.0) - spread(tails[:, :-1], rest[:-1]) + spread(tails[:, 1:], rest[1:])
    gains = torch.cummin(gains[:, c.min_k:], dim=-1).values
    order = np.argsort(-gains.reshape(-1).numpy(), kind="stable")
    ordered, rank = _by_id(ids.cpu().numpy().astype(np.int64))
    budget_bits = n * (c.bytes_per_token - INDEX_BYTES) * 8

    def counts_for(extra: int) -> np.ndarray:
        chosen = np.full(n, c.min_k, dtype=np.int64)
        np.add.at(chosen, order[:extra] // gains.shape[1], 1)
        return chosen

    def size_bits(chosen: np.ndarray) -> int:
        coded, gaps = _gaps(ordered, rank, chosen, c.exact_k)
        gap_bits = _exp_golomb(gaps, coded, c.id_bits)[1]
        return int(c.fixed_bits(chosen).sum() + gap_bits.sum()) + 8 * math.ceil(n / ENCODE_CHUNK_ROWS)

    # The most extra ids that fit, to within a sixteenth of an id a row: regula falsi (Illinois) on the size,
    # which grows almost linearly with the ids kept, between low (fits) and high (does not).
    low, high = 0, gains.numel()
    over_low, over_high = size_bits(counts_for(low)) - budget_bits, size_bits(counts_for(high)) - budget_bits
    if over_high <= 0 or over_low > 0:
        return counts_for(high if over_high <= 0 else low)
    side = 0
    while high - low > max(1, n // 16):
        guess = low + int((high - low) * -over_low / (over_high - over_low))
        guess = min(max(guess, low + 1), high - 1)
        over = size_bits(counts_for(guess)) - budget_bits
        if over <= 0:
            low, over_low = guess, over
            over_high = over_high / 2 if side == -1 else over_high
            side = -1
        else:
            high, over_high = guess, over
            over_low = over_low / 2 if side == 1 else over_low
            side = 1
    return counts_for(low)


def _bits(values: np.ndarray, bits: int) -> np.ndarray:
    """[n, m] non-negative ints → [n, m·bits] 0/1 uint8, each value ``bits`` bits little-endian."""
    n, m = values.shape
    wide = np.uint64 if bits > 32 else np.uint32
    planes = (values.astype(wide)[..., None] >> np.arange(bits, dtype=wide)) & 1
    return planes.astype(np.uint8).reshape(n, m * bits)


def _from_bits(planes: np.ndarray, m: int, bits: int) -> np.ndarray:
    """[n, m·bits] 0/1 → [n, m] int64, the inverse of :func:`_bits` (packed a byte at a time)."""
    n = planes.shape[0]
    size = next(b for b in (8, 16, 32, 64) if bits <= b)
    planes = planes.reshape(n, m, bits)
    if bits < size:
        planes = np.concatenate([planes, np.zeros((n, m, size - bits), np.uint8)], -1)
    packed = np.ascontiguousarray(np.packbits(planes, axis=-1, bitorder="little"))
    return packed.view(f"<u{size // 8}").reshape(n, m).astype(np.int64)


def _bf16_bits(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.int64)


def _from_bf16(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(raw.astype(np.uint16).view(np.int16)).view(torch.bfloat16).to(torch.float32)


def encode_rows(ids: torch.Tensor, logprobs: torch.Tensor, log_tail: torch.Tensor, counts: np.ndarray,
                c: Compression) -> np.ndarray:
    """[n, K] ids and log-probabilities sorted by descending probability, [n] log mass beyond all K, [n] ids to
    store per row (≤ K) → the rows' bytes (rows of ``ENCODE_CHUNK_ROWS`` each a byte-aligned block). The tail of a
    row is the mass beyond its own ``counts[i]`` ids."""
    n, k = ids.shape
    counts = np.asarray(counts, dtype=np.int64)
    if logprobs.shape != (n, k) or log_tail.shape != (n,) or counts.shape != (n,):
        raise ValueError(f"encode_rows: ids {tuple(ids.shape)}, logprobs {tuple(logprobs.shape)}, tail "
                         f"{tuple(log_tail.shape)}, counts {counts.shape}")
    if n and not (c.exact_k < counts.min() and counts.max() <= min(k, c.top_k)):
        raise ValueError(f"row counts must be in ({c.exact_k}, {min(k, c.top_k)}], got [{counts.min()}, "
                         f"{counts.max()}]")
    if n and (int(ids.min()) < 0 or int(ids.max()) >= 1 << c.id_bits):
        raise ValueError(f"token ids [{int(ids.min())}, {int(ids.max())}] do not fit in {c.id_bits} bits")
    return np.concatenate([_encode_chunk(ids[a:a + ENCODE_CHUNK_ROWS], logprobs[a:a + ENCODE_CHUNK_ROWS],
                                         log_tail[a:a + ENCODE_CHUNK_ROWS], counts[a:a + ENCODE_CHUNK_ROWS], c)
                           for a in range(0, n, ENCODE_CHUNK_ROWS)] or [np.zeros(0, np.uint8)])


def _encode_chunk(ids, logprobs, log_tail, counts, c: Compression) -> np.ndarray:
    n, e = ids.shape[0], c.exact_k
    width = int(counts.max())
    every = logprobs.double().cpu()
    kept = torch.arange(every.shape[1]).unsqueeze(0) < torch.from_numpy(counts).unsqueeze(-1)
    # the row's own tail: the mass beyond all K plus that of the ids it does not keep
    tail = torch.logaddexp(log_tail.double().cpu(), torch.logsumexp(every.masked_fill(kept, -math.inf), -1))
    lp = every[:, :width]
    anchor = lp[:, e - 1].to(torch.bfloat16).double()
    floor = torch.minimum(lp.gather(-1, torch.from_numpy(counts - 1).unsqueeze(-1)).squeeze(-1),
                          anchor).to(torch.bfloat16).double()
    span = (anchor - floor).unsqueeze(-1).clamp_min(1e-30)
    codes = torch.round(((anchor.unsqueeze(-1) - lp[:, e:]) / span).clamp(0, 1).nan_to_num(0.0)
                        * ((1 << c.quant_bits) - 1)).to(torch.int64).numpy()
    all_ids = ids[:, :width].cpu().numpy().astype(np.int64)
    ordered, rank = _by_id(all_ids)
    coded, gaps = _gaps(ordered, rank, counts, e)
    k = _exp_golomb(gaps, coded, c.id_bits)[0]
    codes = np.take_along_axis(np.concatenate([np.zeros((n, e), np.int64), codes], 1), rank, 1)
    tail_bits = tail.float().numpy().astype("<f4").view("<u4").astype(np.int64)
    heads = np.concatenate([_bits(tail_bits[:, None], 32), _bits(_bf16_bits(lp[:, :e].float()), 16),
                            _bits(_bf16_bits(floor.float())[:, None], 16), _bits(k[:, None], ORDER_BITS),
                            _bits(all_ids[:, :e], c.id_bits)], axis=1)
    # then the other ids' codes, row after row, and their gaps: each m − k zeros and a one (the prefixes), then
    # each v's low m bits (the mantissas)
    codes = _bits(codes[coded][:, None], c.quant_bits)
    row_k = np.repeat(k, counts - e)
    values = gaps[coded] + (1 << row_k)
    m = _bit_length(values) - 1
    prefixes = np.zeros(int((m - row_k + 1).sum()), np.uint8)
    prefixes[np.cumsum(m - row_k + 1) - 1] = 1
    mantissas = _bits(values[:, None], c.id_bits + 1)[np.arange(c.id_bits + 1)[None, :] < m[:, None]]
    return np.packbits(np.concatenate([heads.reshape(-1), codes.reshape(-1), prefixes, mantissas]),
                       bitorder="little")


def decode_rows(data: np.ndarray, counts: np.ndarray, c: Compression,
                width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bytes of consecutive rows (one ``encode_rows`` output) and their counts → (ids int64 [n, width],
    log-probabilities float32 [n, width] rescaled to sum 1 − tail, log tail mass float32 [n]); ``width`` defaults
    to the largest count. A row holds its ``exact_k`` most probable ids first, then its others in increasing id
    order; slots beyond a row's count hold id −1 and log-probability −inf. Bytes that do not decode to exactly
    these rows raise ValueError."""
    counts = np.asarray(counts, dtype=np.int64)
    data = np.asarray(data, dtype=np.uint8)
    n = len(counts)
    width = int(counts.max(initial=c.exact_k + 1)) if width is None else width
    if n and not (c.exact_k < counts.min() and counts.max() <= width):
        raise ValueError(f"row counts must be in ({c.exact_k}, {width}], got [{counts.min()}, {counts.max()}]")
    bits = np.unpackbits(data, bitorder="little")
    ids = np.full((n, width), PAD_ID, np.int64)
    logprobs = np.full((n, width), -np.inf, np.float32)
    log_tail = np.zeros(n, np.float32)
    at = 0
    for a in range(0, n, ENCODE_CHUNK_ROWS):
        rows = slice(a, a + ENCODE_CHUNK_ROWS)
        at = _decode_chunk(bits, at, counts[rows], c, ids[rows], logprobs[rows], log_tail[rows])
    if at != len(data):
        raise ValueError(f"{len(data)} bytes for rows that decode from {at}")
    ids, logprobs, log_tail = torch.from_numpy(ids), torch.from_numpy(logprobs), torch.from_numpy(log_tail)
    # Keep the tail exact: the stored probabilities carry exactly 1 − tail.
    head_mass = torch.log(-torch.expm1(log_tail.double())).float()  # log(1 − tail)
    logprobs = logprobs - torch.logsumexp(logprobs, -1, keepdim=True) + head_mass.unsqueeze(-1)
    return ids, logprobs, log_tail


def _decode_chunk(bits: np.ndarray, start_byte: int, counts: np.ndarray, c: Compression, ids: np.ndarray,
                  logprobs: np.ndarray, log_tail: np.ndarray) -> int:
    """Decode the chunk of rows at byte ``start_byte`` into the given (padded) views; returns the byte after it."""
    n, e = len(counts), c.exact_k
    head_bits, rest = c.fixed_bits(e), counts - e
    total = int(rest.sum())
    start = 8 * start_byte
    fixed_end = start + n * head_bits + total * c.quant_bits
    if fixed_end > len(bits):
        raise ValueError(f"the bytes end inside the rows' fixed fields (byte {start_byte})")
    head = bits[start:start + n * head_bits].reshape(n, head_bits)
    fields = np.split(head, np.cumsum([32, 16 * e, 16, ORDER_BITS]), axis=1)
    log_tail[:] = _from_bits(fields[0], 1, 32)[:, 0].astype("<u4").view("<f4")
    exact = _from_bf16(_from_bits(fields[1], e, 16)).numpy()
    floor = _from_bf16(_from_bits(fields[2], 1, 16)).numpy()
    k = _from_bits(fields[3], 1, ORDER_BITS)[:, 0]
    exact_ids = _from_bits(fields[4], e, c.id_bits)
    codes = _from_bits(bits[start + n * head_bits:fixed_end].reshape(1, -1), total, c.quant_bits)[0]
    # the gaps: a prefix of m − k zeros ends at each one; the mantissas follow the last prefix
    reach = 4 * total  # prefixes are a few bits each: look that far first, then as far as they can go
    ones = np.flatnonzero(bits[fixed_end:fixed_end + reach])[:total]
    if len(ones) < total:
        ones = np.flatnonzero(bits[fixed_end:fixed_end + total * (c.id_bits + 1)])[:total]
    if len(ones) < total:
        raise ValueError(f"the bytes end inside the rows' id codes (byte {start_byte})")
    row_k = np.repeat(k, rest)
    m = np.diff(ones, prepend=-1) - 1 + row_k
    if total and m.max() > c.id_bits:
        raise ValueError(f"an id code longer than {c.id_bits} bits (byte {start_byte}): damaged data")
    mantissa_start = fixed_end + (int(ones[-1]) + 1 if total else 0)
    end = mantissa_start + int(m.sum())
    if end > len(bits):
        raise ValueError(f"the bytes end inside the rows' id codes (byte {start_byte})")
    # each mantissa bit weighs 2^(its place in its code): one pass over the stream
    code = np.repeat(np.arange(total), m)
    place = np.arange(len(code)) - np.repeat(np.cumsum(m) - m, m)
    low = np.bincount(code, weights=bits[mantissa_start:end].astype(np.float64) * np.exp2(place), minlength=total)
    gaps = low.astype(np.int64) + (1 << m) - (1 << row_k)
    steps = np.cumsum(gaps + 1)
    first = np.concatenate([[0], np.cumsum(rest)[:-1]])
    before = np.where(first > 0, steps[np.maximum(first - 1, 0)], 0)
    middle_ids = steps - 1 - np.repeat(before, rest)
    if total and middle_ids.max() >= 1 << c.id_bits:
        raise ValueError(f"an id beyond {c.id_bits} bits (byte {start_byte}): damaged data")
    slots = np.arange(ids.shape[1] - e)[None, :] < rest[:, None]
    anchor = np.repeat(exact[:, -1], rest)
    middle = anchor - (anchor - np.repeat(floor[:, 0], rest)) * codes.astype(np.float32) / ((1 << c.quant_bits) - 1)
    ids[:, :e], logprobs[:, :e] = exact_ids, exact
    ids[:, e:][slots] = middle_ids
    logprobs[:, e:][slots] = middle
    return (end + 7) // 8


# --------------------------------------------------------------------------------------------------------------
# Identity hashes


def teacher_identity(path: str | os.PathLike, config_dict: dict) -> dict:
    """The teacher's config hash and one SHA-256 over its weight files (names and contents, in name order)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".distcp", ".pt"))
    if not files:
        raise CaptureError(f"{path}: no weight files (*.safetensors, *.distcp, *.pt) to checksum")
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(path)).encode())
        sha256_file(p, h)
    config = {k: v for k, v in config_dict.items() if k not in ("transformers_version", "_name_or_path")}
    return {"config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
            "weights_sha256": h.hexdigest(), "weight_files": len(files)}


def vocabulary_hash(vocab_size: int) -> str:
    """The teacher vocabulary: harmony's o200k ranks file (by its pinned digest) at the model's vocabulary size."""
    from ..harmony_vocab import O200K_SHA256

    return hashlib.sha256(json.dumps({"o200k_sha256": O200K_SHA256, "vocab_size": vocab_size}).encode()).hexdigest()


def data_identity(prepared: str | os.PathLike, split: str) -> dict:
    """SHA-256 of each file of a prepared split (index.json and every shard file)."""
    directory = Path(prepared) / split
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------------------------------------------
# Shards


def shard_path(root: Path, split: str, shard: int) -> Path:
    return Path(root) / split / f"shard_{shard:05d}{SHARD_SUFFIX}"


def write_shard(path: Path, header: dict, offsets: np.ndarray, byte_offsets: np.ndarray, positions: np.ndarray,
                counts: np.ndarray, data: np.ndarray) -> None:
    """Write one shard atomically (``.tmp`` then rename)."""
    header = {**header, "rows": int(len(positions)), "samples": int(len(offsets) - 1), "bytes": int(len(data))}
    raw = json.dumps(header, sort_keys=True).encode()
    raw += b" " * (-(len(raw) + 16) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(raw)) + raw)
        for array, dtype in ((offsets, "<i8"), (byte_offsets, "<i8"), (positions, "<i4"), (counts, "<u2"),
                             (data, np.uint8)):
            f.write(np.ascontiguousarray(array, dtype=dtype).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Shard:
    """A memory-mapped shard; ``sample(i)`` gives (positions, counts, row bytes) of the shard's i-th sample."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CaptureError(f"{self.path}: missing capture shard")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:6] != MAGIC_PREFIX:
                raise CaptureError(f"{self.path}: not a capture shard (bad magic) or truncated")
            if head[:8] != MAGIC:
                raise CaptureError(f"{self.path}: capture shard format {head[6:8].decode(errors='replace')}, this "
                                   f"reader understands {MAGIC[6:].decode()} (recapture with this version)")
            (length,) = struct.unpack("<Q", head[8:])
            try:
                self.header = json.loads(f.read(length))
            except ValueError as e:
                raise CaptureError(f"{self.path}: unreadable header ({e}); the file is truncated or damaged") from e
        try:
            self.compression = Compression(**self.header["compression"])
            n, rows, nbytes = self.header["samples"], self.header["rows"], self.header["bytes"]
        except (KeyError, TypeError, ValueError) as e:
            raise CaptureError(f"{self.path}: header without valid samples/rows/bytes/compression ({e})") from e
        at = 16 + length
        expected = at + 16 * (n + 1) + 6 * rows + nbytes
        if size != expected:
            raise CaptureError(f"{self.path}: {size} bytes, the header describes {expected}; the file is truncated "
                               "or damaged (delete it and rerun capture-teacher to redo it)")
        arrays = {}
        for name, dtype, count in (("offsets", "<i8", n + 1), ("byte_offsets", "<i8", n + 1),
                                   ("positions", "<i4", rows), ("counts", "<u2", rows), ("data", np.uint8, nbytes)):
            arrays[name] = np.memmap(self.path, dtype=dtype, mode="r", offset=at, shape=(count,))
            at += count * np.dtype(dtype).itemsize
        self.offsets, self.byte_offsets = arrays["offsets"], arrays["byte_offsets"]
        self.positions, self.counts, self.data = arrays["positions"], arrays["counts"], arrays["data"]

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        x, y = int(self.byte_offsets[i]), int(self.byte_offsets[i + 1])
        return np.array(self.positions[a:b]), np.array(self.counts[a:b], dtype=np.int64), np.array(self.data[x:y])

    def decode(self, i: int, width: int | None = None):
        """(positions, ``decode_rows`` of the rows) of the shard's i-th sample; rows that do not decode are an
        error naming the file."""
        positions, counts, data = self.sample(i)
        try:
            return positions, decode_rows(data, counts, self.compression, width)
        except ValueError as e:
            raise CaptureError(f"{self.path}: sample {i} does not decode ({e}); the file is damaged") from e


class CaptureReader:
    """Rows of a capture by (split, sample index, position), with the checks a training run needs: the
    capture's vocabulary and the prepared data it was made from (pass what you expect; None skips a check).

    A training step asks :meth:`micro_batch` for the rows of the packed samples it drew (any TP/DP layout, any
    order): dense per-position tensors that go straight to ``ops.losses.sparse_logit_losses``."""

    def __init__(self, root: str | os.PathLike, *, vocab_hash: str | None = None, data: dict | None = None):
        self.root = Path(root)
        header_path = self.root / CAPTURE_FILE
        if not self.root.is_dir():
            raise CaptureError(f"{self.root}: no such capture directory")
        if not header_path.is_file():
            raise CaptureError(f"{header_path}: no capture here (run megatron-student capture-teacher)")
        try:
            self.header = json.loads(header_path.read_text())
        except ValueError as e:
            raise CaptureError(f"{header_path}: unreadable ({e})") from e
        if self.header.get("version") != VERSION:
            raise CaptureError(f"{header_path}: capture format version {self.header.get('version')}, this reader "
                               f"understands {VERSION} (recapture with this version of capture-teacher)")
        if vocab_hash is not None and self.header["vocab_sha256"] != vocab_hash:
            raise CaptureError(f"{header_path}: captured with another vocabulary (hash "
                               f"{self.header['vocab_sha256'][:12]}…, expected {vocab_hash[:12]}…)")
        if data is not None:
            for split, files in data.items():
                mine = self.header["data"].get(split)
                if mine != files:
                    changed = sorted(k for k in set(files) | set(mine or {}) if (mine or {}).get(k) != files.get(k))
                    raise CaptureError(f"{header_path}: split {split!r} does not match the prepared data it was "
                                       f"captured from (differing files: {', '.join(changed) or 'the split'})")
        self.compression = Compression(**self.header["compression"])
        self.vocab_size = int(self.header["vocab_size"])
        self.samples_per_shard = int(self.header["samples_per_shard"])
        self._shards: dict[tuple[str, int], Shard] = {}

    def shard(self, split: str, index: int) -> Shard:
        key = (split, index)
        if key not in self._shards:
            shard = Shard(shard_path(self.root, split, index))
            for name in ("teacher", "vocab_sha256", "compression", "version"):
                if shard.header.get(name) != self.header[name]:
                    raise CaptureError(f"{shard.path}: header {name!r} differs from {self.root / CAPTURE_FILE}")
            self._shards[key] = shard
        return self._shards[key]

    def sample(self, split: str, sample: int,
               width: int | None = None) -> tuple[np.ndarray, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(positions int32 [r], decoded (ids, log-probabilities, log tail) of ``decode_rows``) of one sample."""
        total = self.header["splits"].get(split, {}).get("samples")
        if total is None or not 0 <= sample < total:
            raise CaptureError(f"{self.root / CAPTURE_FILE}: no sample {sample} of split {split!r} "
                               f"({total or 0} captured)")
        return self.shard(split, sample // self.samples_per_shard).decode(sample % self.samples_per_shard, width)

    def rows_at(self, split: str, sample: int, positions: np.ndarray, width: int | None = None):
        """Decoded rows of ``positions`` of one sample; a position that was not captured is an error."""
        stored, (ids, logprobs, log_tail) = self.sample(split, sample, width)
        where = {int(p): i for i, p in enumerate(stored)}
        missing = [int(p) for p in positions if int(p) not in where]
        if missing:
            path = shard_path(self.root, split, sample // self.samples_per_shard)
            raise CaptureError(f"{path}: sample {sample} has no row for positions {missing[:8]}")
        pick = torch.tensor([where[int(p)] for p in positions], dtype=torch.long)
        return ids[pick], logprobs[pick], log_tail[pick]

    def micro_batch(self, split: str, samples, seq_len: int, required: torch.Tensor | None = None):
        """The teacher of packed samples ``samples`` (dataset indices, in micro-batch order) at every position of
        a [len(samples) · seq_len] micro-batch: (ids int64 [B·S, top_k], log-probabilities float32 [B·S, top_k],
        log tail float32 [B·S], stored bool [B·S]). Unstored positions hold padding (id −1, −inf) and tail 0;
        give them loss weight 0. ``required`` [B·S] bool (e.g. ``targets != -100``): a required position without
        a row is an error naming the shard."""
        k = self.compression.top_k
        n = len(samples) * seq_len
        ids = torch.full((n, k), PAD_ID, dtype=torch.int64)
        logprobs = torch.full((n, k), -math.inf, dtype=torch.float32)
        log_tail = torch.zeros(n, dtype=torch.float32)
        stored = torch.zeros(n, dtype=torch.bool)
        for b, sample in enumerate(samples):
            positions, (i, lp, t) = self.sample(split, int(sample), width=k)
            if len(positions) and (positions.min() < 0 or positions.max() >= seq_len):
                raise CaptureError(f"{shard_path(self.root, split, int(sample) // self.samples_per_shard)}: sample "
                                   f"{sample} has positions outside [0, {seq_len}): captured at another seq_len")
            at = torch.from_numpy(positions.astype(np.int64)) + b * seq_len
            ids[at], logprobs[at], log_tail[at], stored[at] = i, lp, t, True
        if required is not None:
            self.check_required(split, samples, seq_len, stored, required)
        return ids, logprobs, log_tail, stored

    def check_required(self, split: str, samples, seq_len: int, stored: torch.Tensor, required: torch.Tensor) -> None:
        """A ``required`` position of the micro-batch (see :meth:`micro_batch`) that is not ``stored`` is an error
        naming the shard."""
        missing = (required.reshape(-1).cpu() & ~stored).nonzero().squeeze(-1)
        if len(missing):
            b, pos = divmod(int(missing[0]), seq_len)
            sample = int(samples[b])
            raise CaptureError(f"{shard_path(self.root, split, sample // self.samples_per_shard)}: sample "
                               f"{sample} has no row for trained position {pos} ({len(missing)} missing in "
                               "this micro-batch); the capture stored other positions (--all-positions?)")


def header_dict(compression: Compression, **fields) -> dict:
    return {"version": VERSION, "compression": asdict(compression), **fields}
