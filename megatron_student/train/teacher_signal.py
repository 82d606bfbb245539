"""The teacher's side of the distillation losses: a *signal source* gives, for each micro-batch, what the losses
need from the teacher (``TeacherTargets``), whatever the teacher is.

``OnlineTeacher``: the teacher model co-located on the student's ranks with the same TP/EP, run under no_grad on
each micro-batch; its targets are the dense vocab-parallel logits (``DenseTargets``) and the activations the
alignment losses asked for (layer outputs, attention inputs/outputs).

A source that reads stored teacher distributions (an offline capture, ``offline.format.CaptureReader``) gives
the same interface: its ``targets(mb)`` looks up the rows of ``mb.split`` / ``mb.samples`` at the trained
positions (``mb.targets != -100``) and returns targets whose ``logit_losses`` compares the student with the
stored top-k + tail (``ops.losses.sparse_logit_losses``); it has no activations (``num_layers`` 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from ..checkpoint import load_model
from ..dtypes import DTYPES
from ..megatron import ParallelConfig
from ..ops.losses import LogitLoss, logit_losses
from .activations import Capture
from .batches import MicroBatch
from .config import TrainConfig
from .optim import active_parameters


class TeacherTargets(Protocol):
    """The teacher's side of one micro-batch's losses."""

    layer_outputs: dict[int, torch.Tensor]  # teacher decoder layer outputs by layer (hidden-state alignment)
    attention_inputs: dict[int, torch.Tensor]  # inputs of teacher attention modules by layer (attention alignment)
    attention_outputs: dict[int, torch.Tensor]  # their outputs (bias added)

    def logit_losses(self, student_logits: torch.Tensor, losses: Sequence[LogitLoss], weights: torch.Tensor, *,
                     labels: torch.Tensor, vocab_size: int, tp_group: dist.ProcessGroup | None,
                     chunk_size: int) -> torch.Tensor:
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

    def close(self) -> None:
        """Release what the source holds (hooks, files)."""
        ...


@dataclass
class DenseTargets:
    """A teacher run on the micro-batch: its vocab-parallel logits [N, V_local] and captured activations."""

    logits: torch.Tensor
    layer_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    attention_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    attention_outputs: dict[int, torch.Tensor] = field(default_factory=dict)

    def logit_losses(self, student_logits: torch.Tensor, losses: Sequence[LogitLoss], weights: torch.Tensor, *,
                     labels: torch.Tensor, vocab_size: int, tp_group: dist.ProcessGroup | None,
                     chunk_size: int) -> torch.Tensor:
        return logit_losses(student_logits, self.logits, losses, weights, labels=labels, vocab_size=vocab_size,
                            tp_group=tp_group, chunk_size=chunk_size)


class OnlineTeacher:
    """The teacher model on this rank (same TP/EP as the student), frozen; ``targets`` runs it under no_grad."""

    def __init__(self, model: torch.nn.Module, config):
        self.model = model.eval().requires_grad_(False)
        self.config = config
        self.num_layers = len(model.decoder.layers)
        self.flops_per_token = 2 * active_parameters(model)
        self._capture = Capture()

    @classmethod
    def load(cls, config: TrainConfig, student_parallel: ParallelConfig) -> OnlineTeacher:
        """The ``teacher`` section's checkpoint in ``teacher.dtype`` (auto: bf16 on GPU, fp32 on CPU), laid out as
        the student (no activation recompute: it runs under no_grad)."""
        dtype = DTYPES.get(config.teacher.dtype, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        parallel = ParallelConfig(**{**student_parallel.__dict__, "params_dtype": dtype, "recompute": None})
        model, hf_config, _ = load_model(config.teacher.path, "teacher", parallel)
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
        with torch.no_grad():
            logits = self.model(mb.tokens, None, None, packed_seq_params=mb.packed)
        c = self._capture
        return DenseTargets(logits[0], dict(c.outputs), dict(c.attn_in), dict(c.attn_out))

    def close(self) -> None:
        self._capture.remove()


def teacher_signal(config: TrainConfig, student_parallel: ParallelConfig) -> TeacherSignal:
    """The stage's teacher signal (the ``teacher`` section: an online teacher checkpoint)."""
    return OnlineTeacher.load(config, student_parallel)
