"""The teacher's side of the distillation losses: a *signal source* gives, for each micro-batch, what the losses
need from the teacher (``TeacherTargets``), whatever the teacher is.

``OnlineTeacher``: the teacher model co-located on the student's ranks with the same TP/EP/CP, run under no_grad
on each micro-batch (under CP on this rank's chunk: its sliding layers exchange a halo, its full-attention layers
all-gather keys and values, exact); its targets are the dense vocab-parallel logits (``DenseTargets``) and the
activations the alignment losses asked for (layer outputs, attention inputs/outputs).

``OfflineTeacher``: stored teacher distributions (a ``capture-teacher`` output, ``offline.format.CaptureReader``);
its ``targets(mb)`` reads the rows of ``mb.split`` / ``mb.samples`` at the trained positions (under CP, those of
this rank's chunk) and compares the student with the stored top-k + tail (``SparseTargets``:
``ops.losses.sparse_logit_losses``); it has no activations (``num_layers`` 0) and no model in memory.

``teacher_signals(config, ...)``: one ``TeacherPlan`` per teacher of the stage (``teacher`` or ``teachers``), each
with its logit losses and their weights; the stage's teacher-free ``ce`` rides with the first teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from ..checkpoint import load_model
from ..dtypes import DTYPES
from ..megatron import ParallelConfig
from ..offline.training import open_capture_for_training
from ..ops.losses import LogitLoss, logit_losses, sparse_logit_losses
from .activations import Capture
from .batches import MicroBatch
from .config import TeacherSection, TrainConfig
from .optim import active_parameters


class TeacherTargets(Protocol):
    """The teacher's side of one micro-batch's logit losses (activations for the alignment losses come only from an
    online teacher: ``DenseTargets``)."""

    def logit_losses(self, student_logits: torch.Tensor, losses: Sequence[LogitLoss], weights: torch.Tensor, *,
                     labels: torch.Tensor, vocab_size: int, tp_group: dist.ProcessGroup | None,
                     chunk_size: int, check_labels: bool = True) -> torch.Tensor:
        """``Σ_t w_t · ℓ_t`` of each of ``losses`` between the student's vocab-parallel logits [N, V_local] and
        this teacher; returns [K] (the contract of ``ops.losses.logit_losses``)."""
        ...


class TeacherSignal(Protocol):
    """A source of ``TeacherTargets`` for the trainer's micro-batches."""

    num_layers: int  # teacher layers whose activations can be captured (0: none)
    flops_per_token: float  # forward FLOPs per token the source spends on this rank's behalf (for MFU)

    def check_student(self, student_config) -> None:
        """Refuse a student this teacher cannot be distilled into (naming the field that differs)."""
        ...

    def capture(self, hidden_layers: Sequence[int], attention_layers: Sequence[int]) -> None:
        """Have every later ``targets`` carry these layers' outputs and these attention modules' inputs/outputs."""
        ...

    def targets(self, mb: MicroBatch) -> TeacherTargets:
        ...

    def prefetch(self, split: str, sample_lists: Sequence[Sequence[int]]) -> None:
        """Start preparing the targets of the micro-batches of these samples (drawn next) in the background."""
        ...

    def close(self) -> None:
        """Release what the source holds (hooks, files)."""
        ...


@dataclass
class DenseTargets:
    """A teacher run on the micro-batch: its vocab-parallel logits [N, V_local] and captured activations."""

    logits: torch.Tensor
    layer_outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # decoder layer outputs (hidden alignment)
    attention_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # attention inputs (attention alignment)
    attention_outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # their outputs (bias added)

    def logit_losses(self, student_logits: torch.Tensor, losses: Sequence[LogitLoss], weights: torch.Tensor, *,
                     labels: torch.Tensor, vocab_size: int, tp_group: dist.ProcessGroup | None,
                     chunk_size: int, check_labels: bool = True) -> torch.Tensor:
        return logit_losses(student_logits, self.logits, losses, weights, labels=labels, vocab_size=vocab_size,
                            tp_group=tp_group, chunk_size=chunk_size, check_labels=check_labels)


class OnlineTeacher:
    """The teacher model on this rank (same TP/EP as the student), frozen; ``targets`` runs it under no_grad."""

    def __init__(self, model: torch.nn.Module, config):
        self.model = model.eval().requires_grad_(False)
        self.config = config
        self.num_layers = len(model.decoder.layers)
        self.flops_per_token = 2 * active_parameters(model)
        self._capture = Capture()

    @classmethod
    def load(cls, config: TrainConfig, student_parallel: ParallelConfig,
             section: TeacherSection | None = None) -> OnlineTeacher:
        """A teacher section's checkpoint (default: ``teacher``) in its ``dtype`` (auto: bf16 on GPU, fp32 on CPU),
        laid out as the student (no activation recompute: it runs under no_grad)."""
        section = section or config.teacher
        dtype = DTYPES.get(section.dtype, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        parallel = ParallelConfig(**{**student_parallel.__dict__, "params_dtype": dtype, "recompute": None})
        model, hf_config, _ = load_model(section.path, "teacher", parallel)
        return cls(model, hf_config)

    def check_student(self, student_config) -> None:
        for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if getattr(student_config, key) != getattr(self.config, key):
                raise ValueError(f"student and teacher differ in {key}: {getattr(student_config, key)} vs "
                                 f"{getattr(self.config, key)}")

    def capture(self, hidden_layers: Sequence[int], attention_layers: Sequence[int]) -> None:
        self._capture.layers(self.model, hidden_layers)
        self._capture.attention(self.model, attention_layers)

    def targets(self, mb: MicroBatch) -> DenseTargets:
        self._capture.clear()
        # no_grad, not inference_mode: the logit losses save the teacher logits for their backward and the alignment
        # losses the activations, which inference tensors cannot be (a clone would copy the [N, V] logits)
        with torch.no_grad():
            logits = self.model(mb.tokens, None, None, packed_seq_params=mb.packed)
        c = self._capture
        return DenseTargets(logits[0], dict(c.outputs), dict(c.attn_in), dict(c.attn_out))

    def prefetch(self, split: str, sample_lists: Sequence[Sequence[int]]) -> None:
        """The teacher runs in the step, on the GPU: nothing to prepare ahead."""

    def close(self) -> None:
        self._capture.remove()


@dataclass
class SparseTargets:
    """Stored rows of the micro-batch's positions: top-k ids [N, k] (−1 padding), their log-probabilities and the
    log tail mass [N], on the student's device."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    log_tail: torch.Tensor

    def logit_losses(self, student_logits: torch.Tensor, losses: Sequence[LogitLoss], weights: torch.Tensor, *,
                     labels: torch.Tensor, vocab_size: int, tp_group: dist.ProcessGroup | None,
                     chunk_size: int, check_labels: bool = True) -> torch.Tensor:
        """The teacher losses on the stored partition; ``ce`` (teacher-free) on the dense student logits, in the same
        call (the fused path reads the logits once for all of them)."""
        return sparse_logit_losses(student_logits, self.ids, self.logprobs, self.log_tail, losses, weights,
                                   labels=labels, vocab_size=vocab_size, tp_group=tp_group, chunk_size=chunk_size,
                                   check_labels=check_labels)


class OfflineTeacher:
    """A capture read row by row: no model, no activations."""

    num_layers = 0
    flops_per_token = 0.0

    def __init__(self, config: TrainConfig, path: str, vocab_size: int, device: torch.device):
        self.reader = open_capture_for_training(config, path, vocab_size)
        self.seq_len, self.device = config.data.seq_len, device
        # Decoding a micro-batch's rows takes host time (0.3 s for 8192 positions of format 3): a reader thread
        # decodes the next step's micro-batches while the GPU runs this one's.
        self._reader_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capture-rows")
        self._ahead: dict[tuple, Future] = {}

    def prefetch(self, split: str, sample_lists: Sequence[Sequence[int]]) -> None:
        wanted = {(split, tuple(samples)) for samples in sample_lists}
        for key in set(self._ahead) - wanted:  # read ahead but not drawn (the stream was moved, e.g. by a resume)
            self._ahead.pop(key).cancel()
        for key in wanted - set(self._ahead):
            self._ahead[key] = self._reader_thread.submit(self.reader.micro_batch, key[0], list(key[1]), self.seq_len)

    def check_student(self, student_config) -> None:
        """The vocabulary was checked when the capture was opened (its hash is the student's)."""

    def capture(self, hidden_layers: Sequence[int], attention_layers: Sequence[int]) -> None:
        if hidden_layers or attention_layers:  # the config refuses this first; a direct caller gets it here
            raise ValueError(f"{self.reader.root}: an offline teacher has no activations for hidden-state or "
                             "attention alignment")

    def targets(self, mb: MicroBatch) -> SparseTargets:
        if not mb.split:
            raise ValueError("an offline teacher needs micro-batches that name their split and samples")
        # Rows are stored per sample and position: read the whole micro-batch, keep this rank's positions (its
        # context-parallel chunk; all of them without CP).
        window = slice(mb.offset, mb.offset + mb.targets.numel())
        required = torch.zeros(len(mb.samples) * self.seq_len, dtype=torch.bool)
        required[window] = (mb.targets != -100).cpu()
        ahead = self._ahead.pop((mb.split, mb.samples), None)  # samples: a tuple of ints (read_micro_batch)
        if ahead is None:
            ids, logprobs, log_tail, _ = self.reader.micro_batch(mb.split, mb.samples, self.seq_len, required=required)
        else:
            ids, logprobs, log_tail, stored = ahead.result()
            self.reader.check_required(mb.split, mb.samples, self.seq_len, stored, required)
        return SparseTargets(ids[window].to(self.device), logprobs[window].to(self.device),
                             log_tail[window].to(self.device))

    def close(self) -> None:
        self._reader_thread.shutdown(cancel_futures=True)
        self._ahead.clear()
        self.reader = None


@dataclass
class TeacherPlan:
    """One teacher of the stage, the logit losses taken against it and their weights (teacher weight included);
    ``prefix`` names its components in the metrics ("" for a stage's only teacher)."""

    signal: TeacherSignal
    losses: list[LogitLoss]
    weights: list[float]
    prefix: str

    def names(self) -> list[str]:
        """The metric name of each loss (the teacher-free ``ce`` unprefixed)."""
        return [spec.kind if spec.kind == "ce" else self.prefix + spec.kind for spec in self.losses]


def _signal(section: TeacherSection, config: TrainConfig, student_parallel: ParallelConfig, vocab_size: int,
            device: torch.device) -> TeacherSignal:
    if section.kind == "offline":
        return OfflineTeacher(config, section.path, vocab_size, device)
    return OnlineTeacher.load(config, student_parallel, section)


def teacher_signals(config: TrainConfig, student_parallel: ParallelConfig, vocab_size: int,
                    device: torch.device) -> list[TeacherPlan]:
    """The stage's teachers with their losses. One ``teacher``: ``losses.logits`` as given (``ce`` included).
    ``teachers``: each its own losses (default ``losses.logits`` without ``ce``) times its weight, metrics as
    ``teacher<i>/<kind>``; the stage's ``ce`` once, with the first teacher."""
    if not config.teachers:
        signal = _signal(config.teacher, config, student_parallel, vocab_size, device)
        return [TeacherPlan(signal, config.logit_losses(), [item.weight for item in config.losses.logits], "")]
    plans = []
    for i, section in enumerate(config.teachers):
        pairs = config.teacher_losses(section)
        plans.append(TeacherPlan(_signal(section, config, student_parallel, vocab_size, device),
                                 [spec for spec, _ in pairs], [w for _, w in pairs], f"teacher{i}/"))
    ce = [item for item in config.losses.logits if item.kind == "ce"]
    plans[0].losses += [LogitLoss(item.kind, item.temperature, item.beta) for item in ce]
    plans[0].weights += [item.weight for item in ce]
    return plans
