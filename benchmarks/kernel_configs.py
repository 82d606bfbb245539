"""Record fla's autotuned launch configurations for the student's KDA kernels on this GPU into
``megatron_student/assets/kernel_configs.json`` (read by ``megatron_student.kernels.use_fixed_configs``).

Runs the student's KDA path (projections → short convs → chunk_kda with the in-kernel gate → gated RMSNorm, forward
and backward, packed documents; then a decoding step through fused_recurrent_kda) at gpt-oss-20b width with full
autotuning and an empty Triton cache, prints how long compilation and autotuning took, and stores the configuration
each kernel chose under this GPU's name. Other GPUs' entries are kept.

    python benchmarks/kernel_configs.py [--seq-len 8192] [--table megatron_student/assets/kernel_configs.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

TABLE = Path(__file__).resolve().parents[1] / "megatron_student" / "assets" / "kernel_configs.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=64, help="KDA heads (gpt-oss-20b: 64 of 64)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--table", type=Path, default=TABLE)
    args = parser.parse_args()
    # Full autotuning from an empty cache, so that every kernel really chooses here.
    os.environ["MEGATRON_STUDENT_AUTOTUNE"] = "full"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")

    import torch

    from megatron_student import kernels
    from megatron_student.ops.kda import causal_short_conv, kda_from_logits
    from megatron_student.ops.norm import gated_rms_norm

    if not torch.cuda.is_available():
        raise SystemExit("kernel_configs.py records GPU kernel choices: it needs a CUDA GPU")
    import fla
    import triton

    H, K, T = args.heads, args.head_dim, args.seq_len
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, device=dev, dtype=dt, generator=gen) * scale).requires_grad_(grad)

    cu_seqlens = torch.tensor([0, T // 3, T // 2, T], device=dev, dtype=torch.int32)
    start = time.perf_counter()
    x = {name: rand(1, T, H * K) for name in "qkv"}
    conv_w = {name: rand(H * K, 4, scale=0.3) for name in "qkv"}
    conv = {name: causal_short_conv(x[name], conv_w[name], cu_seqlens=cu_seqlens)[0] for name in "qkv"}
    f, beta = rand(1, T, H * K), rand(1, T, H)
    A_log = torch.zeros(H, device=dev, requires_grad=True)
    dt_bias = torch.full((H * K,), -4.0, device=dev, requires_grad=True)
    o, _ = kda_from_logits(*(conv[n].reshape(1, T, H, K) for n in "qkv"), f, beta, A_log, dt_bias, cu_seqlens=cu_seqlens)
    out = gated_rms_norm(o, torch.ones(K, device=dev, dtype=dt, requires_grad=True), rand(1, T, H, K))
    out.float().square().mean().backward()
    with torch.no_grad():  # prefill with states, then one decoding step (generation's kernels)
        step = {n: x[n][:, :17].detach() for n in "qkv"}
        conv1 = {n: causal_short_conv(step[n], conv_w[n].detach(), output_final_state=True) for n in "qkv"}
        _, state = kda_from_logits(*(conv1[n][0].reshape(1, 17, H, K) for n in "qkv"), f[:, :17].detach(),
                                   beta[:, :17].detach(), A_log.detach(), dt_bias.detach(), output_final_state=True)
        one = {n: causal_short_conv(x[n][:, 17:18].detach(), conv_w[n].detach(), initial_state=conv1[n][1],
                                    output_final_state=True)[0] for n in "qkv"}
        kda_from_logits(*(one[n].reshape(1, 1, H, K) for n in "qkv"), f[:, 17:18].detach(), beta[:, 17:18].detach(),
                        A_log.detach(), dt_bias.detach(), initial_state=state, output_final_state=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    choices = kernels.record_autotune_choices()
    table = json.loads(args.table.read_text()) if args.table.is_file() else {"format": 1, "devices": {}}
    table["devices"][kernels.gpu_name()] = {
        "fla": fla.__version__, "triton": triton.__version__, "torch": torch.__version__,
        "shape": {"heads": H, "head_dim": K, "seq_len": T}, "kernels": choices}
    args.table.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{kernels.gpu_name()}: compiled and autotuned the KDA path (fwd+bwd, T={T}, {H}×{K}, plus decoding) "
          f"in {seconds:.1f} s; recorded {len(choices)} kernel configurations in {args.table}")


if __name__ == "__main__":
    main()
