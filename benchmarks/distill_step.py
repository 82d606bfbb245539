"""One distillation step on one GPU, three ways, one table: the Megatron-Core path with per-expert experts
(``SequentialMLP``), the chunked torch logit losses and Megatron's token dispatcher (the path before issue 18), with
grouped-GEMM experts (``GroupedExperts``), the fused Triton logit losses (``ops.logit_kernels``) and the sync-free
sorted token dispatch (``megatron.dispatch``) and the vectorised main-grad accumulation
(``megatron.grad_accumulation.AccumulatingDDP``): what the trainer runs on CUDA at EP = 1, and an HF-transformers +
fla step as a DistillKit-style user writes it. ``grouped_megatron_dispatch`` is the grouped path with Megatron's
alltoall dispatcher (allgather on the CPU), the dispatch's share of the difference; not run by default:
``grouped_torch_loss`` the grouped path with the torch losses (the fused losses' share) and ``grouped_megatron_ddp``
with Megatron's own DDP (the accumulation's share).

Host synchronisations per step (``host_syncs.HostSyncs``: torch's CUDA sync debug mode, one extra untimed step per
path) are counted next to the time: each one stalls the launch queue until the GPU has caught up.

Shape (issue 18): gpt-oss-20b width (hidden 2880, 64/8 heads of 64, intermediate 2880, 32 experts top-4, 201,088
vocabulary), a 4-layer slice (sliding/full alternating; the student SWA(128)+TPA / KDA), an online teacher of the
same shape, T = 8192, batch 1, bf16, random weights (HF initialisation; the Megatron models load the same weights).

A step is what the trainer does per micro-batch (``train.trainer``): the teacher's forward
(``train.teacher_signal.OnlineTeacher.targets``), the student's forward through Megatron DDP, the stage-B logit
losses of ``configs/stage_b_full_distill.yaml`` (0.8 forward KL + 0.2 CE, ``ops.losses.logit_losses``),
backward and ``finalize_model_grads``. The HF step: transformers' ``GptOssForCausalLM`` teacher under no_grad, our
HF ``StudentForCausalLM`` (fla KDA kernels) forward/backward, dense KL on the full [T, V] logits
(``kl_div(log_softmax(s), softmax(t))``) + CE. The optimizer update is left out of all three (the same elementwise
pass over the parameters in each; ``benchmarks/stage_b_slice.py`` times the whole trainer step).

Model FLOPs per step (MFU = FLOPs / (step time × peak)): student 3 × forward, teacher 1 × forward, where a forward is
2 × active matmul parameters × T (attention/TPA/KDA projections, router, the top-k experts, the output projection;
``train_step.active_matmul_params``) plus the token-mixing FLOPs (``train_step.mixing_flops_forward``: softmax
attention 4·H·D per visible key, KDA chunked). Peak: ``--peak-tflops`` (H100/H200 SXM dense bf16: 989).

    python benchmarks/distill_step.py --output runs/distill_step [--profile] \
        [--paths sequential grouped_megatron_dispatch grouped_torch_loss grouped_megatron_ddp grouped hf]
    python benchmarks/distill_step.py --tiny --output /tmp/distill_step          # CPU smoke run, small width

Prints one table and writes ``<output>/distill_step.json`` (with each path's sync sites); ``--profile`` adds
``<output>/profile_<path>.txt`` per path (torch profiler: top kernels by device time, the same grouped by input
shapes, host-side synchronisations, gaps between kernels).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_student.train.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import WIDTH, active_matmul_params, mixing_flops_forward  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "stage_b_full_distill.yaml"
TINY = dict(hidden_size=64, intermediate_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
            num_local_experts=8, num_experts_per_tok=4, num_hidden_layers=4, sliding_window=16, vocab_size=1024)
PATHS = ("sequential", "grouped_megatron_dispatch", "grouped_torch_loss", "grouped_megatron_ddp", "grouped", "hf")
DEFAULT_PATHS = ("sequential", "grouped_megatron_dispatch", "grouped", "hf")
LABELS = {"sequential": "megatron, SequentialMLP, torch loss (before)",
          "grouped_megatron_dispatch": "megatron, grouped, fused loss, megatron dispatch",
          "grouped_torch_loss": "megatron, grouped experts, torch loss",
          "grouped_megatron_ddp": "megatron, grouped, fused loss, sorted, Megatron DDP add",
          "grouped": "megatron, grouped, fused loss, sorted dispatch", "hf": "HF transformers + fla (DistillKit-style)"}
# path → (experts, logit-loss backend, token dispatcher, DDP); ``auto`` is the trainer's choice (fused losses on CUDA;
# the sorted dispatch at EP = 1); "megatron" is Megatron's alltoall dispatcher (allgather on the CPU: alltoall needs
# CUDA) or Megatron's DDP (its own main_grad add), "accumulating" the trainer's ``AccumulatingDDP``
MEGATRON_PATHS = {"sequential": ("sequential", "torch", "megatron", "megatron"),
                  "grouped_megatron_dispatch": ("grouped", "auto", "megatron", "accumulating"),
                  "grouped_torch_loss": ("grouped", "torch", "auto", "accumulating"),
                  "grouped_megatron_ddp": ("grouped", "auto", "auto", "megatron"),
                  "grouped": ("grouped", "auto", "auto", "accumulating")}
# synchronising host calls the profile counts (each one stalls the launch queue until the GPU catches up)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense",
              "aten::item", "aten::nonzero", "aten::masked_select")


def configs(shape: dict):
    from transformers import GptOssConfig

    from megatron_student.student.config import StudentConfig

    layer_types = ["sliding_attention", "full_attention"] * (shape["num_hidden_layers"] // 2)
    teacher = GptOssConfig(**shape, layer_types=layer_types, attention_bias=True, tie_word_embeddings=False,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return teacher, StudentConfig.from_teacher(teacher)


def hf_models(teacher_config, student_config, device: torch.device):
    """HF teacher and student in bf16 on ``device`` (HF initialisation: the weights every path loads)."""
    from transformers import GptOssForCausalLM

    from megatron_student.student.modeling import StudentForCausalLM

    torch.manual_seed(0)
    with device:  # initialise on the GPU: minutes on the CPU at this size
        teacher = GptOssForCausalLM(teacher_config).to(torch.bfloat16).eval().requires_grad_(False)
        student = StudentForCausalLM(student_config).to(torch.bfloat16)
    for module in student.modules():  # A_log / dt_bias stay fp32 as in a loaded checkpoint
        for name in ("A_log", "dt_bias"):
            if hasattr(module, name):
                getattr(module, name).data = getattr(module, name).data.float()
    return teacher, student


def step_flops(teacher_hf, student_hf, teacher_config, student_config, length: int) -> dict:
    def forward(model, config):
        return 2 * active_matmul_params(model, config) * length + mixing_flops_forward(config, length)

    student, teacher = forward(student_hf, student_config), forward(teacher_hf, teacher_config)
    return {"student_forward": student, "teacher_forward": teacher, "step": 3 * student + teacher}


def megatron_step(experts: str, loss_backend: str, dispatcher: str, ddp_kind: str, teacher_hf, student_hf,
                  length: int, device: torch.device):
    """The trainer's per-micro-batch work on Megatron models holding the HF weights, with ``experts``
    (``ParallelConfig.experts``), the logit losses' ``backend``, the token ``dispatcher`` (``megatron``: Megatron's
    alltoall, allgather on the CPU) and the DDP wrapper (``megatron`` or ``accumulating``); returns the step
    function."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_student.megatron.grad_accumulation import AccumulatingDDP

    from megatron_student.megatron import (ParallelConfig, build_student, build_teacher, initialize_parallel,
                                           load_hf_weights, restore_fp32_parameters)
    from megatron_student.megatron.attention import PackedDocuments
    from megatron_student.ops.losses import logit_losses
    from megatron_student.train.batches import MicroBatch
    from megatron_student.train.teacher_signal import OnlineTeacher

    cuda = device.type == "cuda"
    if dispatcher == "megatron":
        dispatcher = "alltoall" if cuda else "allgather"
    parallel = ParallelConfig(params_dtype=torch.bfloat16, dispatcher=dispatcher, experts=experts)
    initialize_parallel(parallel)
    student = build_student(student_hf.config, parallel)
    teacher = build_teacher(teacher_hf.config, parallel)
    for model, hf in ((student, student_hf), (teacher, teacher_hf)):
        restore_fp32_parameters(model)
        load_hf_weights(model, hf.state_dict())
    online = OnlineTeacher(teacher, teacher_hf.config)
    ddp_class = {"megatron": DistributedDataParallel, "accumulating": AccumulatingDDP}[ddp_kind]
    ddp = ddp_class(student.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cuda), student)
    stage = load_config(CONFIG, [])
    losses, loss_weights = stage.logit_losses(), [item.weight for item in stage.losses.logits]

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, student_hf.config.vocab_size, (1, length + 1), generator=g).to(device)
    # as the trainer's batches: document boundaries also on the host (no layer reads them back from the GPU)
    mb = MicroBatch(tokens[:, :-1], PackedDocuments.of(torch.tensor([0, length]), device), tokens[0, 1:],
                    torch.ones(length, device=device), length, 0, length)
    ddp.train()

    def step():
        ddp.zero_grad_buffer()
        targets = online.targets(mb)
        logits = ddp(mb.tokens, None, None, packed_seq_params=mb.packed)
        # DenseTargets.logit_losses with the backend made explicit; labels checked on the host as in the trainer
        sums = logit_losses(logits[0], targets.logits, losses, mb.weights, labels=mb.targets,
                            vocab_size=student_hf.config.vocab_size, tp_group=None,
                            chunk_size=stage.losses.chunk_size, backend=loss_backend, check_labels=False)
        (sum(w * s for w, s in zip(loss_weights, sums)) / length).backward()
        finalize_model_grads([ddp])

    return step, (ddp, student, teacher, online)


def hf_step(teacher_hf, student_hf, length: int, device: torch.device):
    """A DistillKit-style step: teacher logits under no_grad, student forward with labels (HF CE), dense KL."""
    stage_weights = {item.kind: item.weight for item in load_config(CONFIG, []).losses.logits}
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, student_hf.config.vocab_size, (1, length + 1), generator=g).to(device)
    inputs, labels = tokens[:, :-1], tokens[:, :-1]  # HF shifts the labels itself
    student_hf.train()

    def step():
        student_hf.zero_grad(set_to_none=True)
        with torch.no_grad():
            teacher_logits = teacher_hf(inputs).logits
        out = student_hf(inputs, labels=labels)
        kl = F.kl_div(F.log_softmax(out.logits, dim=-1).flatten(0, 1), F.softmax(teacher_logits, dim=-1).flatten(0, 1),
                      reduction="batchmean")
        (stage_weights["forward_kl"] * kl + stage_weights["ce"] * out.loss).backward()

    return step, ()


def profile(step, path: Path, steps: int = 2) -> dict:
    """Profile ``steps`` steps: the top ops by device (or CPU) time, the same split by input shapes (which matmul,
    which gather), the synchronising host calls, and the gaps between consecutive GPU kernels (time the GPU waits for
    the host). Writes the tables to ``path``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    sort = "device_time_total" if cuda else "self_cpu_time_total"
    lines = [f"torch profiler, {steps} steps; top 40 by {sort}", averages.table(sort_by=sort, row_limit=40),
             f"top 40 by {sort}, split by input shapes",
             prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=40, max_name_column_width=60,
                                                               max_shapes_column_width=120)]
    syncs = {e.key: e.count for e in averages if any(e.key.startswith(name) for name in SYNC_CALLS)}
    lines.append(f"synchronising host calls over {steps} steps: "
                 + (", ".join(f"{k} ×{v}" for k, v in sorted(syncs.items())) or "none"))
    summary = {"sync_calls": syncs}
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    if kernels:
        busy = sum(e.time_range.end - e.time_range.start for e in kernels)
        span = kernels[-1].time_range.end - kernels[0].time_range.start
        gaps = [(b.time_range.start - a.time_range.end, b.name) for a, b in zip(kernels, kernels[1:])]
        idle = sum(max(gap, 0) for gap, _ in gaps)
        summary.update(kernels=len(kernels), span_ms=span / 1e3, kernel_busy_ms=busy / 1e3, gap_ms=idle / 1e3,
                       gaps_over_100us=sum(gap > 100 for gap, _ in gaps))
        lines.append(f"GPU: {len(kernels)} kernels over {span / 1e3:.1f} ms; kernels busy {busy / 1e3:.1f} ms "
                     f"(overlapping streams counted twice), gaps between kernels {idle / 1e3:.1f} ms "
                     f"({summary['gaps_over_100us']} gaps > 100 µs)")
        lines.append("largest gaps (µs, the kernel that ran after):")
        lines += [f"  {gap:10.0f}  {name[:100]}" for gap, name in sorted(gaps, reverse=True)[:15]]
    path.write_text("\n".join(lines) + "\n")
    return summary


def measure(step, warmup: int, iters: int, cuda: bool) -> dict:
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / iters
    else:
        begin = time.perf_counter()
        for _ in range(iters):
            step()
        seconds = (time.perf_counter() - begin) / iters
    return {"step_ms": seconds * 1e3,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def count_host_syncs(step) -> dict:
    """One more, untimed step under torch's CUDA sync debug mode: the host synchronisations and their sites."""
    from megatron_student.host_syncs import HostSyncs

    torch.cuda.synchronize()
    with HostSyncs() as syncs:
        step()
    torch.cuda.synchronize()
    return {"total": syncs.total, "sites": dict(syncs.sites.most_common())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/distill_step"))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(DEFAULT_PATHS))
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU dense bf16 peak (H100/H200: 989)")
    parser.add_argument("--profile", action="store_true", help="write a torch-profiler table per path")
    parser.add_argument("--tiny", action="store_true", help="a small width (CPU smoke run; T defaults to 128)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("distill_step.py at 20b width needs a CUDA GPU; --tiny runs a small width on the CPU")
    length = 128 if args.tiny and args.seq_len == 8192 else args.seq_len
    shape = TINY if args.tiny else WIDTH
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    args.output.mkdir(parents=True, exist_ok=True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    if cuda:
        torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)

    teacher_config, student_config = configs(shape)
    teacher_hf, student_hf = hf_models(teacher_config, student_config, device)
    flops = step_flops(teacher_hf, student_hf, teacher_config, student_config, length)
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{device_name}, torch {torch.__version__}, bf16; {shape['num_hidden_layers']} layers at hidden "
          f"{shape['hidden_size']}, {shape['num_local_experts']} experts top-{shape['num_experts_per_tok']}, vocab "
          f"{shape['vocab_size']}, T={length}, batch 1, online teacher; {flops['step'] / 1e12:.1f} TFLOP per step "
          f"(student 3×{flops['student_forward'] / 1e12:.2f}, teacher {flops['teacher_forward'] / 1e12:.2f}), "
          f"peak {args.peak_tflops:.0f} TFLOP/s", flush=True)
    results = {}
    for path in args.paths:
        allocated_before = torch.cuda.memory_allocated() / 2**30 if cuda else None
        step, held = (hf_step(teacher_hf, student_hf, length, device) if path == "hf"
                      else megatron_step(*MEGATRON_PATHS[path], teacher_hf, student_hf, length, device))
        result = measure(step, args.warmup, args.iters, cuda)
        result["host_syncs"] = count_host_syncs(step) if cuda else None
        # what this path found allocated (the HF weights every path loads from; more means an earlier path leaked)
        result["allocated_before_gib"] = allocated_before
        result["tokens_per_s"] = length / (result["step_ms"] / 1e3)
        result["mfu"] = flops["step"] / (result["step_ms"] / 1e3) / (args.peak_tflops * 1e12)
        if args.profile:
            result["profile"] = profile(step, args.output / f"profile_{path}.txt")
        results[path] = result
        memory = f"{result['peak_memory_gib']:.1f} GiB" if result["peak_memory_gib"] is not None else "n/a"
        syncs = result["host_syncs"]
        print(f"  {path}: {result['step_ms']:.1f} ms, {memory}"
              + (f", {syncs['total']} host syncs per step" if syncs else ""), flush=True)
        for site, count in list(syncs["sites"].items())[:12] if syncs else ():
            print(f"      {count:4d}  {site}", flush=True)
        del step, held  # this path's models and buffers go before the next path is built
        student_hf.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    print(f"\n{'path':<50}{'tokens/s':>10}{'step ms':>10}{'MFU':>8}{'peak GiB':>10}{'syncs':>7}")
    for path, r in results.items():
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        syncs = str(r["host_syncs"]["total"]) if r["host_syncs"] else "n/a"
        print(f"{LABELS[path]:<50}{r['tokens_per_s']:>10.0f}{r['step_ms']:>10.1f}{r['mfu']:>8.1%}{memory:>10}"
              f"{syncs:>7}")
    if "sequential" in results and "grouped" in results:
        print(f"grouped vs sequential: {results['sequential']['step_ms'] / results['grouped']['step_ms']:.2f}×"
              + (f"; grouped vs HF: {results['hf']['step_ms'] / results['grouped']['step_ms']:.2f}×"
                 if "hf" in results else ""))
    if "grouped_megatron_dispatch" in results and "grouped" in results:
        print(f"sorted vs Megatron dispatch: "
              f"{results['grouped_megatron_dispatch']['step_ms'] / results['grouped']['step_ms']:.2f}×")
    summary = {"device": device_name, "torch": torch.__version__, "shape": shape, "seq_len": length,
               "flops": flops, "peak_tflops": args.peak_tflops, "warmup": args.warmup, "iters": args.iters,
               "results": results}
    (args.output / "distill_step.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written: {args.output / 'distill_step.json'}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
