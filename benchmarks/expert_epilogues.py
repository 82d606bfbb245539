"""The grouped experts' elementwise epilogues on one GPU: ``ops.moe.expert_mlp_grouped`` at gpt-oss-20b width (hidden
= intermediate = 2880, 32 experts, 32,768 expert-sorted rows: T = 8192, top-4), bf16, with the torch composition
(``fused=False``: bias gather-add, clamped SwiGLU, routing weight, and their autograd backward with an atomic
index_add for each bias) against the fused Triton kernels of ``ops.moe_kernels`` (``fused=True``), for Megatron's
"stacked" and HF's "interleaved" SwiGLU layout. Both include the same two grouped GEMMs (forward) and four
(backward), so the difference is the epilogues'.

Per row: forward under ``torch.inference_mode`` (the teacher), forward + backward (the student), median ms over
``--iters`` CUDA-event-timed repetitions after warm-up, and the peak memory above the inputs during forward +
backward.

    python benchmarks/expert_epilogues.py [--rows 32768] [--iters 20]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from megatron_student.ops.moe import ExpertActivation, expert_mlp_grouped


def timed(fn, iters: int) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs after three warm-up runs (compilation, allocator)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32768, help="expert-sorted rows (tokens × top-k)")
    parser.add_argument("--hidden", type=int, default=2880)
    parser.add_argument("--intermediate", type=int, default=2880)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    m, h, i, e = args.rows, args.hidden, args.intermediate, args.experts

    counts = torch.multinomial(torch.ones(e, device=device), m, replacement=True, generator=g).bincount(minlength=e)
    group_ends = counts.cumsum(0, dtype=torch.int32)
    row_expert = torch.repeat_interleave(torch.arange(e, device=device), counts, output_size=m)
    rows = torch.randn(m, h, device=device, dtype=dtype, generator=g).requires_grad_(True)
    weights = torch.rand(m, device=device, generator=g).requires_grad_(True)  # Megatron's routing weights: fp32
    params = [(torch.randn(e, h, 2 * i, device=device, generator=g) * 4 / h ** 0.5).to(dtype),
              (torch.randn(e, 2 * i, device=device, generator=g) * 2).to(dtype),
              (torch.randn(e, i, h, device=device, generator=g) / i ** 0.5).to(dtype),
              torch.randn(e, h, device=device, generator=g).to(dtype)]
    params = [p.requires_grad_(True) for p in params]
    grad_out = torch.randn(m, h, device=device, dtype=dtype, generator=g)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: expert_mlp_grouped, {m} rows, hidden {h}, "
          f"intermediate {i}, {e} experts, bf16; median of {args.iters}")
    print("| layout | epilogues | forward (inference) ms | forward + backward ms | speed-up fwd+bwd | "
          "peak memory fwd+bwd GiB |")
    print("|---|---|---:|---:|---:|---:|")
    for layout in ("stacked", "interleaved"):
        activation = ExpertActivation(layout)
        step_ms_of = {}
        for fused in (False, True):
            def forward():
                return expert_mlp_grouped(rows, group_ends, row_expert, weights, *params, activation, fused=fused)

            def inference():
                with torch.inference_mode():
                    forward()

            def step():
                forward().backward(grad_out)
                for t in (rows, weights, *params):
                    t.grad = None

            inference_ms = timed(inference, args.iters)
            step_ms = step_ms_of[fused] = timed(step, args.iters)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            print(f"| {layout} | {'fused (Triton)' if fused else 'torch'} | {inference_ms:.2f} | {step_ms:.2f} | "
                  f"{step_ms_of[False] / step_ms:.2f}× | {peak:.2f} |")


if __name__ == "__main__":
    main()
