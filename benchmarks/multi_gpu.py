"""Stage B on several GPUs through `launch/torchrun.sh`, checked against one GPU, at gpt-oss-20b width.

``setup``: a random gpt-oss teacher at 20b width (hidden 2880, 64/8 heads of 64, 201088 vocabulary, ``--layers``
layers, ``--experts`` experts top-4), its student, the bundled conversations packed at ``--seq-len``, and both
converted to Megatron checkpoints with ``convert-hf-to-megatron`` (peak host RSS and GPU memory of each converter).

``layouts``: the same stage B (``configs/stage_b_full_distill.yaml``, same global batch of 2 sequences, same seed)
launched by ``launch/torchrun.sh`` on one GPU (TP=1, EP=1, two micro-batches accumulated) and on two GPUs with
TP=2 (sequence parallel), EP=2 (alltoall dispatcher; attention data-parallel) and DP=2 (distributed optimizer).
Tolerances derive from bf16's unit roundoff u = 2^-8:
- step 1 (same weights, same data): loss within 5u relative, gradient norm within 25u (it squares and sums every
  gradient), the router's per-expert load within 5u (counts reduced over the data-parallel ranks);
- every step of 20: the loss within 5u of the one-GPU run's;
- the gradient norm after the first updates is judged against a measured noise floor, because Adam's normalised
  update turns rounding differences in small gradients into full-size steps and the trajectories part: the floor is
  the one-GPU run again with both sequences in one micro-batch (``1 GPU mb2``: the same math in another rounding
  order). A layout passes when its largest gradient-norm deviation over the 20 steps is at most twice the floor's
  (or 25u, whichever is larger).

``resume``: TP=2 × EP=2 on two GPUs checkpointing every 10 steps; a second run resumed from step 10 must follow the
uninterrupted run; resuming that checkpoint at TP=1 must be refused with the layout message.

``export`` (after ``resume``): the final TP=2 × EP=2 checkpoint exported to HF must be bit-identical to the export of
the same weights resharded to and saved at TP=1 (``reshard`` below, a separate process); export peak memory reported.

``reshard SRC DST``: load a student checkpoint at TP=1/EP=1 (dist-checkpoint resharding) and save it again.

    python benchmarks/multi_gpu.py setup --output /tmp/mg          # then: layouts, resume, export (same --output)
    python benchmarks/multi_gpu.py layouts --output /tmp/mg --only "1 GPU,TP=2"   # split over calls; then without
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
U_BF16 = 2.0 ** -8
LOSS_TOL, GNORM_TOL, ROUTER_TOL = 5 * U_BF16, 25 * U_BF16, 5 * U_BF16
WIDTH_20B = dict(hidden=2880, heads=64, kv_heads=8, head_dim=64, intermediate=2880, experts_per_token=4)
NOISE_FLOOR = "1 GPU mb2"
LAYOUTS = {"1 GPU": (1, ["parallel.tp=1", "parallel.ep=1"]),
           "TP=2": (2, ["parallel.tp=2", "parallel.ep=1"]),
           "EP=2": (2, ["parallel.tp=1", "parallel.ep=2"]),
           "DP=2": (2, ["parallel.tp=1", "parallel.ep=1", "optimizer.distributed=true"]),
           NOISE_FLOOR: (1, ["parallel.tp=1", "parallel.ep=1", "data.micro_batch=2"])}


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "megatron_student.cli", *map(str, args)]


def measured(args: list[str], log: Path) -> dict:
    """Run a CLI command in a child process that reports its own peak RSS and peak GPU memory. The RSS peak is the
    child's VmHWM: getrusage's ru_maxrss would carry over the high-water mark of the (large) parent it forked from."""
    code = ("import json, re, sys, torch; from pathlib import Path; from megatron_student.cli import main; "
            "rc = main(sys.argv[1:]); "
            "gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0; "
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+) kB', Path('/proc/self/status').read_text()).group(1)); "
            "print('PEAK ' + json.dumps({'rss_gib': hwm / 2**20, 'gpu_gib': gpu})); sys.exit(rc)")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=REPO)
    log.write_text(result.stdout + result.stderr)
    if result.returncode:
        raise SystemExit(f"{' '.join(map(str, args[:2]))} failed (log {log}):\n{result.stderr[-3000:]}")
    peak = json.loads(result.stdout.rsplit("PEAK ", 1)[1].splitlines()[0])
    return {**peak, "seconds": time.perf_counter() - start}


def setup(out: Path, layers: int, experts: int, seq_len: int, hidden: int) -> None:
    from megatron_student.student.surgery import init_student
    from megatron_student.teacher.tiny import make_tiny_teacher

    sys.path.insert(0, str(REPO / "benchmarks"))
    from stage_b_slice import make_data

    shape = {**WIDTH_20B, "hidden": hidden, "intermediate": hidden}
    if hidden != WIDTH_20B["hidden"]:  # a CPU smoke run keeps the head layout proportional
        shape.update(heads=8, kv_heads=2, head_dim=hidden // 8)
    make_tiny_teacher(out / "teacher", layers=layers, experts=experts, dtype="bf16", overwrite=True, **shape)
    init_student(out / "teacher", out / "student_hf", force=True)
    make_data(out / "data", 2000, seq_len)
    sizes = {}
    for role, src in (("teacher", out / "teacher"), ("student", out / "student_hf")):
        peak = measured(["convert-hf-to-megatron", "--hf", src, "--output", out / f"{role}_megatron", "--role", role,
                         "--tp", 2, "--force"], out / f"convert_{role}.log")
        size = sum(f.stat().st_size for f in (out / f"{role}_megatron").rglob("*") if f.is_file()) / 2**30
        sizes[role] = {**peak, "size_gib": size}
        print(f"convert-hf-to-megatron --role {role}: {peak['seconds']:.1f} s, {size:.2f} GiB written, peak RSS "
              f"{peak['rss_gib']:.2f} GiB, peak GPU {peak['gpu_gib']:.2f} GiB", flush=True)
    (out / "setup.json").write_text(json.dumps({"seq_len": seq_len, "convert": sizes}, indent=2))


def train(out: Path, name: str, gpus: int, overrides: list[str], steps: int, expect_failure: bool = False) -> list[dict]:
    """One stage-B run through launch/torchrun.sh; returns its metrics rows (or the log on an expected failure)."""
    seq_len = json.loads((out / "setup.json").read_text())["seq_len"]
    run_dir = out / "runs" / run_name(name)
    dispatcher = "alltoall" if _cuda() else "allgather"
    # HF sources: the trainer pads the vocabulary for its own TP (a Megatron checkpoint keeps the padding of the
    # TP it was converted for), so one pair of directories serves every layout.
    args = [f"teacher.path={out / 'teacher'}", f"data.path={out / 'data' / 'packed'}",
            f"data.seq_len={seq_len}", "data.micro_batch=1", "data.global_batch=2", f"steps={steps}",
            f"parallel.dispatcher={dispatcher}", f"schedule.warmup_steps={min(5, steps)}", "optimizer.lr=1.0e-4", "logging.every=1",
            "eval.every=0", "checkpoint.every=0", *overrides]
    args += ["student.megatron=null", f"student.hf={out / 'student_hf'}"]
    env = {**os.environ, "GPUS": str(gpus), "CONFIG": "configs/stage_b_full_distill.yaml", "OUTPUT_DIR": str(run_dir),
           "LOG_DIR": str(out / "launch_logs"), "JOB_NAME": run_dir.name}
    if _cuda():
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(gpus)))
    start = time.perf_counter()
    result = subprocess.run(["bash", "launch/torchrun.sh", *args], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=1500)
    (out / f"{run_dir.name}.log").write_text(result.stdout + result.stderr)
    seconds = time.perf_counter() - start
    if expect_failure:
        if result.returncode == 0:
            raise SystemExit(f"{name}: expected a refusal, but the run succeeded")
        return [{"log": result.stdout + result.stderr, "seconds": seconds}]
    if result.returncode:
        raise SystemExit(f"{name} failed after {seconds:.0f} s (log {out / f'{run_dir.name}.log'}):\n"
                         f"{(result.stdout + result.stderr)[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    print(f"{name}: {len(rows)} metric rows in {seconds:.0f} s", flush=True)
    rows = [r for r in rows if "train/loss" in r]
    if os.environ.get("OUT"):  # the device tool's result folder: keep each run's metrics as soon as it ends
        Path(os.environ["OUT"], f"metrics_{run_dir.name}.json").write_text(json.dumps(rows))
    return rows


def run_name(name: str) -> str:
    return name.replace(" ", "_").replace("=", "").replace("/", "_")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def router_loads(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k.startswith("router/") and "/expert_" in k}


def deviations(reference: list[dict], other: list[dict], steps: range | None = None) -> dict:
    """Largest relative loss and grad-norm deviations of ``other`` from ``reference`` over ``steps`` (all shared)."""
    ref = {r["step"]: r for r in reference}
    rows = [r for r in other if steps is None or r["step"] in steps]
    assert rows and all(r["step"] in ref for r in rows), "runs cover different steps"
    return {"loss": max(rel(r["train/loss"], ref[r["step"]]["train/loss"]) for r in rows),
            "grad_norm": max(rel(r["train/grad_norm"], ref[r["step"]]["train/grad_norm"]) for r in rows)}


def compare(reference: list[dict], other: list[dict], steps: range | None = None) -> dict:
    """Same-weights comparison: every step within the bf16 tolerances (a resumed run against the uninterrupted one)."""
    diff = deviations(reference, other, steps)
    return {**diff, "ok": diff["loss"] <= LOSS_TOL and diff["grad_norm"] <= GNORM_TOL}


def summary(rows: list[dict], gpus: int) -> dict:
    steady = [r for r in rows if r["step"] > 3] or rows
    tps = statistics.median(r["train/tokens_per_s"] for r in steady)
    return {"tokens_per_s": tps, "tokens_per_s_per_gpu": tps / gpus,
            "step_s": statistics.median(r["train/step_seconds"] for r in steady),
            "peak_gib": max(r.get("train/peak_memory_gib", 0.0) for r in rows),
            "loss_first": rows[0]["train/loss"], "loss_last": rows[-1]["train/loss"]}


def finished_rows(out: Path, name: str, steps: int) -> list[dict] | None:
    """The metrics of an earlier run of this layout that completed ``steps`` steps (a later call reuses them)."""
    metrics = out / "runs" / run_name(name) / "logs" / "metrics.jsonl"
    if not metrics.exists():
        return None
    rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if "train/loss" in r]
    return rows if len(rows) == steps else None


def layouts(out: Path, steps: int, only: list[str] | None) -> None:
    """Run the layouts not yet finished (``only``: just these, and no table); then compare them all."""
    runs, failed = {}, []
    for name, (gpus, overrides) in LAYOUTS.items():
        rows = finished_rows(out, name, steps)
        if rows is None and (only is None or name in only):
            try:
                rows = train(out, name, gpus, overrides, steps)
            except SystemExit as error:  # report the others, then fail
                print(error, flush=True)
                failed.append(name)
        if rows is not None:
            runs[name] = rows
    if only is not None:
        if failed:
            raise SystemExit(f"layouts failed: {failed}")
        return
    missing = [name for name in LAYOUTS if name not in runs]
    if missing:
        raise SystemExit(f"layouts without a finished run: {missing}")
    reference = runs["1 GPU"]
    floor = deviations(reference, runs[NOISE_FLOOR])["grad_norm"]
    gnorm_limit = max(2 * floor, GNORM_TOL)
    print(f"\nstage B, {steps} steps, global batch 2 × {json.loads((out / 'setup.json').read_text())['seq_len']} tokens. "
          f"Step 1: loss ≤ {LOSS_TOL:.4f}, grad norm ≤ {GNORM_TOL:.4f}, router load ≤ {ROUTER_TOL:.4f}; all steps: "
          f"loss ≤ {LOSS_TOL:.4f}, grad norm ≤ {gnorm_limit:.4f} (2 × the {NOISE_FLOOR} floor {floor:.4f}); relative")
    print(f"{'layout':<10}{'step-1 loss Δ':>14}{'gnorm Δ':>10}{'router Δ':>10}{'loss Δ':>10}{'gnorm Δ':>10}"
          f"{'tok/s':>9}{'tok/s/GPU':>10}{'s/step':>8}{'peak GiB':>9}{'loss first→last':>19}")
    results = {}
    for name, rows in runs.items():
        gpus = LAYOUTS[name][0]
        first, every = deviations(reference, rows, range(1, 2)), deviations(reference, rows)
        ref_load, load = router_loads(reference[0]), router_loads(rows[0])
        router = (max((abs(load[k] - v) for k, v in ref_load.items()), default=float("nan"))
                  if load.keys() == ref_load.keys() else float("inf"))
        s = summary(rows, gpus)
        ok = (first["loss"] <= LOSS_TOL and first["grad_norm"] <= GNORM_TOL and router <= ROUTER_TOL
              and every["loss"] <= LOSS_TOL and every["grad_norm"] <= gnorm_limit and len(rows) == steps)
        results[name] = {"step1": first, "all_steps": every, "router": router, **s, "ok": ok}
        failed += [] if ok else [name]
        print(f"{name:<10}{first['loss']:>14.2e}{first['grad_norm']:>10.2e}{router:>10.2e}{every['loss']:>10.2e}"
              f"{every['grad_norm']:>10.2e}{s['tokens_per_s']:>9.0f}{s['tokens_per_s_per_gpu']:>10.0f}"
              f"{s['step_s']:>8.3f}{s['peak_gib']:>9.1f}{s['loss_first']:>10.4f} → {s['loss_last']:.4f}")
    (out / "layouts.json").write_text(json.dumps({"grad_norm_floor": floor, "grad_norm_limit": gnorm_limit,
                                                  "layouts": results}, indent=2))
    if failed:
        raise SystemExit(f"layouts outside tolerance or incomplete: {failed}")


def resume(out: Path, steps: int) -> None:
    both = ["parallel.tp=2", "parallel.ep=2", "checkpoint.every=10"]
    full = train(out, "TP2xEP2", 2, both, steps)
    split_dir = out / "runs" / "TP2xEP2_resumed"
    if split_dir.exists():
        shutil.rmtree(split_dir)
    (split_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "runs" / "TP2xEP2" / "checkpoints" / "iter_0000010", split_dir / "checkpoints" / "iter_0000010",
                    copy_function=os.link)  # hard links: a 20b-width checkpoint with optimizer state is tens of GiB
    (split_dir / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("10\n")
    resumed = train(out, "TP2xEP2 resumed", 2, both, steps)
    diff = compare(full, resumed, range(10, steps))
    print(f"resume at TP=2×EP=2 from step 10: steps 11–{steps} loss Δ {diff['loss']:.2e}, grad norm Δ "
          f"{diff['grad_norm']:.2e} (tolerance {LOSS_TOL:.4f}/{GNORM_TOL:.4f})", flush=True)
    refused = train(out, "TP2xEP2 resumed", 1, ["parallel.tp=1", "parallel.ep=1", f"steps={steps + 5}"], steps + 5,
                    expect_failure=True)[0]["log"]
    message = next((line for line in refused.splitlines() if "resume needs the same layout" in line), None)
    print(f"resume at TP=1 refused: {message.strip()[:300] if message else 'NO LAYOUT MESSAGE'}", flush=True)
    result = {"resume": diff, "refused": message}
    (out / "resume.json").write_text(json.dumps(result, indent=2))
    if not (diff["ok"] and message):
        raise SystemExit(f"resume checks failed: {result}")


def export(out: Path) -> None:
    final = out / "runs" / "TP2xEP2" / "checkpoints"
    peak_a = measured(["convert-megatron-to-hf", "--megatron", final, "--output", out / "export_tp2ep2", "--force"],
                      out / "export_tp2ep2.log")
    code = [sys.executable, str(Path(__file__).resolve()), "reshard", str(final), str(out / "tp1_checkpoint")]
    subprocess.run(code, check=True, cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    peak_b = measured(["convert-megatron-to-hf", "--megatron", out / "tp1_checkpoint", "--output", out / "export_tp1",
                       "--force"], out / "export_tp1.log")
    identical = same_safetensors(out / "export_tp2ep2", out / "export_tp1")
    size = sum(f.stat().st_size for f in (out / "export_tp2ep2").glob("*.safetensors")) / 2**30
    print(f"export from TP=2×EP=2: {peak_a['seconds']:.1f} s, {size:.2f} GiB, peak RSS {peak_a['rss_gib']:.2f} GiB, "
          f"peak GPU {peak_a['gpu_gib']:.2f} GiB; from the TP=1 resave: {peak_b['seconds']:.1f} s; tensors "
          f"bit-identical: {identical}", flush=True)
    result = {"export_identical": identical, "export": peak_a, "export_size_gib": size}
    (out / "export.json").write_text(json.dumps(result, indent=2))
    if not identical:
        raise SystemExit(f"export from TP=2×EP=2 differs from the TP=1 resave: {result}")


def same_safetensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    def tensors(directory):
        out = {}
        for f in sorted(directory.glob("*.safetensors")):
            with safe_open(str(f), "pt") as handle:
                out.update({k: handle.get_tensor(k) for k in handle.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)


def reshard(src: Path, dst: Path) -> None:
    """Load the student checkpoint at TP=1/EP=1 and save it again there (a different process layout than it was
    written with), keeping its metadata record."""
    import torch
    from megatron.core import dist_checkpointing

    from megatron_student.checkpoint import (METADATA_KEY, load_common_state, load_model, resolve_megatron_dir,
                                             single_process_group, verify_torch_dist)
    from megatron_student.megatron import ParallelConfig, initialize_parallel

    directory = resolve_megatron_dir(src)
    rows = verify_torch_dist(directory).state_dict_metadata["embedding.word_embeddings.weight"].size[0]
    with single_process_group():  # the written vocabulary padding (a multiple of 128·TP of the writer) kept
        parallel = ParallelConfig(params_dtype=torch.bfloat16, make_vocab_size_divisible_by=rows)
        initialize_parallel(parallel)
        model, _, _ = load_model(src, "student", parallel)
        record = load_common_state(directory)[METADATA_KEY]
        if dst.exists():
            shutil.rmtree(dst)
        (dst / "release").mkdir(parents=True)
        sharded = model.sharded_state_dict()
        sharded[METADATA_KEY] = record
        dist_checkpointing.save(sharded, str(dst / "release"))
        (dst / "latest_checkpointed_iteration.txt").write_text("release\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("setup", "layouts", "resume", "export", "reshard"))
    parser.add_argument("paths", nargs="*", type=Path, help="reshard: SRC DST")
    parser.add_argument("--output", type=Path, default=Path("/tmp/multi_gpu"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=WIDTH_20B["hidden"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", type=lambda v: v.split(","), default=None,
                        help=f"layouts: run just these (comma-separated of {', '.join(LAYOUTS)}); a later call "
                             "without --only reuses finished runs and prints the comparison")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    if args.phase == "setup":
        setup(args.output, args.layers, args.experts, args.seq_len, args.hidden)
    elif args.phase == "layouts":
        layouts(args.output, args.steps, args.only)
    elif args.phase == "resume":
        resume(args.output, args.steps)
    elif args.phase == "export":
        export(args.output)
    else:
        reshard(*args.paths)
    print(f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
