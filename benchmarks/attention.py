"""GPU benchmark (one run, one table): forward+backward time of the student's attention layers.

1. Our KDA module (HF student layer: fla chunk_kda through megatron_student.ops.kda, biases kept) vs fla's
   own `KimiDeltaAttention` with matched options (64 heads × 64, short conv 4, chunk mode). Target ≤ 1.15×.
2. Our SWA(128)+TPA layer vs the teacher's full-causal GQA attention with sinks (same FlexAttention
   kernel family). Target: faster at every T ≥ 4096.

Usage: python benchmarks/attention.py [--lengths 4096 8192 32768] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from transformers import GptOssConfig

from megatron_student.ops.rope import YarnRope
from megatron_student.student.config import StudentConfig
from megatron_student.student.modeling import KdaAttention, SoftmaxAttention, SwaTpaAttention, init_kda_extras, make_positions
from megatron_student.student.spec import layer_specs

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 2880, 64, 8, 64


def time_fwd_bwd(fn, x, warmup=3, repeat=10) -> tuple[float, float]:
    """Median milliseconds of forward+backward, and peak memory (GiB) of one step."""
    times = []
    for i in range(warmup + repeat):
        x.grad = None
        torch.cuda.synchronize()
        if i == warmup:
            torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(x)
        out.backward(torch.ones_like(out))
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def teacher_config() -> GptOssConfig:
    """Two layers: sliding (→ SWA+TPA in the student), full (→ KDA; the teacher's full GQA for comparison)."""
    return GptOssConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                        head_dim=HEAD_DIM, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                        intermediate_size=64, layer_types=["sliding_attention", "full_attention"])


def randomise_(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name not in ("A_log", "dt_bias"):
                p.normal_(0, 0.02)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 32768])
    parser.add_argument("--json")
    parser.add_argument("--only", choices=("kda", "swa"), help="run one of the two comparisons")
    args = parser.parse_args()
    from fla.layers import KimiDeltaAttention

    torch.manual_seed(0)
    teacher = teacher_config()
    config = StudentConfig.from_teacher(teacher)
    swa_tpa_spec, kda_spec = layer_specs(config)
    yarn = YarnRope.from_hf_config(config)
    dtype, device = torch.bfloat16, "cuda"
    ours_kda = KdaAttention(kda_spec, 1)
    randomise_(ours_kda)
    init_kda_extras(ours_kda, torch.Generator().manual_seed(0))
    ours_kda = ours_kda.to(device, dtype)
    ours_kda.A_log.data, ours_kda.dt_bias.data = ours_kda.A_log.data.float(), ours_kda.dt_bias.data.float()
    fla_kda = KimiDeltaAttention(hidden_size=HIDDEN, head_dim=HEAD_DIM, num_heads=HEADS, mode="chunk",
                                 use_short_conv=True, conv_size=4, layer_idx=0).to(device, dtype)
    swa_tpa = SwaTpaAttention(swa_tpa_spec, 0)
    randomise_(swa_tpa)
    full_gqa = SoftmaxAttention(layer_specs(teacher)[1], 1)
    randomise_(full_gqa)
    swa_tpa, full_gqa = swa_tpa.to(device, dtype), full_gqa.to(device, dtype)

    rows = []
    for T in args.lengths:
        x = torch.randn(1, T, HIDDEN, device=device, dtype=dtype, requires_grad=True)
        pos = make_positions(yarn, 1, T, device)
        cases = {
            "swa+tpa ours": lambda h: swa_tpa(h, pos),
            "full gqa teacher": lambda h: full_gqa(h, pos),
            "kda ours": lambda h: ours_kda(h, pos),
            "kda fla": lambda h: fla_kda(h)[0],
        }
        if args.only:
            cases = {n: f for n, f in cases.items() if n.startswith("kda") == (args.only == "kda")}
        result = {"T": T}
        for name, fn in cases.items():
            try:
                result[name] = time_fwd_bwd(fn, x)
            except torch.OutOfMemoryError:
                result[name] = (float("nan"), float("nan"))
                torch.cuda.empty_cache()
            print(f"T={T:>6} {name:<17} {result[name][0]:9.2f} ms  {result[name][1]:6.2f} GiB", flush=True)
        rows.append(result)

    print(f"\ndevice: {torch.cuda.get_device_name()}  torch {torch.__version__}  (fwd+bwd, B=1, bf16, median ms | peak GiB)")
    header = f"{'T':>6} | {'KDA ours':>16} | {'KDA fla':>16} | {'ratio':>5} {'≤1.15':>5} | {'SWA+TPA':>16} | {'full GQA':>16} | {'ratio':>5} {'faster':>6}"
    print(header + "\n" + "-" * len(header))
    nan = (float("nan"), float("nan"))
    for r in rows:
        ko, kf, st, fg = (r.get(n, nan) for n in ("kda ours", "kda fla", "swa+tpa ours", "full gqa teacher"))
        kda_ratio, attn_ratio = ko[0] / kf[0], st[0] / fg[0]
        print(f"{r['T']:>6} | {ko[0]:8.2f} {ko[1]:6.1f}G | {kf[0]:8.2f} {kf[1]:6.1f}G | {kda_ratio:5.2f} {str(kda_ratio <= 1.15):>5} | "
              f"{st[0]:8.2f} {st[1]:6.1f}G | {fg[0]:8.2f} {fg[1]:6.1f}G | {attn_ratio:5.2f} {str(attn_ratio < 1):>6}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
