"""What a training run checks before it reads a capture as its offline teacher (``teacher: {kind: offline}``)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from . import format as fmt


def open_capture_for_training(config, capture_dir: str | os.PathLike, vocab_size: int) -> fmt.CaptureReader:
    """The capture at ``capture_dir`` checked against a resolved ``TrainConfig`` and the student's vocabulary
    size, or a :class:`~megatron_student.offline.format.CaptureError` naming the file: a missing directory or
    ``capture.json``, another format version, another vocabulary, prepared data (``data.path``) whose files differ
    from those captured, another ``data.seq_len``, no ``train`` split (or no ``valid`` split while ``eval.every``
    needs one), a missing or truncated shard. Rows are then read per micro-batch with
    :meth:`~megatron_student.offline.format.CaptureReader.micro_batch`."""
    reader = fmt.CaptureReader(capture_dir, vocab_hash=fmt.vocabulary_hash(vocab_size))
    header_path = reader.root / fmt.CAPTURE_FILE
    splits = ["train"] + (["valid"] if config.eval.every > 0 else [])
    for split in splits:
        if split not in reader.header["splits"]:
            why = "" if split == "train" else (" (eval.every > 0 needs the teacher's held-out rows: capture with "
                                               "--split valid, or set eval.every to 0)")
            raise fmt.CaptureError(f"{header_path}: no split {split!r} captured (captured: "
                                   f"{', '.join(reader.header['splits'])}){why}")
        seq_len = reader.header["splits"][split]["seq_len"]
        if seq_len != config.data.seq_len:
            raise fmt.CaptureError(f"{header_path}: split {split!r} was captured at seq_len {seq_len}, data.seq_len "
                                   f"is {config.data.seq_len}")
    data = {split: fmt.data_identity(Path(config.data.path), split) for split in reader.header["splits"]
            if (Path(config.data.path) / split).is_dir()}
    for split in splits:
        if split not in data:
            raise fmt.CaptureError(f"{Path(config.data.path) / split}: no prepared split to check the capture "
                                   f"{header_path} against")
    fmt.CaptureReader(capture_dir, data=data)  # the data hashes, with the files that differ named
    for split in reader.header["splits"]:
        for shard in range(math.ceil(reader.header["splits"][split]["samples"] / reader.samples_per_shard)):
            reader.shard(split, shard)  # present, sized as its header says, and of this capture
    return reader
