"""Streaming first-fit packing of rendered conversations into fixed-length sequences.

At most ``open_bins`` sequences are open at once, so memory stays bounded by ``open_bins * seq_len``
tokens whatever the corpus size; the output depends only on the input order (deterministic).
"""

from __future__ import annotations

from typing import Iterator

from megatron_student.data.render import RenderedConversation


class FirstFitPacker:
    def __init__(self, seq_len: int, open_bins: int = 64, close_below: int = 16):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.seq_len = seq_len
        self.open_bins = open_bins
        # A bin with less free space than this is unlikely to take another conversation: emit it.
        self.close_below = min(close_below, seq_len)
        self._bins: list[list[RenderedConversation]] = []
        self._free: list[int] = []

    def add(self, doc: RenderedConversation) -> Iterator[list[RenderedConversation]]:
        """Place ``doc`` (at most seq_len tokens); yields the sequences that this closes."""
        if not 0 < len(doc) <= self.seq_len:
            raise ValueError(f"cannot pack a conversation of {len(doc)} tokens into seq_len {self.seq_len}")
        for i, free in enumerate(self._free):
            if len(doc) <= free:
                self._bins[i].append(doc)
                self._free[i] -= len(doc)
                if self._free[i] < self.close_below:
                    yield self._pop(i)
                return
        self._bins.append([doc])
        self._free.append(self.seq_len - len(doc))
        if self._free[-1] < self.close_below:
            yield self._pop(len(self._bins) - 1)
        elif len(self._bins) > self.open_bins:
            yield self._pop(min(range(len(self._free)), key=self._free.__getitem__))

    def flush(self) -> Iterator[list[RenderedConversation]]:
        while self._bins:
            yield self._pop(0)

    def _pop(self, i: int) -> list[RenderedConversation]:
        self._free.pop(i)
        return self._bins.pop(i)
