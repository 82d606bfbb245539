"""Teacher agreement on held-out data and router health, from one teacher-forced pass per conversation.

Held-out conversations come from a prepared split (``prepare-data`` output, ``valid`` by default), one at a time,
so that any HF model (our student, transformers' gpt-oss) scores them without packing support. Row ``t`` is scored
against token ``t + 1`` where that token is a training label, exactly as the trainer does; the KL and CE sums come
from ``ops.losses.logit_losses`` (the trainer's math). Per channel (``all`` labelled tokens, ``analysis``,
``final``):

- ``kl``: mean KL(teacher ‖ student) at T = 1, in nats per token;
- ``ce`` / ``perplexity``: the student's cross-entropy on the reference tokens and exp of it (``teacher_ce`` /
  ``teacher_perplexity`` beside it);
- ``top1_agreement``: the fraction of tokens where the student's argmax equals the teacher's.

Router health counts the top-k routing decisions per layer over the same tokens (the router logits both models
return) and reports load fractions, normalised entropy, the largest share and dead experts (never chosen), with
the training alarm: normalised entropy below ``min_entropy`` (``logging.router_min_entropy``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.storage import HarmonyPackedDataset
from ..ops.losses import IGNORE_INDEX, LogitLoss, logit_losses
from ..train.metrics import expert_balance

CHANNELS = ("all", "analysis", "final")
_KL_CE = (LogitLoss("forward_kl"), LogitLoss("ce"))
_CE = (LogitLoss("ce"),)


@dataclass
class Document:
    """One held-out conversation: ``input_ids`` [T]; ``targets`` [T] the next-token label of each row (−100: not
    scored); ``analysis`` / ``final`` [T] whether that target is in an analysis / final message."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    analysis: torch.Tensor
    final: torch.Tensor

    def masks(self) -> dict[str, torch.Tensor]:
        scored = self.targets != IGNORE_INDEX
        return {"all": scored, "analysis": scored & self.analysis, "final": scored & self.final}


def prepared_conversations(data_dir: str | Path, split: str = "valid", limit: int | None = None) -> list[Document]:
    """The conversations of a prepared split, unpacked (the first ``limit`` of them, in storage order)."""
    dataset = HarmonyPackedDataset(data_dir, split)
    docs: list[Document] = []
    for i in range(len(dataset)):
        item = dataset[i]
        cu = item["cu_seqlens"].tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            if a >= item["num_tokens"]:
                break  # the padding segment
            if limit is not None and len(docs) >= limit:
                return docs

            def shifted(name, fill, a=a, b=b):
                return torch.cat([item[name][a + 1:b], torch.full((1,), fill, dtype=item[name].dtype)])

            docs.append(Document(item["input_ids"][a:b].clone(), shifted("labels", IGNORE_INDEX),
                                 shifted("analysis_mask", False), shifted("final_mask", False)))
    if not docs:
        raise ValueError(f"{Path(data_dir) / split}: no conversations to evaluate on")
    return docs


class AgreementTotals:
    """Running sums per channel; ``add`` one document's logits, ``summary`` the per-token means."""

    def __init__(self):
        self.sums = {c: {"tokens": 0.0, "kl": 0.0, "ce": 0.0, "teacher_ce": 0.0, "top1": 0.0} for c in CHANNELS}

    def add(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, doc: Document,
            chunk_size: int = 512) -> None:
        """``*_logits``: [T, V] for ``doc`` (V may exceed the true vocabulary: only the first V of both count)."""
        device = student_logits.device
        masks = {c: m.to(device) for c, m in doc.masks().items() if bool(m.any())}
        if not masks:
            return
        # Only scored rows, and every channel's sums in one chunked pass (each log-softmax computed once).
        rows = masks["all"]
        targets = doc.targets.to(device)[rows]
        weights = torch.stack([m[rows].to(torch.float32) for m in masks.values()])
        student_logits = student_logits[rows]
        for channel, mask in masks.items():
            self.sums[channel]["tokens"] += float(mask.sum())
        if teacher_logits is None:
            ce = logit_losses(student_logits, None, _CE * len(masks), weights, labels=targets, chunk_size=chunk_size)
            for channel, value in zip(masks, ce.tolist()):
                self.sums[channel]["ce"] += value
            return
        teacher_logits = teacher_logits[rows]
        kl_ce = logit_losses(student_logits, teacher_logits, _KL_CE * len(masks), weights.repeat_interleave(2, 0),
                             labels=targets, chunk_size=chunk_size).view(len(masks), 2).tolist()
        teacher_ce = logit_losses(teacher_logits, None, _CE * len(masks), weights, labels=targets,
                                  chunk_size=chunk_size).tolist()
        agree = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).to(torch.float32)
        top1 = (weights * agree).sum(-1).tolist()
        for i, channel in enumerate(masks):
            s = self.sums[channel]
            s["kl"] += kl_ce[i][0]
            s["ce"] += kl_ce[i][1]
            s["teacher_ce"] += teacher_ce[i]
            s["top1"] += top1[i]

    def summary(self, with_teacher: bool) -> dict[str, dict[str, float]]:
        out = {}
        for channel, s in self.sums.items():
            n = s["tokens"]
            if n == 0:
                out[channel] = {"tokens": 0}
                continue
            ce = s["ce"] / n
            row = {"tokens": int(n), "ce": ce, "perplexity": math.exp(min(ce, 50.0))}
            if with_teacher:
                teacher_ce = s["teacher_ce"] / n
                row |= {"kl": s["kl"] / n, "top1_agreement": s["top1"] / n, "teacher_ce": teacher_ce,
                        "teacher_perplexity": math.exp(min(teacher_ce, 50.0))}
            out[channel] = row
        return out


class RouterCounts:
    """Top-k routing decisions per layer, accumulated from the router logits ([tokens, E] per layer)."""

    def __init__(self, top_k: int):
        self.top_k = top_k
        self.counts: list[torch.Tensor] = []

    def add(self, router_logits) -> None:
        for layer, logits in enumerate(router_logits):
            chosen = logits.reshape(-1, logits.shape[-1]).topk(self.top_k, dim=-1).indices
            counts = torch.bincount(chosen.reshape(-1).cpu(), minlength=logits.shape[-1]).to(torch.float64)
            if layer == len(self.counts):
                self.counts.append(counts)
            else:
                self.counts[layer] += counts

    def health(self, min_entropy: float) -> dict:
        """Per layer: fractions, entropy (normalised, 1 = uniform), max_share, dead_experts, collapsing."""
        layers = {}
        for i, counts in enumerate(self.counts):
            fractions, entropy, max_share = expert_balance(counts)
            layers[f"layer_{i}"] = {"fractions": fractions.tolist(), "entropy": entropy, "max_share": max_share,
                                    "dead_experts": [e for e, c in enumerate(counts.tolist()) if c == 0],
                                    "collapsing": entropy < min_entropy}
        collapsing = [name for name, row in layers.items() if row["collapsing"]]
        return {"min_entropy": min_entropy, "layers": layers, "collapsing_layers": collapsing,
                "dead_experts": sum(len(row["dead_experts"]) for row in layers.values())}
