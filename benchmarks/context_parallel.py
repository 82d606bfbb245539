"""Context parallelism for stage C on two GPUs: the student at gpt-oss-20b width split over CP = 2 against one GPU,
and a stage-C training run at CP = 2 through ``launch/torchrun.sh``.

1. ``setup``: a random gpt-oss teacher slice at 20b width (hidden 2880, 64/8 heads of 64, the real 201088
   vocabulary, 2 layers — sliding then full attention — and ``--experts`` experts top-4), its student (layer 0
   SWA(128) + TPA, layer 1 KDA), and the bundled conversations packed at the longest ``--lengths``.
2. ``equivalence`` (torchrun, 2 ranks): the student's forward + backward (CE over every position, normalised by the
   token count) on one packed sequence of T tokens whose middle document crosses the CP boundary, for each T, at
   CP = 1 (each GPU runs the whole sequence: one GPU's memory and speed; an OOM is reported, not fatal) and at
   CP = 2 (each GPU runs its half). Reported: loss, gradient norm, peak memory per GPU, tokens/s (whole sequence
   per second; per GPU), and CP = 2 against CP = 1: the loss and gradient norm, the whole gradient (summed over
   the CP ranks) and the logits at 640 positions (the 128 around the boundary and 512 random ones), as relative
   errors. bf16 tolerances from the unit roundoff u = 2^-8: loss 5u, gradient norm and gradient 25u, logits 8u.
3. ``train``: ``configs/stage_c_long_context.yaml`` (online teacher, KL + CE, full recompute, Megatron's
   distributed optimizer) at T = the longest length, CP = 2, ``--steps`` steps, through ``launch/torchrun.sh``:
   losses first → last, skipped steps, median tokens/s and step time, peak memory per GPU.

One table on stdout, everything in ``<output>/context_parallel.json``. ``--tiny``: a CPU run at small width (gloo,
fp32, T = 256 and 512, 3 training steps) that exercises every path.

    NCCL_NVLS_ENABLE=0 python benchmarks/context_parallel.py --output /tmp/cp       # 2 GPUs
    python benchmarks/context_parallel.py --tiny --output /tmp/cp_tiny               # CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from stage_b_slice import make_data, slice_shape  # noqa: E402  (the 20b-width shape; the demo set repeated)

U_BF16 = 2.0 ** -8
TOLERANCES = {"loss": 5 * U_BF16, "grad_norm": 25 * U_BF16, "gradient": 25 * U_BF16, "logits": 8 * U_BF16}
TINY = {"hidden": 64, "experts": 4, "lengths": [256, 512], "steps": 3, "conversations": 60}


def setup(out: Path, tiny: bool, experts: int, seq_len: int, conversations: int) -> dict:
    from megatron_student.student.surgery import init_student
    from megatron_student.teacher.tiny import make_tiny_teacher

    start = time.perf_counter()
    shape = slice_shape(TINY["hidden"] if tiny else 2880)
    make_tiny_teacher(out / "teacher", layers=2, experts=experts, dtype="fp32" if tiny else "bf16", overwrite=True,
                      **shape)
    init_student(out / "teacher", out / "student", force=True)
    made = time.perf_counter()
    make_data(out / "data", conversations, seq_len)
    return {"models_s": made - start, "data_s": time.perf_counter() - made}


# ------------------------------------------------------------------------------------------------------------
# equivalence: runs on every rank under torchrun


def _document_bounds(total: int) -> list[int]:
    """Three documents; the middle one crosses the CP = 2 boundary at total / 2."""
    return [0, total // 3, total // 2 + 77, total]


def _sample_positions(total: int, generator) -> list[int]:
    import torch

    middle = total // 2
    near = range(middle - 64, middle + 64)
    far = torch.randperm(total, generator=generator)[:512].tolist()
    return sorted(set(near) | set(far))


def _measure(model, vocab: int, total: int, cp_rank: int, cp_size: int, iters: int, device) -> dict:
    """Forward + backward of one packed sequence (this CP rank's chunk); the measured values and this rank's
    sampled logits and CP-summed gradients (CPU, fp32)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_student.ops.losses import IGNORE_INDEX, LogitLoss, logit_losses

    g = torch.Generator().manual_seed(total)
    tokens = torch.randint(0, vocab, (total,), generator=g)
    bounds = torch.tensor(_document_bounds(total), dtype=torch.int32)
    labels = torch.cat([tokens[1:], tokens.new_full((1,), IGNORE_INDEX)])
    labels[bounds[1:].long() - 1] = IGNORE_INDEX  # a document's last token predicts nothing
    count = float((labels != IGNORE_INDEX).sum())
    length = total // cp_size
    local = slice(cp_rank * length, (cp_rank + 1) * length)
    positions = [p for p in _sample_positions(total, g) if local.start <= p < local.stop]
    tokens, labels = tokens[local][None].to(device), labels[local].to(device)
    weights = (labels != IGNORE_INDEX).float()
    longest = int(bounds.diff().max())
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds.to(device), cu_seqlens_kv=bounds.to(device),
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    group = parallel_state.get_context_parallel_group()

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(tokens, None, None, packed_seq_params=packed)
        loss = logit_losses(logits[0], None, [LogitLoss("ce")], weights, labels=labels, vocab_size=vocab,
                            chunk_size=4096)[0] / count
        loss.backward()
        return logits, loss

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    logits, loss = step()  # the first pass compiles kernels: measured for its values, not timed
    sampled = logits[0, [p - local.start for p in positions], :vocab].float().cpu()
    del logits
    loss = loss.detach().float()
    dist.all_reduce(loss, group=group)
    grads = []
    for p in model.parameters():
        grad = p.grad.float()
        dist.all_reduce(grad, group=group)
        grads.append(grad.cpu())
    grad_norm = float(torch.stack([gr.double().pow(2).sum() for gr in grads]).sum().sqrt())
    synchronize()
    if device.type == "cuda":  # the peak of the timed passes: the training step's, not the comparison's copies
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize()
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    model.zero_grad(set_to_none=True)
    return {"loss": float(loss), "grad_norm": grad_norm, "seconds": seconds, "tokens_per_s": total / seconds,
            "tokens_per_s_per_gpu": total / seconds / cp_size, "peak_gib": peak,
            "_logits": dict(zip(positions, sampled)), "_grads": grads}


def _compare(reference: dict, split: dict, group) -> dict:
    """CP = 2 against CP = 1 (relative errors); logits summed over the ranks' own sampled positions."""
    import torch
    import torch.distributed as dist

    def rel(a, b):
        return abs(a - b) / max(abs(b), 1e-30)

    diff = torch.zeros(2, dtype=torch.float64)
    for position, row in split["_logits"].items():
        ref = reference["_logits"][position]
        diff += torch.stack([(row - ref).double().pow(2).sum(), ref.double().pow(2).sum()])
    if torch.cuda.is_available():  # NCCL reduces device tensors only
        diff = diff.cuda()
    dist.all_reduce(diff, group=group)
    diff = diff.cpu()
    grad = torch.zeros(2, dtype=torch.float64)
    for a, b in zip(split["_grads"], reference["_grads"]):
        grad += torch.stack([(a - b).double().pow(2).sum(), b.double().pow(2).sum()])
    errors = {"loss": rel(split["loss"], reference["loss"]), "grad_norm": rel(split["grad_norm"], reference["grad_norm"]),
              "gradient": float((grad[0] / grad[1]).sqrt()), "logits": float((diff[0] / diff[1]).sqrt())}
    return {"errors": errors, "ok": all(errors[k] <= TOLERANCES[k] for k in TOLERANCES)}


def equivalence_ranks(out: Path, lengths: list[int], iters: int) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_student.checkpoint import VOCAB_DIVISIBLE_BY, load_model
    from megatron_student.megatron import ParallelConfig, initialize_parallel

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    references, rows = {}, []
    for cp in (1, 2):
        parallel = ParallelConfig(context_parallel=cp, params_dtype=torch.bfloat16 if cuda else torch.float32,
                                  dispatcher="alltoall" if cuda else "allgather",
                                  make_vocab_size_divisible_by=VOCAB_DIVISIBLE_BY)
        initialize_parallel(parallel)
        model, config, _ = load_model(out / "student", "student", parallel)
        model.train()
        cp_rank, group = parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_group()
        for total in lengths:
            row = {"T": total, "cp": cp}
            try:
                measured = _measure(model, config.vocab_size, total, cp_rank, cp, iters, device)
            except torch.cuda.OutOfMemoryError:  # CP = 1 only: every rank runs alone, so every rank gets it
                if cp != 1:
                    raise
                gc.collect()
                torch.cuda.empty_cache()
                rows.append({**row, "oom": True})
                continue
            if cp == 1:
                references[total] = measured
            elif total in references:
                row.update(_compare(references.pop(total), measured, group))
            rows.append({**row, **{k: v for k, v in measured.items() if not k.startswith("_")}})
            del measured
            gc.collect()
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if dist.get_rank() == 0:
        (out / "equivalence.json").write_text(json.dumps(rows, indent=2) + "\n")
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def equivalence(out: Path, lengths: list[int], iters: int, tiny: bool) -> list[dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}
    if tiny:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    command = [*launcher, __file__, "_equivalence_ranks", "--output", str(out), "--iters", str(iters),
               "--lengths", *map(str, lengths)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    (out / "equivalence.log").write_text(result.stdout + result.stderr)
    if result.returncode:
        raise SystemExit(f"equivalence failed (log {out / 'equivalence.log'}):\n{result.stderr[-4000:]}")
    return json.loads((out / "equivalence.json").read_text())


# ------------------------------------------------------------------------------------------------------------
# stage C through the launcher


def train(out: Path, seq_len: int, steps: int, tiny: bool) -> dict:
    run_dir = out / "stage_c"
    overrides = ["student.megatron=null", f"student.hf={out / 'student'}", f"teacher.path={out / 'teacher'}",
                 f"data.path={out / 'data' / 'packed'}", f"data.seq_len={seq_len}", "data.micro_batch=1",
                 "data.global_batch=1", f"steps={steps}", "parallel.tp=1", "parallel.ep=1", "parallel.cp=2",
                 f"parallel.dispatcher={'allgather' if tiny else 'alltoall'}", f"schedule.warmup_steps={min(5, steps)}",
                 "optimizer.lr=1.0e-4", "logging.every=1", "eval.every=0", "checkpoint.every=0",
                 "checkpoint.resume=false"]
    env = {**os.environ, "GPUS": "2", "CONFIG": "configs/stage_c_long_context.yaml", "OUTPUT_DIR": str(run_dir),
           "LOG_DIR": str(out / "launch_logs"), "JOB_NAME": "stage_c_cp2",
           "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}
    if tiny:
        env.update(DEVICE="cpu")
    start = time.perf_counter()
    result = subprocess.run(["bash", "launch/torchrun.sh", *overrides], capture_output=True, text=True, cwd=REPO,
                            env=env)
    seconds = time.perf_counter() - start
    (out / "stage_c.log").write_text(result.stdout + result.stderr)
    if result.returncode:
        raise SystemExit(f"stage C at CP=2 failed after {seconds:.0f} s (log {out / 'stage_c.log'}):\n"
                         f"{(result.stdout + result.stderr)[-4000:]}")
    rows = [r for r in map(json.loads, (run_dir / "logs" / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r]
    steady = [r for r in rows if r["step"] > 3] or rows
    return {"T": seq_len, "cp": 2, "steps": len(rows), "loss_first": rows[0]["train/loss"],
            "loss_last": rows[-1]["train/loss"], "skipped": int(rows[-1]["train/skipped_steps"]),
            "tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in steady),
            "step_s": statistics.median(r["train/step_seconds"] for r in steady),
            "peak_gib": max(r.get("train/peak_memory_gib", 0.0) for r in rows), "seconds": seconds,
            "cp_in_log": "CP 2," in result.stdout + result.stderr}


def report(equivalent: list[dict], stage_c: dict | None) -> bool:
    print(f"\nforward + backward, student slice (SWA+TPA, KDA), one packed sequence; CP=2 vs CP=1 relative errors "
          f"(tolerance: loss {TOLERANCES['loss']:.3f}, grad norm {TOLERANCES['grad_norm']:.3f}, gradient "
          f"{TOLERANCES['gradient']:.3f}, logits {TOLERANCES['logits']:.3f})")
    print(f"{'T':>7}{'CP':>4}{'loss':>9}{'gnorm':>9}{'tok/s':>9}{'tok/s/GPU':>10}{'peak GiB/GPU':>13}"
          f"{'Δloss':>10}{'Δgnorm':>10}{'Δgrad':>10}{'Δlogits':>10}  ok")
    ok = True
    for r in equivalent:
        if r.get("oom"):
            print(f"{r['T']:>7}{r['cp']:>4}  out of memory on one GPU")
            continue
        e = r.get("errors")
        errors = "".join(f"{e[k]:>10.2e}" for k in ("loss", "grad_norm", "gradient", "logits")) if e else " " * 40
        print(f"{r['T']:>7}{r['cp']:>4}{r['loss']:>9.4f}{r['grad_norm']:>9.3f}{r['tokens_per_s']:>9.0f}"
              f"{r['tokens_per_s_per_gpu']:>10.0f}{r['peak_gib']:>13.1f}{errors}  {r.get('ok', '')}")
        ok &= r.get("ok", True)
    for total in sorted({r["T"] for r in equivalent}):
        peaks = {r["cp"]: r.get("peak_gib") for r in equivalent if r["T"] == total}
        if peaks.get(1) and peaks.get(2):
            print(f"T={total}: peak memory per GPU at CP=2 is {peaks[2] / peaks[1]:.2f} × CP=1's")
    if stage_c is not None:
        print(f"\nstage C through launch/torchrun.sh, T={stage_c['T']}, CP=2: {stage_c['steps']} steps, loss "
              f"{stage_c['loss_first']:.4f} → {stage_c['loss_last']:.4f}, {stage_c['skipped']} skipped, "
              f"{stage_c['tokens_per_s']:.0f} tok/s, {stage_c['step_s']:.2f} s/step, peak {stage_c['peak_gib']:.1f} "
              f"GiB/GPU ({stage_c['seconds']:.0f} s in all)")
        ok &= stage_c["skipped"] == 0 and stage_c["cp_in_log"]
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", nargs="?", default="all", choices=("all", "setup", "equivalence", "train",
                                                                     "_equivalence_ranks"))
    parser.add_argument("--output", type=Path, default=Path("/tmp/context_parallel"))
    parser.add_argument("--tiny", action="store_true", help="CPU (gloo, fp32) at small width")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="default 32768 65536 (tiny: 256 512)")
    parser.add_argument("--steps", type=int, default=None, help="stage-C steps (default 20; tiny: 3)")
    parser.add_argument("--experts", type=int, default=None, help="experts top-4 (default 8; tiny: 4)")
    parser.add_argument("--conversations", type=int, default=None,
                        help="demo conversations packed for the training run (default 1500: 4 rows of 64k)")
    parser.add_argument("--iters", type=int, default=2, help="timed forward + backward passes per measurement")
    args = parser.parse_args()
    lengths = args.lengths or (TINY["lengths"] if args.tiny else [32768, 65536])
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    if args.phase == "_equivalence_ranks":
        equivalence_ranks(out, lengths, args.iters)
        return
    steps = args.steps or (TINY["steps"] if args.tiny else 20)
    result = {"lengths": lengths, "steps": steps, "tolerances": TOLERANCES}
    if args.phase in ("all", "setup"):
        result["setup"] = setup(out, args.tiny, args.experts or (TINY["experts"] if args.tiny else 8), max(lengths),
                                args.conversations or (TINY["conversations"] if args.tiny else 1500))
        print(f"setup: models {result['setup']['models_s']:.0f} s, data {result['setup']['data_s']:.0f} s", flush=True)
    if args.phase in ("all", "equivalence"):
        start = time.perf_counter()
        result["equivalence"] = equivalence(out, lengths, args.iters, args.tiny)
        print(f"equivalence: {time.perf_counter() - start:.0f} s", flush=True)
    if args.phase in ("all", "train"):
        result["stage_c"] = train(out, max(lengths), steps, args.tiny)
    ok = report(result.get("equivalence", []), result.get("stage_c"))
    result["ok"] = ok
    (out / "context_parallel.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'PASS' if ok else 'FAIL'}; results in {out / 'context_parallel.json'}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
