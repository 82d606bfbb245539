"""Student training-step throughput on one GPU: the Megatron-Core student (``megatron_student.megatron``) beside the
HF student (``StudentForCausalLM``), same weights and inputs, bf16, fwd+bwd, gpt-oss-20b width (hidden 2880, 64/8
heads of 64, 32 experts top-4), 4 layers (SWA+TPA / KDA alternating), T = 4096 and 8192, batch 1.

The Megatron step is what the trainer runs for a CE-only stage: the trainer's parallel defaults (grouped experts,
the sorted token dispatch at EP = 1), one packed document with its boundaries on the host, and the CE of
``ops.losses.logit_losses`` (the fused Triton kernel on CUDA) on the bf16 logits. The HF step is a plain HF loop
(logits to float32, ``F.cross_entropy``).

MFU = model FLOPs / (step time × peak). Model FLOPs of fwd+bwd = 6 × active matmul parameters per token × tokens
(attention/TPA/KDA projections, router, the top-k experts, lm_head) + 3 × the forward token-mixing FLOPs: sliding
attention 4·H·D per visible key (QKᵀ and PV; query t sees min(t+1, W) keys), KDA 6·T·K² + 3·T·C·K + T·C² per
value head (chunk C = 64, Kimi Linear). Peak defaults to the H100 SXM dense bf16 figure (989 TFLOP/s).

Run: ``python benchmarks/train_step.py [--peak-tflops 989] [--lengths 4096 8192] [--iters 5] [--profile DIR]``
(``--profile``: a torch-profiler table of the Megatron step per length, as ``distill_step.py --profile`` writes).
"""

from __future__ import annotations

import argparse
import os
import sys
import socket
import time
from pathlib import Path

import torch
import torch.nn.functional as F

WIDTH = dict(hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
             num_local_experts=32, num_experts_per_tok=4, num_hidden_layers=4, sliding_window=128, vocab_size=201088)
KDA_CHUNK = 64
sys.path.insert(0, str(Path(__file__).resolve().parent))


def student_config():
    from transformers import GptOssConfig

    from megatron_student.student.config import StudentConfig

    teacher = GptOssConfig(**WIDTH, layer_types=["sliding_attention", "full_attention"] * 2, attention_bias=True,
                           tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return StudentConfig.from_teacher(teacher)


def active_matmul_params(hf_model, config) -> int:
    """Parameters a token multiplies through: everything but the embedding, with only top-k of the experts."""
    total = 0
    for name, p in hf_model.named_parameters():
        if name == "model.embed_tokens.weight" or p.dim() < 2:
            continue
        if ".mlp.experts." in name:
            total += p.numel() * config.num_experts_per_tok // config.num_local_experts
        else:
            total += p.numel()
    return total


def mixing_flops_forward(config, length: int) -> float:
    from megatron_student.student.spec import KdaSpec, layer_specs

    flops = 0.0
    for spec in layer_specs(config):
        if isinstance(spec, KdaSpec):
            K, C = spec.head_dim, KDA_CHUNK
            flops += spec.v_heads * (6 * length * K * K + 3 * length * C * K + length * C * C)
        else:  # softmax or SWA+TPA: window None is full causal
            window = length if spec.window is None else spec.window
            visible = sum(min(t + 1, window) for t in range(length))
            flops += 4 * spec.num_heads * spec.head_dim * visible
    return flops


def timed(step, iters: int) -> float:
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--profile", type=Path, help="write profile_megatron_T<length>.txt here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_step.py needs a CUDA GPU")

    from distill_step import profile

    from megatron_student.megatron import (ParallelConfig, build_student, initialize_parallel, load_hf_weights,
                                           restore_fp32_parameters)
    from megatron_student.megatron.attention import PackedDocuments
    from megatron_student.ops.losses import LogitLoss, logit_losses
    from megatron_student.student.modeling import StudentForCausalLM

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    parallel = ParallelConfig(params_dtype=torch.bfloat16)  # the trainer's defaults
    initialize_parallel(parallel)

    config = student_config()
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the GPU: minutes on the CPU at this size
        hf = StudentForCausalLM(config).to(torch.bfloat16)
    for module in hf.modules():  # A_log / dt_bias stay fp32 as in a loaded checkpoint
        for name in ("A_log", "dt_bias"):
            if hasattr(module, name):
                getattr(module, name).data = getattr(module, name).data.float()
    megatron = build_student(config, parallel)
    restore_fp32_parameters(megatron)
    load_hf_weights(megatron, hf.state_dict())
    hf.train()
    megatron.train()
    params = active_matmul_params(hf, config)

    print(f"{torch.cuda.get_device_name()}, bf16, 4 layers at gpt-oss-20b width, {params / 1e9:.2f}B active matmul "
          f"params, peak {args.peak_tflops:.0f} TFLOP/s")
    print(f"{'path':<10}{'T':>7}{'tokens/s':>12}{'MFU':>8}{'ms/step':>10}{'peak GiB':>10}", flush=True)
    for length in args.lengths:
        tokens = torch.randint(0, config.vocab_size, (1, length + 1), device="cuda")
        inputs, labels = tokens[:, :-1], tokens[:, 1:]

        def hf_step():
            logits = hf(inputs).logits
            F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()
            hf.zero_grad(set_to_none=True)

        packed = PackedDocuments.of(torch.tensor([0, length]), torch.device("cuda"))
        ones = torch.ones(length, device="cuda")

        def megatron_step():
            logits = megatron(inputs, None, None, packed_seq_params=packed)
            (ce, ) = logit_losses(logits[0], None, [LogitLoss("ce")], ones, labels=labels[0],
                                  vocab_size=config.vocab_size, check_labels=False)
            (ce / length).backward()
            megatron.zero_grad(set_to_none=True)

        flops = 6 * params * length + 3 * mixing_flops_forward(config, length)
        for name, step in (("hf", hf_step), ("megatron", megatron_step)):
            torch.cuda.reset_peak_memory_stats()
            seconds = timed(step, args.iters)
            mfu = flops / seconds / (args.peak_tflops * 1e12)
            gib = torch.cuda.max_memory_allocated() / 2**30
            print(f"{name:<10}{length:>7}{length / seconds:>12.0f}{mfu:>8.1%}{seconds * 1e3:>10.1f}{gib:>10.1f}",
                  flush=True)
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            profile(megatron_step, args.profile / f"profile_megatron_T{length}.txt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
