"""`megatron-student convert-megatron-to-hf`: a Megatron student checkpoint (torch_dist, saved at any TP/EP) →
an HF BF16 bundle that loads with ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)``.

Streaming: the checkpoint's tensors are global (dist checkpoints store global shapes whatever TP/EP wrote them),
so the tensors of one decoder layer (or the embedding / output layer alone) are read together from the DCP files
(``torch.distributed.checkpoint.load`` of those keys, no process group), converted and handed to
``hf_io.StreamingCheckpointWriter``. Peak memory: one layer in the checkpoint dtype (or the embedding) plus the bf16
copy of its largest tensor (a layer's stacked experts, [E, 2I, H]), plus one pending HF shard (``--max-shard-mb``).

Mapping: the rows of ``megatron.mapping`` (the table the import iterates too), each HF tensor read from its
global checkpoint key and turned into the HF layout by the row's ``to_hf``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from itertools import groupby
from pathlib import Path

import torch

from ..checkpoint import CheckpointRecord, ConversionError, MegatronCheckpoint
from ..hf_io import StreamingCheckpointWriter
from ..megatron.mapping import megatron_key
from ..student.config import StudentConfig
from ..student.modeling import StudentForCausalLM, write_bundle_files
from ..student.spec import layer_specs
from ..student.surgery import FP32_PARAMETERS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt")


def megatron_source(hf_name: str, hf_shape: tuple[int, ...]) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The Megatron global key holding ``hf_name`` and the function turning that tensor into the HF one."""
    try:
        row, key = megatron_key(hf_name)
    except KeyError as e:
        raise ConversionError(e.args[0]) from None
    return key, lambda t: row.to_hf(t, torch.Size(hf_shape))


def layer_of(hf_name: str) -> str:
    """The streaming unit of an HF tensor: its decoder layer, or the tensor itself outside the layers."""
    parts = hf_name.split(".")
    return ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else hf_name


def model_card(config: StudentConfig, record: CheckpointRecord, source: Path) -> str:
    kinds = [spec.kind for spec in layer_specs(config)]
    counts = ", ".join(f"{kinds.count(k)} × {k}" for k in dict.fromkeys(kinds))
    return "\n".join([
        "# gpt-oss student", "",
        "A distilled student of gpt-oss with an attention plan (SWA+TPA / KDA / softmax per layer), exported from "
        "a Megatron-Core checkpoint by `megatron-student convert-megatron-to-hf`.", "",
        f"- Source teacher: {config.teacher_name_or_path or 'unknown'}",
        f"- Stage: {record.stage}",
        f"- Tokens seen: {record.tokens_seen}",
        f"- Megatron checkpoint: {source}",
        f"- Layers: {config.num_hidden_layers} ({counts}); per layer: {kinds}",
        f"- Plan: `{json.dumps(config.plan, sort_keys=True)}`", "",
        "Load with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` (needs the `megatron_student` "
        "package installed). Weights are bf16 except the KDA decay parameters A_log / dt_bias (fp32).", "",
    ])


def convert_megatron_to_hf(megatron_dir: str | Path, output_dir: str | Path, teacher_dir: str | Path | None = None,
                           force: bool = False, max_shard_bytes: int = 5 * 1024**3,
                           allow_nonfinite: bool = False) -> dict:
    """Write the HF bundle; returns ``{"bytes": written tensor bytes, "seconds": ...}``."""
    start = time.perf_counter()
    ckpt = MegatronCheckpoint(megatron_dir)
    record = ckpt.record
    if record.role != "student":
        raise ConversionError(f"{ckpt.directory}: a {record.role!r} checkpoint; only student checkpoints export "
                              "to an HF student bundle")
    model_type = record.hf_config.get("model_type")
    if model_type != StudentConfig.model_type:
        raise ConversionError(f"{ckpt.directory}: recorded HF config has model_type {model_type!r}, expected "
                              f"{StudentConfig.model_type!r}")
    config = StudentConfig.from_dict(record.hf_config)
    config.dtype = "bfloat16"
    with torch.device("meta"):
        expected = {n: tuple(t.shape) for n, t in StudentForCausalLM(config).state_dict().items()}
    sources = {name: megatron_source(name, shape) for name, shape in expected.items()}
    unexpected = sorted(set(ckpt.tensors) - {key for key, _ in sources.values()})
    if unexpected:
        raise ConversionError(f"{ckpt.directory}: unexpected Megatron tensor '{unexpected[0]}'"
                              + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    for name, (key, _) in sources.items():
        if key not in ckpt.tensors:
            raise ConversionError(f"{ckpt.directory}: missing Megatron tensor '{key}' (for HF '{name}')")
    with StreamingCheckpointWriter(output_dir, max_shard_bytes=max_shard_bytes, force=force,
                                   allow_nonfinite=allow_nonfinite) as writer:
        for group in groupby(sources.items(), key=lambda item: layer_of(item[0])):  # one layer per DCP read
            items = list(group[1])
            tensors = ckpt.get_many([key for _, (key, _) in items])
            for name, (key, convert) in items:
                megatron = tensors.pop(key)
                try:
                    tensor = convert(megatron)
                except RuntimeError as e:  # reshape of a wrong element count
                    raise ConversionError(f"{ckpt.directory}: Megatron tensor '{key}' {tuple(megatron.shape)} does "
                                          f"not fit HF '{name}' {expected[name]}: {e}") from e
                if tuple(tensor.shape) != expected[name]:
                    raise ConversionError(f"{ckpt.directory}: Megatron tensor '{key}' {tuple(megatron.shape)} gives "
                                          f"HF '{name}' shape {tuple(tensor.shape)}, the config needs {expected[name]}")
                dtype = torch.float32 if name.rsplit(".", 1)[-1] in FP32_PARAMETERS else torch.bfloat16
                writer.add(name, tensor.to(dtype))
                del megatron, tensor
        write_bundle_files(writer.directory, config)
        writer.write_text("README.md", model_card(config, record, ckpt.directory))
        if teacher_dir is not None:
            copied = [f for f in TOKENIZER_FILES if (Path(teacher_dir) / f).is_file()]
            if not copied:
                raise FileNotFoundError(f"{teacher_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
            for f in copied:
                shutil.copyfile(Path(teacher_dir) / f, writer.directory / f)
        total = writer.total_bytes
    return {"bytes": total, "seconds": time.perf_counter() - start}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--megatron", required=True, help="Megatron checkpoint: torch_dist dir or a save dir with "
                                                          "latest_checkpointed_iteration.txt")
    parser.add_argument("--output", required=True, help="HF bundle directory to create")
    parser.add_argument("--teacher-dir", help="gpt-oss HF dir whose tokenizer files are copied into the bundle")
    parser.add_argument("--max-shard-mb", type=float, default=5120, help="safetensors shard size")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="write tensors holding NaN/Inf (default: stop, naming the first such tensor)")


def run(args: argparse.Namespace) -> int:
    result = convert_megatron_to_hf(args.megatron, args.output, args.teacher_dir, args.force,
                                    int(args.max_shard_mb * 2**20), args.allow_nonfinite)
    mb = result["bytes"] / 2**20
    print(f"wrote HF student bundle {args.output} ({mb:.1f} MiB bf16 in {result['seconds']:.1f}s, "
          f"{mb / result['seconds']:.1f} MB/s)")
    return 0
