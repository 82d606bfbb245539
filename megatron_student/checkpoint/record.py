"""The record every Megatron checkpoint of this project carries: a plain dict under ``METADATA_KEY`` in the
checkpoint's common state (``common.pt``), written by the HF → Megatron converter and by the trainer, read by
the trainer's loader, the HF export and the handoff.

The stored dict holds, in this order: ``format_version``, ``role`` ("student"/"teacher"), ``hf_config`` (the HF
config dict the model is built from), ``source`` (what it was made from), ``stage``, ``tokens_seen``, ``dtype``
(the parameter dtype name), ``step`` (training checkpoints only) and ``layout`` (the TP/EP it was written at and
is meant for, the vocabulary padding unit, and the context-parallel size of the run that wrote it: informational,
since CP shards no weight and a checkpoint loads at any CP; records written before CP existed lack it and read as 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .torch_dist import ConversionError, load_common_state

METADATA_KEY = "megatron_student"  # non-tensor entry of the checkpoint's common state (common.pt)
FORMAT_VERSION = 1
ROLES = ("student", "teacher")
VOCAB_DIVISIBLE_BY = 128  # Megatron pads the vocabulary to a multiple of this × TP (ParallelConfig)


@dataclass(frozen=True)
class CheckpointLayout:
    """The parallel layout a checkpoint was written at and the one its vocabulary padding is for."""

    written_tp: int
    written_ep: int
    target_tp: int
    target_ep: int
    make_vocab_size_divisible_by: int = VOCAB_DIVISIBLE_BY
    written_cp: int = 1


@dataclass(frozen=True, kw_only=True)
class CheckpointRecord:
    """The ``METADATA_KEY`` record (see the module docstring); fields in their stored order."""

    format_version: int = FORMAT_VERSION
    role: str
    hf_config: dict
    source: str
    stage: str
    tokens_seen: int
    dtype: str
    step: int | None = None
    layout: CheckpointLayout

    def to_dict(self) -> dict:
        """The stored form: plain values only (``common.pt`` is read back with ``weights_only=True``)."""
        stored = dataclasses.asdict(self)
        if self.step is None:
            del stored["step"]
        return stored

    @classmethod
    def from_dict(cls, stored, where: str) -> CheckpointRecord:
        """The record of a stored dict; ``where`` (the file) is named in the errors."""
        if not isinstance(stored, dict):
            raise ConversionError(f"{where}: the '{METADATA_KEY}' record is a {type(stored).__name__}, not a dict")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(stored) - set(fields))
        if unknown:
            raise ConversionError(f"{where}: the '{METADATA_KEY}' record has unknown fields {unknown}")
        required = [name for name, f in fields.items() if name not in stored and name != "step"]
        if required:
            raise ConversionError(f"{where}: the '{METADATA_KEY}' record lacks fields {required}")
        if stored["format_version"] != FORMAT_VERSION:
            raise ConversionError(f"{where}: '{METADATA_KEY}' record format_version {stored['format_version']!r}; "
                                  f"this version reads {FORMAT_VERSION}")
        if stored["role"] not in ROLES:
            raise ConversionError(f"{where}: '{METADATA_KEY}' record role {stored['role']!r}; expected one of {ROLES}")
        if not isinstance(stored["hf_config"], dict):
            raise ConversionError(f"{where}: '{METADATA_KEY}' record field 'hf_config' is not a dict")
        layout = stored["layout"]
        layout_fields = [f.name for f in dataclasses.fields(CheckpointLayout)]
        if isinstance(layout, dict) and "written_cp" not in layout:  # a record from before context parallelism
            layout = {**layout, "written_cp": 1}
        if not isinstance(layout, dict) or sorted(layout) != sorted(layout_fields):
            raise ConversionError(f"{where}: '{METADATA_KEY}' record field 'layout' is {layout!r}; expected a dict "
                                  f"of {layout_fields}")
        return cls(**{**stored, "layout": CheckpointLayout(**layout)})


def read_record(directory: Path) -> CheckpointRecord:
    """The record in ``common.pt`` of the torch_dist checkpoint ``directory``."""
    common = load_common_state(directory)
    if METADATA_KEY not in common:
        raise ConversionError(f"{directory}/common.pt: no '{METADATA_KEY}' record (role, HF config, layout); convert "
                              "the checkpoint with megatron-student convert-hf-to-megatron, which writes it")
    return CheckpointRecord.from_dict(common[METADATA_KEY], f"{directory}/common.pt")
