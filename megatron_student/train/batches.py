"""This data-parallel rank's micro-batches.

``ResumableSampler`` shards a prepared split over the DP ranks; ``global_batch / (micro_batch · DP)`` micro-batches
make one optimiser step on each rank. A micro-batch of B packed rows is flattened to one THD stream [1, B·S] with
its document boundaries (positions and attention restart per conversation). Labels and channel masks are shifted
so that row t is scored against token t + 1 (the last token of each document predicts nothing), and per-token loss
weights are built by ``ops.losses.token_weights``. Each micro-batch names the split and sample indices of its rows:
a teacher signal that looks rows up by sample (an offline capture) reads exactly the samples this rank drew.

Context parallelism (CP ranks share one DP rank's samples): each CP rank keeps the contiguous chunk
``[r·N/CP, (r+1)·N/CP)`` of the flattened stream (``ops.context_parallel``'s layout) — tokens, labels, weights and
token counts are the chunk's, ``offset`` says where it starts — while ``packed`` keeps the documents of the whole
stream: documents cross chunk boundaries, and the attention modules place the chunk inside them.

A micro-batch is built on the host and copied to the GPU without waiting for it (``host_syncs.to_device_async``:
the previous step's optimizer update may still be running); its document boundaries stay on the host too
(``PackedDocuments.cu_seqlens_cpu``), so no layer reads them back from the GPU.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..data.storage import HarmonyPackedDataset, ResumableSampler, collate_packed
from ..host_syncs import to_device_async
from ..megatron.attention import PackedDocuments
from ..ops.losses import IGNORE_INDEX, token_weights
from .config import ConfigError, TrainConfig


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [1, N] (N = B·S; under CP this rank's chunk, N = B·S / CP, as every per-token field)
    packed: PackedDocuments
    targets: torch.Tensor  # [N] next-token labels (−100: not trained)
    weights: torch.Tensor  # [N] float32 loss weights
    num_tokens: int  # real (unpadded) tokens
    analysis_tokens: int
    final_tokens: int
    split: str = ""  # the prepared split its rows come from ("" when made from loose items)
    samples: tuple[int, ...] = ()  # the split's sample index of each row
    offset: int = 0  # position of the first token in the whole flattened micro-batch (CP: this rank's chunk start)


@dataclass(frozen=True)
class ContextChunk:
    """This rank's place in the context-parallel split of every micro-batch: chunk ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1

    def window(self, total: int) -> slice:
        length = total // self.size
        return slice(self.rank * length, (self.rank + 1) * length)


def make_micro_batch(items: list[dict], channels, device: torch.device,
                     chunk: ContextChunk = ContextChunk(), vocab_size: int | None = None,
                     source: str = "micro-batch") -> MicroBatch:
    """``vocab_size``: check the labels against it here, on the host (the losses then need not read them back
    from the GPU); ``source`` names the rows in that error."""
    batch = collate_packed(items)
    cu = batch["cu_seqlens"].to(torch.int64)
    rows, seq_len = batch["input_ids"].shape
    n = rows * seq_len
    if n % chunk.size:
        raise ValueError(f"a micro-batch of {n} tokens cannot be split into {chunk.size} context-parallel chunks")
    last = torch.zeros(n, dtype=torch.bool)
    last[cu[1:] - 1] = True  # the last token of each document predicts nothing

    def shifted(name, fill):
        flat = batch[name].reshape(-1)
        out = torch.cat([flat[1:], flat.new_full((1,), fill)])
        return out.masked_fill(last, fill)

    window = chunk.window(n)
    real = (torch.arange(seq_len) < batch["num_tokens"][:, None]).reshape(-1)[window]  # not row padding
    targets = shifted("labels", IGNORE_INDEX)[window]
    if vocab_size is not None:
        bad = targets[(targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab_size))]
        if bad.numel():
            raise ValueError(f"{source}: label id {int(bad[0])} is outside the student's vocabulary [0, {vocab_size}) "
                             f"(and not {IGNORE_INDEX})")
    analysis, final = shifted("analysis_mask", False)[window], shifted("final_mask", False)[window]
    weights = token_weights(targets, analysis, final, shifted("analysis_weight", 1.0)[window],
                            final_channel=channels.final, analysis_channel=channels.analysis,
                            other_channel=channels.other)
    return MicroBatch(to_device_async(batch["input_ids"].reshape(1, -1)[:, window], device),
                      PackedDocuments.of(batch["cu_seqlens"], device), to_device_async(targets, device),
                      to_device_async(weights, device), int(real.sum()),
                      int((analysis & (targets != IGNORE_INDEX)).sum()), int((final & (targets != IGNORE_INDEX)).sum()),
                      offset=window.start)


def read_micro_batch(dataset: HarmonyPackedDataset, samples: list[int], channels, device: torch.device,
                     chunk: ContextChunk = ContextChunk(), vocab_size: int | None = None) -> MicroBatch:
    """The micro-batch of ``samples`` of ``dataset`` (this CP rank's chunk of it), naming where its rows come
    from; labels checked against ``vocab_size`` when given."""
    mb = make_micro_batch([dataset[i] for i in samples], channels, device, chunk, vocab_size,
                          f"{dataset.directory} samples {list(samples)}")
    return dataclasses.replace(mb, split=dataset.directory.name, samples=tuple(int(i) for i in samples))


class BatchStream:
    """Micro-batches of ``micro_batch`` samples in the sampler's order, across epochs; ``state_dict`` is the
    sampler's position (a resume continues with the next sample). ``vocab_size`` (set once the student is known):
    every micro-batch's labels are checked against it as it is built."""

    def __init__(self, dataset: HarmonyPackedDataset, sampler: ResumableSampler, micro_batch: int, channels,
                 device: torch.device, chunk: ContextChunk = ContextChunk()):
        if len(sampler) < 1:
            raise ValueError(f"{dataset.directory}: {len(dataset)} samples cannot feed {sampler.world_size} "
                             "data-parallel ranks")
        self.dataset, self.sampler, self.micro_batch = dataset, sampler, micro_batch
        self.channels, self.device, self.chunk = channels, device, chunk
        self.vocab_size: int | None = None
        self._iter = None

    def next_samples(self) -> list[int]:
        samples = []
        while len(samples) < self.micro_batch:
            if self._iter is None:
                self._iter = iter(self.sampler)
            try:
                samples.append(next(self._iter))
            except StopIteration:
                self._iter = None
        return samples

    def upcoming_samples(self, micro_batches: int) -> list[list[int]]:
        """The samples of the next ``micro_batches`` micro-batches, without drawing them (for prefetching): drawn
        from a copy of the sampler at the same position."""
        ahead = copy.copy(self)
        ahead.sampler, ahead._iter = copy.copy(self.sampler), None
        return [ahead.next_samples() for _ in range(micro_batches)]

    def next_micro_batch(self) -> MicroBatch:
        return read_micro_batch(self.dataset, self.next_samples(), self.channels, self.device, self.chunk,
                                self.vocab_size)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._iter = None


def train_stream(config: TrainConfig, dp_rank: int, dp_size: int, device: torch.device,
                 chunk: ContextChunk = ContextChunk()) -> tuple[BatchStream, int]:
    """(this DP rank's stream over the train split — this CP rank's chunk of it —, micro-batches per optimiser
    step), after checking the batch sizes against the layout and the prepared data (before any model is built)."""
    cfg, d = config, config.data
    per_step = d.micro_batch * dp_size
    if d.global_batch % per_step:
        raise ConfigError(f"{cfg.source}: data.global_batch: {d.global_batch} is not a multiple of micro_batch × "
                          f"data-parallel size = {d.micro_batch} × {dp_size}")
    dataset = HarmonyPackedDataset(d.path, "train")
    if dataset.seq_len != d.seq_len:
        raise ConfigError(f"{cfg.source}: data.seq_len: {d.seq_len}, but {d.path} was prepared with seq_len "
                          f"{dataset.seq_len}")
    sampler = ResumableSampler(len(dataset), d.seed, d.shuffle, dp_rank, dp_size)
    stream = BatchStream(dataset, sampler, d.micro_batch, cfg.losses.channels, device, chunk)
    return stream, d.global_batch // per_step


def eval_micro_batches(config: TrainConfig, dp_rank: int, dp_size: int, device: torch.device,
                       chunk: ContextChunk = ContextChunk()) -> Iterator[MicroBatch]:
    """The first ``eval.batches`` micro-batches of the valid split (this DP rank's share, unshuffled; this CP
    rank's chunk of each); fewer when the split runs out."""
    d = config.data
    dataset = HarmonyPackedDataset(d.path, "valid")
    order = list(ResumableSampler(len(dataset), d.seed, False, dp_rank, dp_size).epoch_order(0))
    for b in range(config.eval.batches):
        chosen = order[b * d.micro_batch:(b + 1) * d.micro_batch]
        if len(chosen) < d.micro_batch:
            return
        yield read_micro_batch(dataset, chosen, config.losses.channels, device, chunk)
