"""One distillation stage on Megatron-Core: the loop. Its components: ``batches`` (this DP rank's micro-batches),
``teacher_signal`` (what the losses need from the teacher), ``checkpointer`` (save and resume), ``optim`` (LR
schedule, freezing, the optimizer) and ``metrics`` (router statistics, the metrics sink).

Per optimiser step:
1. read this data-parallel rank's micro-batches (``global_batch / (micro_batch · DP)`` of them; with context
   parallelism this CP rank's contiguous chunk of each, ``batches``) and the global loss normaliser over all
   micro-batches and DP × CP ranks (ops.losses.global_normaliser; Megatron DDP averages gradients over the
   data-parallel group with context parallel, DP × CP);
2. per micro-batch: the teacher's targets (an online teacher's forward under no_grad), the student's forward
   through Megatron DDP, the logit losses on the vocab-parallel logits (TP group), optional hidden-state and
   teacher-forced attention alignment, backward;
3. ``finalize_model_grads`` (DP × CP and sequence-parallel reductions), the global gradient norm (TP duplicates
   counted once, experts over EP), NaN/Inf guard, clipping, LR schedule, AdamW step.

Context parallelism (``parallel.cp``): student and online teacher share the layout (``ops.context_parallel``:
contiguous chunks; the teacher's full-attention layers all-gather keys and values, exact); losses, token counts
and evaluation sums are reduced over DP × CP.

Optimizer (``optim.py``): on GPU Megatron-Core's (``get_megatron_optimizer``; a bf16 student with fp32 main
weights, the distributed optimizer by default), on CPU torch AdamW on DDP's fp32 ``main_grad`` buffers (fp32
student). The teacher runs in bf16 on GPU (``teacher.dtype``). ``recompute.granularity: full`` turns on
Megatron's activation recompute of whole student layers. Checkpoints: see ``checkpointer``; on resume,
metrics.jsonl and TensorBoard drop what was logged after the checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads

from ..checkpoint import VOCAB_DIVISIBLE_BY, CheckpointLayout, CheckpointRecord, load_model, single_process_group
from ..dtypes import DTYPES
from ..host_syncs import to_device_async
from ..kernels import first_step_notice
from ..megatron import ParallelConfig, initialize_parallel
from ..megatron.grad_accumulation import AccumulatingDDP
from ..ops.losses import (
    LogitLoss,
    NonFiniteLossError,
    attention_alignment_loss,
    check_finite,
    global_normaliser,
    hidden_state_loss,
)
from .activations import Capture, with_bias
from .batches import ContextChunk, MicroBatch, eval_micro_batches, train_stream
from .checkpointer import Checkpointer
from .config import ConfigError, TrainConfig
from .graceful_stop import GracefulStop
from .metrics import MetricsSink, RouterStats
from .optim import MegatronAdam, TorchAdamW, active_parameters, apply_freeze, learning_rate, optimizer_implementation
from .teacher_signal import teacher_signals


class TrainingStopped(RuntimeError):
    """The run stopped early (too many consecutive non-finite steps); a checkpoint was written first."""


@contextlib.contextmanager
def distributed_context():
    """torch.distributed from the launcher's environment (RANK/WORLD_SIZE/MASTER_ADDR: torchrun or Slurm) with
    NCCL on GPU and gloo on CPU; a one-process group of the same backend when there is no launcher; an existing
    group as is."""
    if dist.is_initialized():
        yield
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        with single_process_group("nccl" if torch.cuda.is_available() else "gloo"):
            yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@dataclass
class StepRecord:
    step: int
    loss: float
    components: dict[str, float]
    grad_norm: float
    skipped: bool
    lr: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


class StepClock:
    """Wall time of one step from its start: CUDA events on GPU (the step's queued work included), the host clock
    on CPU."""

    def __init__(self, device: torch.device):
        self.events = None
        if device.type == "cuda":
            self.events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.events[0].record()
        self.start = time.perf_counter()

    def seconds(self) -> float:
        if self.events is None:
            return time.perf_counter() - self.start
        start, end = self.events
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


class Trainer:
    """Builds everything for ``config`` inside an initialised torch.distributed (see :func:`train`)."""

    def __init__(self, config: TrainConfig):
        self.config = cfg = config
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self._seed_everything(cfg.seed)
        self.optimizer_implementation = optimizer_implementation(cfg)
        self.student_dtype = DTYPES.get(
            cfg.student.dtype, torch.bfloat16 if self.optimizer_implementation == "megatron" else torch.float32)
        r = cfg.recompute
        student_parallel = ParallelConfig(tensor_parallel=cfg.parallel.tp, expert_parallel=cfg.parallel.ep,
                                          context_parallel=cfg.parallel.cp,
                                          dispatcher=cfg.parallel.dispatcher, experts=cfg.parallel.experts,
                                          attention_backend=cfg.parallel.attention_backend,
                                          make_vocab_size_divisible_by=VOCAB_DIVISIBLE_BY,
                                          params_dtype=self.student_dtype,
                                          recompute=None if r.granularity == "none" else r.granularity,
                                          recompute_method=r.method, recompute_num_layers=r.num_layers)
        initialize_parallel(student_parallel, seed=cfg.seed)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        # CP ranks share their DP rank's samples (a chunk each): token sums go over DP × CP, as DDP's gradients
        self.dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.chunk = ContextChunk(parallel_state.get_context_parallel_rank(),
                                  parallel_state.get_context_parallel_world_size())
        # The data and a resume's layout are checked before any model is built.
        self.stream, self.accumulation = train_stream(cfg, self.dp_rank, self.dp_size, self.device, self.chunk)
        self.layout = {"world": self.world, "tp": self.tp_size, "cp": self.chunk.size, "ep": cfg.parallel.ep,
                       "optimizer": self.optimizer_implementation,
                       "distributed_optimizer": self.optimizer_implementation == "megatron"
                       and cfg.optimizer.distributed}
        self.checkpointer = Checkpointer(cfg, self.rank, self.layout)
        self.resume_dir = self.checkpointer.resume_directory()
        if self.resume_dir is not None:
            self.checkpointer.check_layout(self.resume_dir)

        student_source = self.resume_dir or cfg.student.megatron or cfg.student.hf
        self.student, self.student_config, self.student_config_dict = load_model(student_source, "student",
                                                                                 student_parallel)
        self.vocab_size = self.student_config.vocab_size
        self.stream.vocab_size = self.vocab_size  # labels checked on the host as batches are built
        self.teachers = teacher_signals(cfg, student_parallel, self.vocab_size, self.device)
        for plan in self.teachers:
            plan.signal.check_student(self.student_config)
        # hidden-state and attention alignment read the online teacher's activations (the config requires one)
        self.online = next((plan.signal for plan in self.teachers if plan.signal.num_layers), None)

        self.frozen = apply_freeze(self.student, cfg)
        self.ddp = AccumulatingDDP(
            self.student.config, DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                use_distributed_optimizer=self.optimizer_implementation == "megatron" and cfg.optimizer.distributed),
            self.student)
        self.optimizer = (MegatronAdam(self.ddp, self.student, cfg, self.student_dtype)
                          if self.optimizer_implementation == "megatron" else TorchAdamW(self.student, cfg))

        self.hidden_pairs = self._hidden_pairs()
        self.attn_layers = self._attention_layers()
        self.student_capture = Capture()
        self.student_capture.layers(self.student, sorted({s for s, _ in self.hidden_pairs}))
        if self.online is not None:
            self.online.capture(sorted({t for _, t in self.hidden_pairs}), self.attn_layers)
        self.router_stats = RouterStats(self.student, cfg.logging.router_min_entropy)
        self.flops_per_token = 6 * active_parameters(self.student) + sum(p.signal.flops_per_token
                                                                         for p in self.teachers)

        self.step = 0
        self.tokens_seen = 0
        self.consecutive_bad = 0
        self.skipped_total = 0
        if self.resume_dir is not None:
            self.checkpointer.load(self.resume_dir, self)
        self.sink = MetricsSink(cfg.logging.dir, enabled=self.rank == 0, tensorboard=cfg.logging.tensorboard,
                                wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
                                run_name=cfg.stage, config=cfg.resolved(),
                                resume_step=self.step if self.resume_dir is not None else None)

    # ---- setup helpers

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _hidden_pairs(self) -> list[tuple[int, int]]:
        h = self.config.losses.hidden
        if h.weight == 0:
            return []
        n_s, n_t = len(self.student.decoder.layers), self.online.num_layers
        pairs = [(i, i) for i in range(min(n_s, n_t))] if h.layer_map == "all" else [tuple(p) for p in h.layer_map]
        for i, (a, b) in enumerate(pairs):
            if a >= n_s or b >= n_t:
                raise ConfigError(f"{self.config.source}: losses.hidden.layer_map[{i}]: [{a}, {b}] is outside the "
                                  f"student's {n_s} / teacher's {n_t} layers")
        return pairs

    def _attention_layers(self) -> list[int]:
        a = self.config.losses.attention
        if a.weight == 0:
            return []
        n = len(self.student.decoder.layers)
        layers = list(range(n)) if a.layers == "all" else list(a.layers)
        for i in layers:
            if i >= n:
                raise ConfigError(f"{self.config.source}: losses.attention.layers: {i} is outside the student's "
                                  f"{n} layers")
        return layers

    # ---- one step

    def _local_tokens(self, per_token: torch.Tensor) -> torch.Tensor:
        """This rank's sequence-parallel slice [N/TP, 1] of a per-token tensor [N] (activations are [s, b, h])."""
        if self.student.config.sequence_parallel:
            per_token = per_token.chunk(self.tp_size)[self.tp_rank]
        return per_token.unsqueeze(-1)

    def _micro_losses(self, mb: MicroBatch, normaliser: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the loss to backpropagate on this rank, the full normalised components for logging)."""
        self.student_capture.clear()
        targets = [plan.signal.targets(mb) for plan in self.teachers]
        student_logits = self.ddp(mb.tokens, None, None, packed_seq_params=mb.packed)
        loss, parts = 0.0, {}
        for plan, teacher in zip(self.teachers, targets):
            sums = teacher.logit_losses(student_logits[0], plan.losses, mb.weights, labels=mb.targets,
                                        vocab_size=self.vocab_size, tp_group=self.tp_group,
                                        chunk_size=self.config.losses.chunk_size,
                                        check_labels=False)  # checked as the stream built the batch
            loss = loss + sum(w * s for w, s in zip(plan.weights, sums)) / normaliser
            parts.update({name: (s / normaliser).detach() for name, s in zip(plan.names(), sums)})
        teacher = next((t for plan, t in zip(self.teachers, targets) if plan.signal is self.online), None)
        local_weights = self._local_tokens(mb.weights)
        locals_: dict[str, torch.Tensor] = {}
        if self.hidden_pairs:
            pairs = [(self.student_capture.outputs[s], teacher.layer_outputs[t]) for s, t in self.hidden_pairs]
            locals_["hidden"] = hidden_state_loss(pairs, local_weights, self.config.losses.hidden.kind)
        if self.attn_layers:
            total = 0.0
            for i in self.attn_layers:
                attention = self.student.decoder.layers[i].self_attention
                total = total + attention_alignment_loss(
                    lambda x, attention=attention: with_bias(attention(x, attention_mask=None,
                                                                       packed_seq_params=mb.packed)),
                    teacher.attention_inputs[i], teacher.attention_outputs[i], local_weights,
                    self.config.losses.attention.kind)
            locals_["attention"] = total / len(self.attn_layers)
        weights = {"hidden": self.config.losses.hidden.weight, "attention": self.config.losses.attention.weight}
        for name, value in locals_.items():
            loss = loss + weights[name] * value / normaliser
            full = value.detach().clone()
            if self.student.config.sequence_parallel:
                dist.all_reduce(full, group=self.tp_group)
            parts[name] = full / normaliser
        return loss, parts

    def train_step(self) -> StepRecord:
        """One optimiser step. Loss components and NaN checks stay on the device until the gradient norm, the
        loop's one host synchronisation before the update (clipping and the skip decision need it on the host);
        what the record needs is read right after it in one read, while the GPU is idle, and the optimizer update
        is queued last. The step time spans CUDA events on GPU (host clock on CPU)."""
        cfg = self.config
        clock = StepClock(self.device)
        batches = [self.stream.next_micro_batch() for _ in range(self.accumulation)]
        normaliser = global_normaliser([mb.weights for mb in batches], mode=cfg.losses.normaliser,
                                       group=self.dp_cp_group, dp_grad_average=True)
        self.ddp.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        totals: dict[str, torch.Tensor] = {}
        checks: list[dict[str, torch.Tensor]] = []
        for mb in batches:
            loss, parts = self._micro_losses(mb, normaliser)
            checks.append({**parts, "total": loss.detach()})
            loss.backward()
            for name, value in parts.items():
                totals[name] = totals.get(name, 0.0) + value
        finalize_model_grads([self.ddp])
        grad_norm = self.optimizer.grad_norm()
        # After the gradient norm the GPU has caught up: one more read brings everything else the step needs to
        # the host. The non-finite flag is the maximum over every rank; token counts and loss components are summed
        # over DP × CP (each rank's components are its share of the step's loss: the normaliser counts every
        # DP × CP rank's tokens and is divided by DP × CP for DDP's gradient average, so their mean is the loss).
        values = [v.detach().reshape(()).double() for parts in checks for v in parts.values()]
        flag = (~torch.isfinite(torch.stack(values)).all()).double().reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        names = sorted(totals)
        counts = to_device_async(torch.tensor([float(sum(mb.num_tokens for mb in batches)),
                                               float(sum(mb.analysis_tokens for mb in batches)),
                                               float(sum(mb.final_tokens for mb in batches))], dtype=torch.float64),
                                 self.device)
        sums = torch.cat([counts, torch.stack([totals[n].detach().double().reshape(()) for n in names])])
        if self.dp_cp_group.size() > 1:
            dist.all_reduce(sums, group=self.dp_cp_group)
        read = torch.cat([flag, sums]).tolist()
        skipped = read[0] > 0 or not math.isfinite(grad_norm)
        if read[0] > 0:  # name the non-finite components this rank saw (host reads, on this rare path only)
            for parts in checks:
                try:
                    check_finite(parts, self.step)
                except NonFiniteLossError as e:
                    if self.rank == 0 or self.dp_size * self.chunk.size > 1:
                        print(f"[rank {self.rank}] step {self.step}: {e}", flush=True)
        tokens = read[1:4]
        components = {name: value / self.dp_cp_group.size() for name, value in zip(names, read[4:])}
        lr = learning_rate(cfg, self.step)
        if skipped:
            self.consecutive_bad += 1
            self.skipped_total += 1
        else:
            self.consecutive_bad = 0
            self.optimizer.step(lr, grad_norm)
        self._prefetch_teachers()  # the next step's teacher rows are read while the GPU finishes this one
        self.tokens_seen += int(tokens[0])
        elapsed = clock.seconds()
        total = sum(w * components[name] for plan in self.teachers for name, w in zip(plan.names(), plan.weights))
        total += sum(getattr(cfg.losses, k).weight * components[k] for k in ("hidden", "attention") if k in components)
        extra = {"tokens_per_s": float(tokens[0]) / elapsed, "step_seconds": elapsed,
                 "analysis_tokens": float(tokens[1]), "final_tokens": float(tokens[2])}
        if torch.cuda.is_available():
            extra["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if cfg.logging.peak_tflops:
            extra["mfu"] = self.flops_per_token * extra["tokens_per_s"] / (self.world * cfg.logging.peak_tflops * 1e12)
        record = StepRecord(self.step, total, components, grad_norm, skipped, lr, extra)
        self.step += 1
        return record

    def _prefetch_teachers(self) -> None:
        upcoming = self.stream.upcoming_samples(self.accumulation)
        for plan in self.teachers:
            plan.signal.prefetch(self.stream.dataset.directory.name, upcoming)

    # ---- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Forward KL (T = 1) against each teacher (an offline one: on its stored partition) and CE per weighted
        token over the first ``eval.batches`` micro-batches of the valid split (this DP rank's share, this CP rank's
        chunks), summed over DP × CP."""
        cfg = self.config
        sums = torch.zeros(len(self.teachers) + 2, dtype=torch.float64, device=self.device)  # KLs, CE, tokens
        self.ddp.eval()
        self.router_stats.enabled = False
        try:
            for mb in eval_micro_batches(cfg, self.dp_rank, self.dp_size, self.device, self.chunk):
                s = self.ddp(mb.tokens, None, None, packed_seq_params=mb.packed)
                for i, plan in enumerate(self.teachers):
                    specs = [LogitLoss("forward_kl")] + ([LogitLoss("ce")] if i == 0 else [])
                    values = plan.signal.targets(mb).logit_losses(
                        s[0], specs, mb.weights, labels=mb.targets, vocab_size=self.vocab_size,
                        tp_group=self.tp_group, chunk_size=cfg.losses.chunk_size).double()
                    sums[i] += values[0]
                    if i == 0:
                        sums[-2] += values[1]
                sums[-1] += (mb.weights != 0).sum()
        finally:
            self.router_stats.enabled = True
            self.ddp.train()
        dist.all_reduce(sums, group=self.dp_cp_group)
        if sums[-1] == 0:
            return {}
        ce = float(sums[-2] / sums[-1])
        out = {f"eval/{plan.prefix}forward_kl": float(sums[i] / sums[-1]) for i, plan in enumerate(self.teachers)}
        return {**out, "eval/ce": ce, "eval/perplexity": math.exp(min(ce, 50.0))}

    # ---- checkpoints

    def state_dict(self) -> dict:
        """This rank's trainer state (the checkpointer adds the RNG states and the layout)."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "consecutive_bad": self.consecutive_bad,
                "skipped_total": self.skipped_total, "optimizer": self.optimizer.state_dict(),
                "sampler": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.consecutive_bad, self.skipped_total = state["consecutive_bad"], state["skipped_total"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["sampler"])

    def save_checkpoint(self) -> Path:
        cfg = self.config
        record = CheckpointRecord(
            role="student", hf_config=self.student_config_dict, source=str(cfg.student.megatron or cfg.student.hf),
            stage=cfg.stage, tokens_seen=self.tokens_seen, step=self.step,
            dtype=next(k for k, v in DTYPES.items() if v == self.student_dtype),
            layout=CheckpointLayout(written_tp=self.tp_size, written_ep=cfg.parallel.ep, target_tp=self.tp_size,
                                    target_ep=cfg.parallel.ep, written_cp=self.chunk.size))
        return self.checkpointer.save(self.step, self.student, record, self)

    # ---- the loop

    def fit(self, stop: GracefulStop | None = None) -> list[StepRecord]:
        """Train to ``steps``; with ``stop``, a requested stop (checked after every step) writes a checkpoint and
        raises graceful_stop.TrainingInterrupted."""
        cfg = self.config
        history: list[StepRecord] = []
        if self.step >= cfg.steps:
            self.sink.console(f"[{cfg.stage}] already at step {self.step} of {cfg.steps}; nothing to do")
            return history
        self.sink.console(f"[{cfg.stage}] steps {self.step}→{cfg.steps}, world {self.world} (TP {self.tp_size}, "
                          f"CP {self.chunk.size}, EP {cfg.parallel.ep}, DP {self.dp_size}), {self.accumulation} "
                          "micro-batch(es) per step, "
                          f"{len(self.frozen)} frozen parameter tensors"
                          + (f", resumed from {self.resume_dir}" if self.resume_dir else ""))
        try:
            while self.step < cfg.steps:
                with first_step_notice(self.sink.console, f"[{cfg.stage}] step {self.step + 1}") if not history \
                        else contextlib.nullcontext():
                    record = self.train_step()
                history.append(record)
                if self.consecutive_bad > cfg.nan_guard.max_consecutive:
                    path = self.save_checkpoint()
                    raise TrainingStopped(f"[{cfg.stage}] {self.consecutive_bad} consecutive non-finite steps (limit "
                                          f"{cfg.nan_guard.max_consecutive}) at step {record.step}; checkpoint {path}")
                if self.step % cfg.logging.every == 0 or self.step == cfg.steps:
                    self._log(record)
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    scalars = self.evaluate()
                    self.sink.log(self.step, scalars)
                    if scalars:
                        self.sink.console(f"[{cfg.stage}] eval step {self.step}: " + ", ".join(
                            f"{k.split('/')[1]} {v:.4f}" for k, v in scalars.items()))
                if stop is not None and self.step < cfg.steps and (reason := stop.requested(self.device)):
                    raise stop.interrupt(reason, self)
                if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or self.step == cfg.steps:
                    self.save_checkpoint()
                if cfg.eval.suite and (self.step % cfg.eval.suite_every == 0 or self.step == cfg.steps):
                    self._run_suite()
        finally:
            self.sink.close()
        return history

    def close(self) -> None:
        """Release the hooks (and the teacher signal's resources) the trainer holds."""
        self.student_capture.remove()
        self.router_stats.remove()
        for plan in self.teachers:
            plan.signal.close()

    def _run_suite(self) -> None:
        """The evaluation suite on the checkpoint just written (rank 0; the other ranks wait at the barrier)."""
        if self.rank == 0:
            from ..evaluate.runner import training_suite

            scalars, failed = training_suite(self.config, self.step, self.device)
            self.sink.log(self.step, scalars)
            for gate in failed:
                self.sink.console(f"[{self.config.stage}] WARNING eval suite gate failed at step {self.step}: "
                                  f"{gate['metric']}: {gate['reason']}")
        dist.barrier()

    def _log(self, record: StepRecord) -> None:
        cfg = self.config
        router, collapsing = self.router_stats.report()
        scalars = {"train/loss": record.loss, "train/grad_norm": record.grad_norm, "train/lr": record.lr,
                   "train/skipped_steps": float(self.skipped_total), "train/tokens_seen": float(self.tokens_seen),
                   **{f"train/{k}": v for k, v in record.components.items()},
                   **{f"train/{k}": v for k, v in record.extra.items()}, **router}
        self.sink.log(record.step + 1, scalars)
        parts = " ".join(f"{k} {v:.4f}" for k, v in record.components.items())
        self.sink.console(
            f"[{cfg.stage}] step {record.step + 1}/{cfg.steps} loss {record.loss:.4f} ({parts}) gnorm "
            f"{record.grad_norm:.3f} lr {record.lr:.2e} {record.extra['tokens_per_s']:.0f} tok/s"
            + (" SKIPPED (non-finite)" if record.skipped else ""))
        if collapsing:
            self.sink.console(f"[{cfg.stage}] WARNING routing collapse: normalised entropy below "
                              f"{cfg.logging.router_min_entropy} in {', '.join(collapsing)}")


def train(config: TrainConfig, stop: GracefulStop | None = None) -> list[StepRecord]:
    """Run one stage (initialising torch.distributed from the environment when needed); returns this process's
    step records. ``stop``: see :meth:`Trainer.fit`."""
    with distributed_context():
        trainer = Trainer(config)
        try:
            return trainer.fit(stop)
        finally:
            trainer.close()
