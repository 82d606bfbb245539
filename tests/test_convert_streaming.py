"""Streaming bound of the HF export on a mid-size synthetic student: peak RSS of the export process stays within
one layer plus one shard above its RSS before the export, far below the model size.
Prints the conversion speed (MB/s) of both directions."""

import json
import subprocess
import sys

import torch
from transformers import GptOssConfig

from megatron_student.convert import convert_hf_to_megatron
from megatron_student.convert.megatron_to_hf import MegatronCheckpoint
from megatron_student.student.config import StudentConfig
from megatron_student.student.modeling import StudentForCausalLM

EXPORT = """
import json, sys
from megatron_student.convert.megatron_to_hf import MegatronCheckpoint, convert_megatron_to_hf
def status(field):  # kB lines of /proc/self/status
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
MegatronCheckpoint(sys.argv[1])
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
result = convert_megatron_to_hf(sys.argv[1], sys.argv[2], max_shard_bytes=int(sys.argv[3]))
print(json.dumps({**result, "grown": status("VmHWM") - before}))
"""
MiB = 2**20


def export(*args) -> dict:
    out = subprocess.run([sys.executable, "-c", EXPORT, *map(str, args)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_export_peak_memory_is_one_layer_not_the_model(tmp_path):
    teacher = GptOssConfig(vocab_size=8192, hidden_size=256, intermediate_size=256, num_hidden_layers=12,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_local_experts=16,
                           num_experts_per_tok=2, sliding_window=16, attention_bias=True, tie_word_embeddings=False,
                           layer_types=["sliding_attention", "full_attention"] * 6)
    torch.manual_seed(int(torch.randint(0, 2**31, ()).item()))
    StudentForCausalLM(StudentConfig.from_teacher(teacher)).save_pretrained(tmp_path / "hf")  # fp32, random init
    imported = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mg", "student", dtype="fp32")

    ckpt = MegatronCheckpoint(tmp_path / "mg")
    sizes = {k: torch.Size(m.size).numel() * 4 for k, m in ckpt.tensors.items()}
    model_bytes, largest = sum(sizes.values()), max(sizes.values())
    shard = 8 * MiB
    layer = max(sum(n for k, n in sizes.items() if k.startswith(f"decoder.layers.{i}.")) for i in range(12))
    result = export(tmp_path / "mg", tmp_path / "out", shard)
    grown = result["grown"]
    bound = layer + 2 * largest + shard + 32 * MiB  # a layer read + a converted copy and its bf16 cast, a shard, slack
    print(f"\nmodel {model_bytes / MiB:.0f} MiB fp32, largest tensor {largest / MiB:.1f} MiB, layer {layer / MiB:.1f} MiB; export peak RSS +"
          f"{grown / MiB:.0f} MiB (bound {bound / MiB:.0f} MiB); HF→Megatron {imported['bytes'] / MiB / imported['seconds']:.0f}"
          f" MB/s, Megatron→HF {model_bytes / MiB / result['seconds']:.0f} MB/s read "
          f"({result['bytes'] / MiB / result['seconds']:.0f} MB/s bf16 written)")
    assert model_bytes > 2 * bound  # the check can tell streaming from loading the model
    assert grown < bound
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
