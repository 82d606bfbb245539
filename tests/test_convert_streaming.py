"""Streaming bounds of both converters on a mid-size synthetic student: the peak RSS of the import (HF → Megatron)
and of the export, each measured in its own process, stays within about one layer above the process's RSS before
the conversion, far below the model size. The streamed import writes the same checkpoint as Megatron's default save
of the fully loaded model (what the import did before it streamed). Prints the speed (MB/s) of both directions."""

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest
import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import GptOssConfig

from megatron_harness import MIXED_PLAN, hf_student

from megatron_student.checkpoint import (METADATA_KEY, VOCAB_DIVISIBLE_BY, LazyState, MegatronCheckpoint,
                                         open_hf_checkpoint, resolve_megatron_dir, single_process_group)
from megatron_student.convert import convert_hf_to_megatron
from megatron_student.convert.hf_to_megatron import unit_of
from megatron_student.dtypes import DTYPES
from megatron_student.megatron import (ParallelConfig, build_student, build_teacher, initialize_parallel,
                                       load_hf_weights, restore_fp32_parameters)
from megatron_student.student.config import StudentConfig
from megatron_student.student.modeling import StudentForCausalLM
from megatron_student.teacher import make_tiny_teacher

PEAK_RSS = """
import json, sys
def status(field):  # kB lines of /proc/self/status
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
def measure(convert):
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    result = convert()
    print(json.dumps({"bytes": result["bytes"], "seconds": result["seconds"], "grown": status("VmHWM") - before}))
"""
IMPORT = PEAK_RSS + """
from megatron_student.checkpoint import open_hf_checkpoint
from megatron_student.convert.hf_to_megatron import convert_hf_to_megatron
open_hf_checkpoint(sys.argv[1], "student")  # imports and header reads before the measurement
measure(lambda: convert_hf_to_megatron(sys.argv[1], sys.argv[2], "student", dtype="fp32"))
"""
EXPORT = PEAK_RSS + """
from megatron_student.checkpoint import MegatronCheckpoint
from megatron_student.convert.megatron_to_hf import convert_megatron_to_hf
MegatronCheckpoint(sys.argv[1])
measure(lambda: convert_megatron_to_hf(sys.argv[1], sys.argv[2], max_shard_bytes=int(sys.argv[3])))
"""
MiB = 2**20


def measured(script: str, *args) -> dict:
    # A fixed mmap threshold: glibc would raise it to the size of freed tensors and then keep MiB-sized tensors in
    # its heap, whose freed pages stay resident; the RSS would then show the allocator's high-water mark, not ours.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], check=True, capture_output=True, text=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A random fp32 student of 12 layers × 16 experts (the layers dominate its size) as an HF dir, and its
    Megatron checkpoint from a measured import: (directory, import result)."""
    root = tmp_path_factory.mktemp("streaming")
    teacher = GptOssConfig(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=12,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_local_experts=16,
                           num_experts_per_tok=2, sliding_window=16, attention_bias=True, tie_word_embeddings=False,
                           layer_types=["sliding_attention", "full_attention"] * 6)
    torch.manual_seed(int(torch.randint(0, 2**31, ()).item()))
    StudentForCausalLM(StudentConfig.from_teacher(teacher)).save_pretrained(root / "hf")  # fp32, random init
    return root, measured(IMPORT, root / "hf", root / "mg")


def tensor_bytes(megatron_dir) -> dict[str, int]:
    """Bytes of every tensor of a Megatron checkpoint (global shape, checkpoint dtype)."""
    return {key: torch.Size(m.size).numel() * m.properties.dtype.itemsize
            for key, m in MegatronCheckpoint(megatron_dir).tensors.items()}


def unit_bytes(sizes: dict[str, int]) -> dict[str, int]:
    """Bytes of every streaming unit of the import (a decoder layer, or a module outside the layers)."""
    units = defaultdict(int)
    for key, n in sizes.items():
        units[unit_of(key)] += n
    return units


def test_import_peak_memory_is_one_layer_not_the_model(imported):
    root, result = imported
    sizes = tensor_bytes(root / "mg")
    model_bytes, largest, unit = sum(sizes.values()), max(sizes.values()), max(unit_bytes(sizes).values())
    bound = 2 * unit + largest + 32 * MiB  # a unit + the HF tensors it is made from (same fp32 size), a copy, slack
    print(f"\nmodel {model_bytes / MiB:.0f} MiB fp32, largest tensor {largest / MiB:.1f} MiB, largest unit "
          f"{unit / MiB:.1f} MiB; import peak RSS +{result['grown'] / MiB:.0f} MiB (bound {bound / MiB:.0f} MiB); "
          f"HF→Megatron {result['bytes'] / MiB / result['seconds']:.0f} MB/s")
    assert model_bytes > 2 * bound  # the check can tell streaming from loading the model
    assert result["grown"] < bound


def test_export_peak_memory_is_one_layer_not_the_model(imported, tmp_path):
    root, _ = imported
    sizes = tensor_bytes(root / "mg")
    model_bytes, largest = sum(sizes.values()), max(sizes.values())
    layer = max(n for unit, n in unit_bytes(sizes).items() if unit.startswith("decoder.layers."))
    shard = 8 * MiB
    result = measured(EXPORT, root / "mg", tmp_path / "out", shard)
    grown = result["grown"]
    bound = layer + 2 * largest + shard + 32 * MiB  # a layer read + a converted copy and its bf16 cast, a shard, slack
    print(f"\nmodel {model_bytes / MiB:.0f} MiB fp32, largest tensor {largest / MiB:.1f} MiB, layer "
          f"{layer / MiB:.1f} MiB; export peak RSS +{grown / MiB:.0f} MiB (bound {bound / MiB:.0f} MiB); Megatron→HF "
          f"{model_bytes / MiB / result['seconds']:.0f} MB/s read ({result['bytes'] / MiB / result['seconds']:.0f} "
          "MB/s bf16 written)")
    assert model_bytes > 2 * bound  # the check can tell streaming from loading the model
    assert grown < bound
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1


def megatron_save_of_loaded_model(hf_dir, role: str, tp: int, dtype: str, directory, record: dict):
    """What the import wrote before it streamed: the whole model loaded, then Megatron's default torch_dist save."""
    reader, config, _ = open_hf_checkpoint(hf_dir, role)
    with single_process_group():
        parallel = ParallelConfig(params_dtype=DTYPES[dtype], make_vocab_size_divisible_by=VOCAB_DIVISIBLE_BY * tp)
        initialize_parallel(parallel)
        model = build_student(config, parallel) if role == "student" else build_teacher(config, parallel)
        restore_fp32_parameters(model)
        load_hf_weights(model, LazyState(reader))
        sharded = model.sharded_state_dict()
        sharded[METADATA_KEY] = record
        directory.mkdir()
        dist_checkpointing.save(sharded, str(directory))
    return directory


def storage_layout(directory) -> dict:
    """Every key of a torch_dist checkpoint (tensors and extra-state objects) with, for tensors, the global shape,
    dtype and chunks (the TP/EP sharding it was saved with)."""
    entries = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return {key: (type(m).__name__, m.size, m.properties, m.chunks) if isinstance(m, TensorStorageMetadata)
            else (type(m).__name__,) for key, m in entries.items()}


@pytest.mark.parametrize("role,tp,dtype", [
    ("student", 1, "bf16"),  # every attention kind; fp32 HF weights cast to bf16, router and KDA decays kept fp32
    ("teacher", 2, "fp32"),  # MXFP4 experts; vocabulary padded for TP=2 (201088 → 201216)
])
def test_streamed_import_equals_megatron_save_of_the_loaded_model(tmp_path, role, tp, dtype):
    seed = int(torch.randint(0, 2**31, ()).item())
    if role == "student":
        hf_student(MIXED_PLAN, seed=seed).save_pretrained(tmp_path / "hf")
    else:
        make_tiny_teacher(tmp_path / "hf", seed=seed, mxfp4=True, layers=2)
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "streamed", role, tp=tp, dtype=dtype)
    streamed = resolve_megatron_dir(tmp_path / "streamed")
    reference = megatron_save_of_loaded_model(tmp_path / "hf", role, tp, dtype, tmp_path / "reference",
                                              MegatronCheckpoint(streamed).metadata)

    assert list(storage_layout(streamed).items()) == list(storage_layout(reference).items())
    keys = list(MegatronCheckpoint(streamed).tensors)
    got, expected = MegatronCheckpoint(streamed).get_many(keys), MegatronCheckpoint(reference).get_many(keys)
    for key in keys:
        assert torch.equal(got[key], expected[key]), key
    common = [torch.load(d / "common.pt", weights_only=False) for d in (streamed, reference)]
    assert common[0] == common[1]
    assert (streamed / "metadata.json").read_text() == (reference / "metadata.json").read_text()
