"""On-disk layout of prepared data and the lazy reader the trainer uses.

Per split directory (``train/``, ``valid/``)::

    index.json                  format, seq_len, pad id, shards with their counts
    shard_00000.bin / .idx      Megatron-Core IndexedDataset, int32 tokens. One *sequence* per
                                conversation, one *document* per packed sample (so document k's
                                sequence lengths are sample k's cu_seqlens)
    shard_00000.flags.bin       uint8 per token, aligned with the .bin tokens (render.FLAG_* bits)
    shard_00000.weights.bin     float32 per token, aligned likewise: analysis weights

Everything is memory-mapped and opened lazily in the process that reads it (DataLoader workers included).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from megatron_student.data.render import (
    FLAG_ANALYSIS,
    FLAG_COMMENTARY,
    FLAG_FINAL,
    FLAG_LABEL,
    PAD_TOKEN_ID,
    RenderedConversation,
)

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
TOKEN_DTYPE = np.int32


def _indexed_dataset():
    # Megatron-Core is heavy to import; only storage users pay for it.
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset


class PackedShardWriter:
    """Writes packed samples of one split into shards of at most ``shard_tokens`` tokens."""

    def __init__(self, directory: Path, seq_len: int, shard_tokens: int = 1 << 28):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.seq_len = seq_len
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._builder = None

    def _open_shard(self) -> None:
        prefix = f"shard_{len(self.shards):05d}"
        path = self.directory / prefix
        self._builder = _indexed_dataset().IndexedDatasetBuilder(str(path) + ".bin", dtype=TOKEN_DTYPE)
        self._flags = open(str(path) + ".flags.bin", "wb")
        self._weights = open(str(path) + ".weights.bin", "wb")
        self.shards.append({"prefix": prefix, "samples": 0, "conversations": 0, "tokens": 0})

    def _close_shard(self) -> None:
        prefix = self.directory / self.shards[-1]["prefix"]
        self._builder.finalize(str(prefix) + ".idx")
        self._flags.close()
        self._weights.close()
        self._builder = None

    def write_sample(self, docs: list[RenderedConversation]) -> None:
        n = sum(len(d) for d in docs)
        if not docs or n > self.seq_len:
            raise ValueError(f"a packed sample must hold 1..{self.seq_len} tokens, got {n}")
        full = self._builder is not None and self.shards[-1]["tokens"] + n > self.shard_tokens
        if full:
            self._close_shard()
        if self._builder is None:
            self._open_shard()
        for doc in docs:
            self._builder.add_item(torch.from_numpy(doc.input_ids))
            self._flags.write(doc.flags.tobytes())
            self._weights.write(doc.analysis_weight.astype(np.float32, copy=False).tobytes())
        self._builder.end_document()
        shard = self.shards[-1]
        shard["samples"] += 1
        shard["conversations"] += len(docs)
        shard["tokens"] += n

    def close(self) -> dict:
        if self._builder is not None:
            self._close_shard()
        index = {"format_version": FORMAT_VERSION, "seq_len": self.seq_len, "pad_token_id": PAD_TOKEN_ID,
                 "token_dtype": "int32", "flags_dtype": "uint8", "weights_dtype": "float32",
                 "shards": self.shards}
        tmp = self.directory / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.directory / INDEX_FILE)
        return index


class _Shard:
    def __init__(self, prefix: Path):
        self.tokens = _indexed_dataset().IndexedDataset(str(prefix))
        self.flags = np.memmap(str(prefix) + ".flags.bin", dtype=np.uint8, mode="r")
        self.weights = np.memmap(str(prefix) + ".weights.bin", dtype=np.float32, mode="r")
        n_tokens = int(self.tokens.sequence_lengths.sum())
        if len(self.flags) != n_tokens or len(self.weights) != n_tokens:
            raise ValueError(f"{prefix}: {n_tokens} tokens but {len(self.flags)} flags and "
                             f"{len(self.weights)} weights; the shard is damaged")

    def sample(self, k: int):
        documents = self.tokens.document_indices
        first, last = int(documents[k]), int(documents[k + 1])
        lengths = self.tokens.sequence_lengths[first:last].astype(np.int64)
        offset = int(self.tokens.index.sequence_pointers[first]) // np.dtype(TOKEN_DTYPE).itemsize
        n = int(lengths.sum())
        tokens = np.concatenate(self.tokens[first:last])
        return tokens, self.flags[offset:offset + n], self.weights[offset:offset + n], lengths


class HarmonyPackedDataset(torch.utils.data.Dataset):
    """Packed samples of one split of ``prepare-data`` output; item ``i`` is packed sample ``i``.

    Each item is a dict of tensors, all of length ``seq_len`` except ``cu_seqlens``:
    ``input_ids`` (int64), ``labels`` (int64, the token where trained, -100 elsewhere and on padding;
    unshifted: logits at t predict labels at t + 1), ``analysis_mask``/``final_mask``/``commentary_mask``
    (bool), ``analysis_weight`` (float32, 1.0 outside analysis content), ``position_ids`` (int64, restart
    at 0 in each conversation), ``cu_seqlens`` (int32 [n + 1], conversation boundaries; trailing padding,
    if any, is one more segment so cu_seqlens[-1] == seq_len) and ``num_tokens`` (int, unpadded length).
    Use ``collate_packed`` to batch, and ``ResumableSampler`` for a shuffled, resumable order.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train"):
        self.directory = Path(root) / split
        index_path = self.directory / INDEX_FILE
        if not index_path.is_file():
            stats = Path(root) / "stats.json"
            failed = json.loads(stats.read_text()).get("failed") if stats.is_file() else None
            raise FileNotFoundError(f"{index_path}: no prepared split here ("
                                    + (f"prepare-data failed: {failed['reason']})" if failed
                                       else "run megatron-student prepare-data)"))
        self.index = json.loads(index_path.read_text())
        if self.index.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{index_path}: format_version {self.index.get('format_version')}, "
                             f"this reader understands {FORMAT_VERSION}")
        self.seq_len = int(self.index["seq_len"])
        self.pad_token_id = int(self.index["pad_token_id"])
        self._ends = np.cumsum([s["samples"] for s in self.index["shards"]])
        self._shards: dict[int, _Shard] = {}

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getstate__(self):
        # Memory maps are reopened in each worker rather than pickled.
        return {**self.__dict__, "_shards": {}}

    def _locate(self, i: int) -> tuple[_Shard, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples in {self.directory}")
        s = int(np.searchsorted(self._ends, i, side="right"))
        if s not in self._shards:
            self._shards[s] = _Shard(self.directory / self.index["shards"][s]["prefix"])
        return self._shards[s], i - (int(self._ends[s - 1]) if s else 0)

    def conversations(self) -> Iterator[np.ndarray]:
        """Every stored conversation's tokens in storage order (for format checks)."""
        for s, meta in enumerate(self.index["shards"]):
            shard = self._shards.get(s) or _Shard(self.directory / meta["prefix"])
            for k in range(len(shard.tokens)):
                yield shard.tokens[k]

    def __getitem__(self, i: int) -> dict:
        shard, k = self._locate(int(i))
        tokens, flags, weights, lengths = shard.sample(k)
        n, pad = len(tokens), self.seq_len - len(tokens)
        input_ids = np.full(self.seq_len, self.pad_token_id, dtype=np.int64)
        input_ids[:n] = tokens
        flag_row = np.zeros(self.seq_len, dtype=np.uint8)
        flag_row[:n] = flags
        weight_row = np.ones(self.seq_len, dtype=np.float32)
        weight_row[:n] = weights
        segments = np.append(lengths, pad) if pad else lengths
        cu_seqlens = np.concatenate(([0], np.cumsum(segments))).astype(np.int32)
        position_ids = np.arange(self.seq_len, dtype=np.int64) - np.repeat(cu_seqlens[:-1], segments)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(np.where(flag_row & FLAG_LABEL, input_ids, -100)),
            "analysis_mask": torch.from_numpy((flag_row & FLAG_ANALYSIS) != 0),
            "final_mask": torch.from_numpy((flag_row & FLAG_FINAL) != 0),
            "commentary_mask": torch.from_numpy((flag_row & FLAG_COMMENTARY) != 0),
            "analysis_weight": torch.from_numpy(weight_row),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.from_numpy(cu_seqlens),
            "num_tokens": n,
        }


def collate_packed(items: list[dict]) -> dict:
    """Stack items to [B, seq_len]; ``cu_seqlens`` becomes the flattened (THD) boundaries of the whole
    batch, [sum of segments + 1] int32, with ``max_seqlen`` its longest segment."""
    out = {k: torch.stack([it[k] for it in items]) for k in items[0] if k not in ("cu_seqlens", "num_tokens")}
    seq_len = items[0]["input_ids"].shape[0]
    parts = [items[0]["cu_seqlens"]] + [it["cu_seqlens"][1:] + b * seq_len for b, it in enumerate(items) if b]
    cu = torch.cat(parts)
    out["cu_seqlens"] = cu
    out["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
    out["num_tokens"] = torch.tensor([it["num_tokens"] for it in items])
    return out


class ResumableSampler(torch.utils.data.Sampler):
    """Deterministic epoch-wise shuffle of ``num_samples`` indices, split across data-parallel ranks.

    Epoch ``e`` uses permutation ``default_rng([seed, e])``; rank ``r`` takes every ``world_size``-th index
    (the tail that does not divide evenly is dropped so ranks stay in step). ``state_dict()`` records the
    epoch and how many indices this rank has handed out; ``load_state_dict`` continues from there. With
    DataLoader prefetching the sampler runs ahead of training: save the position your trainer consumed,
    e.g. ``{**sampler.state_dict(), "position": consumed_samples_this_epoch}``.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_samples) if self.shuffle
                 else np.arange(self.num_samples))
        return order[self.rank:len(self) * self.world_size:self.world_size]

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order(self.epoch)
        while self.position < len(order):
            index = int(order[self.position])
            self.position += 1
            yield index
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "num_samples": self.num_samples, "world_size": self.world_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples", "world_size", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r}, this sampler {getattr(self, key)!r}; "
                                 "resuming would visit a different order")
        if not 0 <= state["position"] <= len(self):
            raise ValueError(f"sampler position {state['position']} outside [0, {len(self)}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
