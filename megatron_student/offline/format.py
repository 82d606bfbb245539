"""The compressed on-disk form of a captured teacher: one fixed-size row per stored position.

A capture directory::

    capture.json                 the capture header (below) and, once finished, its summary
    <split>/shard_00000.cap      samples [0, S) of the split, S = ``samples_per_shard``
    <split>/shard_00001.cap      samples [S, 2S) …

A shard is keyed by the prepared dataset's sample indices alone, so it does not depend on the capture's or a
training run's TP/EP/DP, micro-batch, seed or sampler order: a reader asks for (split, sample, position).

Shard file: ``MAGIC`` (8 bytes), u64 little-endian header length, the header as UTF-8 JSON, zero padding to 8
bytes, then ``offsets`` int64 [samples + 1] (row range of each sample), ``positions`` int32 [rows] (the logits
row within the sample, 0-based: position t holds the teacher's distribution of token t + 1), ``rows`` uint8
[rows, row_bytes]. The header records every length, so a truncated file is detected from its size.

One row (``Compression``; temperature-1 log-probabilities, sorted by descending probability):

* ``k`` token ids, ``id_bits`` bits each (18 for gpt-oss's 201,088 ids), bit-packed little-endian;
* the first ``exact_k`` log-probabilities as bf16;
* if ``k > exact_k``: the smallest stored log-probability (bf16, the *floor*) and the other ``k − exact_k``
  as ``quant_bits``-bit codes on a uniform grid in log space between the last exact value and the floor (the
  sorted order keeps them in that interval; error ≤ half a grid step);
* the tail mass ``1 − Σ_top-k p`` as float32 log (−inf when k covers the vocabulary), computed from the dense
  logits by a log-sum-exp over the other ids, not by subtraction.

Decoding rescales the k probabilities so that they sum to exactly ``1 − tail``: the tail bucket is kept exact
and the quantisation error stays among the top-k.
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

VERSION = 1
MAGIC = b"MSTCAP01"
CAPTURE_FILE = "capture.json"
SHARD_SUFFIX = ".cap"


class CaptureError(ValueError):
    """A capture that cannot be used as asked; the message names the file."""


@dataclass(frozen=True)
class Compression:
    """Knobs of the row encoding (``capture-teacher --top-k --exact-k --quant-bits``)."""

    k: int = 64
    exact_k: int = 4
    quant_bits: int = 4
    id_bits: int = 18

    def __post_init__(self):
        if not 1 <= self.k:
            raise ValueError(f"top-k must be >= 1, got {self.k}")
        if not 1 <= self.exact_k <= self.k:
            raise ValueError(f"exact-k must be in [1, top-k={self.k}], got {self.exact_k}")
        if not 1 <= self.quant_bits <= 16:
            raise ValueError(f"quant-bits must be in [1, 16], got {self.quant_bits}")
        if not 1 <= self.id_bits <= 32:
            raise ValueError(f"id-bits must be in [1, 32], got {self.id_bits}")

    @staticmethod
    def for_vocab(vocab_size: int, **knobs) -> "Compression":
        return Compression(id_bits=max(1, math.ceil(math.log2(vocab_size))), **knobs)

    @property
    def quantised(self) -> int:
        return self.k - self.exact_k

    @property
    def row_bytes(self) -> int:
        ids = _packed_bytes(self.k * self.id_bits)
        floor = 2 if self.quantised else 0
        return ids + 2 * self.exact_k + floor + _packed_bytes(self.quantised * self.quant_bits) + 4


def _packed_bytes(bits: int) -> int:
    return (bits + 7) // 8


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """[n, m] non-negative ints → [n, ⌈m·bits/8⌉] uint8, each value ``bits`` bits little-endian."""
    n, m = values.shape
    planes = ((values.astype(np.uint64)[..., None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(n, m * bits), axis=1, bitorder="little")


def _unpack(packed: np.ndarray, m: int, bits: int) -> np.ndarray:
    n = packed.shape[0]
    planes = np.unpackbits(packed, axis=1, count=m * bits, bitorder="little").reshape(n, m, bits)
    return (planes.astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(-1)


def _bf16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8).reshape(x.shape[0], -1)


def _from_bf16_bytes(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.int16)).view(torch.bfloat16).to(torch.float32)


def encode_rows(ids: torch.Tensor, logprobs: torch.Tensor, log_tail: torch.Tensor, c: Compression) -> np.ndarray:
    """[n, k] ids and log-probabilities sorted by descending probability, [n] log tail mass → [n, row_bytes]."""
    n = ids.shape[0]
    if ids.shape != (n, c.k) or logprobs.shape != (n, c.k) or log_tail.shape != (n,):
        raise ValueError(f"encode_rows: ids {tuple(ids.shape)}, logprobs {tuple(logprobs.shape)}, tail "
                         f"{tuple(log_tail.shape)} for k={c.k}")
    if n and int(ids.max()) >= 1 << c.id_bits:
        raise ValueError(f"token id {int(ids.max())} does not fit in {c.id_bits} bits")
    logprobs = logprobs.float().cpu()
    parts = [_pack(ids.cpu().numpy(), c.id_bits), _bf16_bytes(logprobs[:, :c.exact_k])]
    if c.quantised:
        anchor = logprobs[:, c.exact_k - 1].to(torch.bfloat16).float()
        floor = torch.minimum(logprobs[:, -1], anchor).to(torch.bfloat16).float()
        span = (anchor - floor).unsqueeze(-1)
        levels = (1 << c.quant_bits) - 1
        frac = ((anchor.unsqueeze(-1) - logprobs[:, c.exact_k:]) / span.clamp_min(1e-30)).clamp(0, 1)
        codes = torch.round(frac * levels).to(torch.int64)
        parts += [_bf16_bytes(floor.unsqueeze(-1)), _pack(codes.numpy(), c.quant_bits)]
    parts.append(log_tail.float().cpu().numpy().astype("<f4").view(np.uint8).reshape(n, 4))
    return np.concatenate(parts, axis=1)


def decode_rows(rows: np.ndarray, c: Compression) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[n, row_bytes] → (ids int64 [n, k], log-probabilities float32 [n, k] rescaled to sum 1 − tail, log tail
    mass float32 [n])."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != c.row_bytes:
        raise ValueError(f"rows of {rows.shape} bytes, expected [n, {c.row_bytes}]")
    at = _packed_bytes(c.k * c.id_bits)
    ids = torch.from_numpy(_unpack(rows[:, :at], c.k, c.id_bits))
    exact = _from_bf16_bytes(rows[:, at:at + 2 * c.exact_k])
    at += 2 * c.exact_k
    logprobs = exact
    if c.quantised:
        floor = _from_bf16_bytes(rows[:, at:at + 2])[:, 0]
        at += 2
        nbytes = _packed_bytes(c.quantised * c.quant_bits)
        codes = torch.from_numpy(_unpack(rows[:, at:at + nbytes], c.quantised, c.quant_bits)).float()
        at += nbytes
        anchor = exact[:, -1]
        rest = anchor.unsqueeze(-1) - (anchor - floor).unsqueeze(-1) * codes / ((1 << c.quant_bits) - 1)
        logprobs = torch.cat([exact, rest], dim=1)
    log_tail = torch.from_numpy(np.ascontiguousarray(rows[:, at:at + 4]).view("<f4")[:, 0].astype(np.float32))
    # Keep the tail exact: the k stored probabilities carry exactly 1 − tail.
    head = torch.log(-torch.expm1(log_tail.double())).float()  # log(1 − tail)
    logprobs = logprobs - torch.logsumexp(logprobs, -1, keepdim=True) + head.unsqueeze(-1)
    return ids, logprobs, log_tail


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


def write_shard(path: Path, header: dict, offsets: np.ndarray, positions: np.ndarray, rows: np.ndarray) -> None:
    """Write one shard atomically (``.tmp`` then rename)."""
    header = {**header, "rows": int(len(positions)), "samples": int(len(offsets) - 1)}
    raw = json.dumps(header, sort_keys=True).encode()
    raw += b" " * (-(len(raw) + 16) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(raw)) + raw)
        f.write(np.asarray(offsets, dtype="<i8").tobytes())
        f.write(np.asarray(positions, dtype="<i4").tobytes())
        f.write(np.ascontiguousarray(rows, dtype=np.uint8).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Shard:
    """A memory-mapped shard; ``sample(i)`` gives (positions, rows) of the shard's i-th sample."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CaptureError(f"{self.path}: missing capture shard")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise CaptureError(f"{self.path}: not a capture shard (bad magic) or truncated")
            (length,) = struct.unpack("<Q", head[8:])
            try:
                self.header = json.loads(f.read(length))
            except ValueError as e:
                raise CaptureError(f"{self.path}: unreadable header ({e}); the file is truncated or damaged") from e
        self.compression = Compression(**self.header["compression"])
        n, rows = self.header["samples"], self.header["rows"]
        start = 16 + length
        expected = start + 8 * (n + 1) + 4 * rows + rows * self.compression.row_bytes
        if size != expected:
            raise CaptureError(f"{self.path}: {size} bytes, the header describes {expected}; the file is truncated "
                               "or damaged (delete it and rerun capture-teacher to redo it)")
        self.offsets = np.memmap(self.path, dtype="<i8", mode="r", offset=start, shape=(n + 1,))
        self.positions = np.memmap(self.path, dtype="<i4", mode="r", offset=start + 8 * (n + 1), shape=(rows,))
        self.rows = np.memmap(self.path, dtype=np.uint8, mode="r", offset=start + 8 * (n + 1) + 4 * rows,
                              shape=(rows, self.compression.row_bytes))

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.array(self.positions[a:b]), np.array(self.rows[a:b])


class CaptureReader:
    """Rows of a capture by (split, sample index, position), with the checks a training run needs: the
    capture's vocabulary and the prepared data it was made from (pass what you expect; None skips a check)."""

    def __init__(self, root: str | os.PathLike, *, vocab_hash: str | None = None, data: dict | None = None):
        self.root = Path(root)
        header_path = self.root / CAPTURE_FILE
        if not header_path.is_file():
            raise CaptureError(f"{header_path}: no capture here (run megatron-student capture-teacher)")
        self.header = json.loads(header_path.read_text())
        if self.header.get("version") != VERSION:
            raise CaptureError(f"{header_path}: capture version {self.header.get('version')}, this reader "
                               f"understands {VERSION}")
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
        self.samples_per_shard = int(self.header["samples_per_shard"])
        self._shards: dict[tuple[str, int], Shard] = {}

    def shard(self, split: str, index: int) -> Shard:
        key = (split, index)
        if key not in self._shards:
            shard = Shard(shard_path(self.root, split, index))
            for name in ("teacher", "vocab_sha256", "compression", "version"):
                if shard.header[name] != self.header[name]:
                    raise CaptureError(f"{shard.path}: header {name!r} differs from {self.root / CAPTURE_FILE}")
            self._shards[key] = shard
        return self._shards[key]

    def sample(self, split: str, sample: int) -> tuple[np.ndarray, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(positions int32 [r], decoded (ids, log-probabilities, log tail)) of one sample."""
        total = self.header["splits"].get(split, {}).get("samples")
        if total is None or not 0 <= sample < total:
            raise CaptureError(f"{self.root / CAPTURE_FILE}: no sample {sample} of split {split!r} "
                               f"({total or 0} captured)")
        shard = self.shard(split, sample // self.samples_per_shard)
        positions, rows = shard.sample(sample % self.samples_per_shard)
        return positions, decode_rows(rows, self.compression)

    def rows_at(self, split: str, sample: int, positions: np.ndarray):
        """Decoded rows of ``positions`` of one sample; a position that was not captured is an error."""
        stored, (ids, logprobs, log_tail) = self.sample(split, sample)
        where = {int(p): i for i, p in enumerate(stored)}
        missing = [int(p) for p in positions if int(p) not in where]
        if missing:
            path = shard_path(self.root, split, sample // self.samples_per_shard)
            raise CaptureError(f"{path}: sample {sample} has no row for positions {missing[:8]}")
        pick = torch.tensor([where[int(p)] for p in positions], dtype=torch.long)
        return ids[pick], logprobs[pick], log_tail[pick]


def header_dict(compression: Compression, **fields) -> dict:
    return {"version": VERSION, "compression": asdict(compression), **fields}
