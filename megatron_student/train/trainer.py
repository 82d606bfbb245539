"""One distillation stage on Megatron-Core: student and online teacher co-located on the same ranks and TP/EP.

Per optimiser step:
1. read this data-parallel rank's micro-batches (``global_batch / (micro_batch · DP)`` of them); each micro-batch
   of B packed rows is flattened to one THD stream [1, B·S] with its document boundaries (positions and
   attention restart per conversation);
2. shift labels and channel masks so that row t is scored against token t + 1 (the last token of each document
   predicts nothing), build per-token weights (ops.losses.token_weights) and the global normaliser over all
   micro-batches and DP ranks (ops.losses.global_normaliser; Megatron DDP averages gradients over DP);
3. per micro-batch: teacher forward under no_grad, student forward through Megatron DDP, the logit losses on the
   vocab-parallel logits (TP group), optional hidden-state and teacher-forced attention alignment, backward;
4. ``finalize_model_grads`` (DP and sequence-parallel reductions), the global gradient norm (TP duplicates counted
   once, experts over EP), NaN/Inf guard, clipping, LR schedule, AdamW step.

Optimizer (``optim.py``): on GPU Megatron-Core's (``get_megatron_optimizer``; a bf16 student with fp32 main
weights, the distributed optimizer by default), on CPU torch AdamW on DDP's fp32 ``main_grad`` buffers (fp32
student). The teacher runs in bf16 on GPU (``teacher.dtype``). ``recompute.granularity: full`` turns on
Megatron's activation recompute of whole student layers.

Checkpoints (``checkpoint.dir``, Megatron-LM layout ``iter_NNNNNNN/`` + ``latest_checkpointed_iteration.txt``):
the model as torch_dist (reshardable; carries the converters' metadata record, so ``convert-megatron-to-hf``
exports it and a next stage starts from it with ``student.megatron``), ``trainer/rank_NNNNN.pt`` per rank
(step, sampler position, RNG states, guard counters, optimizer state; resume needs the same world size, TP, EP
and optimizer implementation; plain values and tensors only, loaded with ``weights_only=True``) and
``config.yaml`` (the resolved config). Written in this process (no writer processes to outlive a killed run) to
``.tmp-iter_…`` and renamed; the tracker is replaced atomically. Every file of a checkpoint is checked before
anything in it is unpickled (``convert.common.verify_torch_dist``). On resume, metrics.jsonl and TensorBoard drop
what was logged after the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import transformers
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.packed_seq_params import PackedSeqParams

from ..convert.common import (
    FORMAT_VERSION,
    METADATA_KEY,
    TRACKER_NAME,
    load_common_state,
    resolve_megatron_dir,
    safe_torch_load,
    single_process_group,
    verify_torch_dist,
)
from ..convert.hf_to_megatron import LazyState, open_hf_checkpoint
from ..convert.streaming_save import InProcessSaveStrategy
from ..data.storage import HarmonyPackedDataset, ResumableSampler, collate_packed
from ..kernels import first_step_notice
from ..megatron import ParallelConfig, build_student, build_teacher, initialize_parallel, load_hf_weights
from ..megatron import restore_fp32_parameters
from ..ops.losses import (
    IGNORE_INDEX,
    LogitLoss,
    NonFiniteLossError,
    attention_alignment_loss,
    check_finite,
    global_normaliser,
    hidden_state_loss,
    logit_losses,
    token_weights,
)
from ..student.config import StudentConfig
from .config import ConfigError, TrainConfig, dump_config
from .graceful_stop import GracefulStop
from .metrics import MetricsSink, RouterStats
from .optim import MegatronAdam, TorchAdamW, apply_freeze, is_expert_parameter, learning_rate, optimizer_implementation

VOCAB_DIVISIBLE_BY = 128
LAYOUT_FILE = "layout.json"  # in a checkpoint's trainer/: the layout a resume must match
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class TrainingStopped(RuntimeError):
    """The run stopped early (too many consecutive non-finite steps); a checkpoint was written first."""


# --------------------------------------------------------------------------------------------------------------
# Process groups and models


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


def _is_megatron_checkpoint(path: Path) -> bool:
    return (path / "metadata.json").is_file() or (path / TRACKER_NAME).is_file()


def load_model(path: str | Path, role: str, parallel: ParallelConfig):
    """(model, HF config, HF config dict) of ``role`` ("student"/"teacher") for this rank, from an HF directory or
    a Megatron torch_dist checkpoint carrying the converters' metadata record."""
    path = Path(path)
    build = build_student if role == "student" else build_teacher
    if _is_megatron_checkpoint(path):
        directory = resolve_megatron_dir(path)
        verify_torch_dist(directory)  # before Megatron unpickles anything in it
        meta = load_common_state(directory).get(METADATA_KEY)
        if meta is None:
            raise ValueError(f"{directory}/common.pt: no '{METADATA_KEY}' record; convert the checkpoint with "
                             "megatron-student convert-hf-to-megatron")
        if meta.get("role") != role:
            raise ValueError(f"{directory}: a {meta.get('role')!r} checkpoint where a {role} is expected")
        config_dict = meta["hf_config"]
        if role == "student":
            config = StudentConfig.from_dict(config_dict)
        else:
            config = transformers.GptOssConfig.from_dict(
                {k: v for k, v in config_dict.items() if k != "quantization_config"})
        model = build(config, parallel)
        restore_fp32_parameters(model)
        state = dist_checkpointing.load(model.sharded_state_dict(), str(directory))
        state.pop(METADATA_KEY, None)  # the common state comes back with the tensors
        model.load_state_dict(state)
    elif (path / "config.json").is_file():
        reader, config, config_dict = open_hf_checkpoint(path, role)
        model = build(config, parallel)
        restore_fp32_parameters(model)
        load_hf_weights(model, LazyState(reader))
    else:
        raise FileNotFoundError(f"{path}: neither an HF checkpoint (config.json) nor a Megatron checkpoint "
                                f"(metadata.json or {TRACKER_NAME})")
    return model, config, config_dict


# --------------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [1, N] (N = B·S)
    packed: PackedSeqParams
    targets: torch.Tensor  # [N] next-token labels (−100: not trained)
    weights: torch.Tensor  # [N] float32 loss weights
    num_tokens: int  # real (unpadded) tokens
    analysis_tokens: int
    final_tokens: int


def make_micro_batch(items: list[dict], channels, device: torch.device) -> MicroBatch:
    batch = collate_packed(items)
    cu = batch["cu_seqlens"].to(torch.int64)
    n = batch["input_ids"].numel()
    last = torch.zeros(n, dtype=torch.bool)
    last[cu[1:] - 1] = True  # the last token of each document predicts nothing

    def shifted(name, fill):
        flat = batch[name].reshape(-1)
        out = torch.cat([flat[1:], flat.new_full((1,), fill)])
        return out.masked_fill(last, fill)

    targets = shifted("labels", IGNORE_INDEX)
    analysis, final = shifted("analysis_mask", False), shifted("final_mask", False)
    weights = token_weights(targets, analysis, final, shifted("analysis_weight", 1.0),
                            final_channel=channels.final, analysis_channel=channels.analysis,
                            other_channel=channels.other)
    cu32 = batch["cu_seqlens"].to(device=device, dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu32, cu_seqlens_kv=cu32,
                             max_seqlen_q=batch["max_seqlen"], max_seqlen_kv=batch["max_seqlen"])
    return MicroBatch(batch["input_ids"].reshape(1, -1).to(device), packed, targets.to(device), weights.to(device),
                      int(batch["num_tokens"].sum()), int((analysis & (targets != IGNORE_INDEX)).sum()),
                      int((final & (targets != IGNORE_INDEX)).sum()))


class BatchStream:
    """Micro-batches of ``micro_batch`` samples in the sampler's order, across epochs."""

    def __init__(self, dataset: HarmonyPackedDataset, sampler: ResumableSampler, micro_batch: int):
        if len(sampler) < 1:
            raise ValueError(f"{dataset.directory}: {len(dataset)} samples cannot feed {sampler.world_size} "
                             "data-parallel ranks")
        self.dataset, self.sampler, self.micro_batch = dataset, sampler, micro_batch
        self._iter = None

    def next_items(self) -> list[dict]:
        items = []
        while len(items) < self.micro_batch:
            if self._iter is None:
                self._iter = iter(self.sampler)
            try:
                items.append(self.dataset[next(self._iter)])
            except StopIteration:
                self._iter = None
        return items

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._iter = None


# --------------------------------------------------------------------------------------------------------------
# Cost model


def active_parameters(model: torch.nn.Module) -> float:
    """Parameters used per token (global, embeddings excluded, experts scaled by top-k / E), for the MFU estimate."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    cfg = model.config
    total = 0.0
    for name, p in model.named_parameters():
        if name.startswith("embedding."):
            continue
        if is_expert_parameter(p):
            total += p.numel() * ep * cfg.moe_router_topk / cfg.num_moe_experts
        else:
            total += p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
    return total


# --------------------------------------------------------------------------------------------------------------
# Activation capture for the alignment losses


class Capture:
    """Forward hooks storing layer outputs (``outputs``) and attention inputs/outputs (``attn_in``/``attn_out``)."""

    def __init__(self):
        self.outputs: dict[int, torch.Tensor] = {}
        self.attn_in: dict[int, torch.Tensor] = {}
        self.attn_out: dict[int, torch.Tensor] = {}
        self.handles = []

    def layers(self, model, indices):
        for i in indices:
            self.handles.append(model.decoder.layers[i].register_forward_hook(
                lambda m, a, out, i=i: self.outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out)))

    def attention(self, model, indices):
        for i in indices:
            attn = model.decoder.layers[i].self_attention
            self.handles.append(attn.register_forward_pre_hook(
                lambda m, args, kwargs, i=i: self.attn_in.__setitem__(
                    i, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
            self.handles.append(attn.register_forward_hook(
                lambda m, a, out, i=i: self.attn_out.__setitem__(i, _with_bias(out))))

    def clear(self):
        self.outputs.clear()
        self.attn_in.clear()
        self.attn_out.clear()


def _with_bias(out):
    if isinstance(out, tuple):
        output, bias = out[0], out[1] if len(out) > 1 else None
        return output if bias is None else output + bias
    return out


# --------------------------------------------------------------------------------------------------------------
# The trainer


@dataclass
class StepRecord:
    step: int
    loss: float
    components: dict[str, float]
    grad_norm: float
    skipped: bool
    lr: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


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
                                          dispatcher=cfg.parallel.dispatcher,
                                          attention_backend=cfg.parallel.attention_backend,
                                          make_vocab_size_divisible_by=VOCAB_DIVISIBLE_BY,
                                          params_dtype=self.student_dtype,
                                          recompute=None if r.granularity == "none" else r.granularity,
                                          recompute_method=r.method, recompute_num_layers=r.num_layers)
        initialize_parallel(student_parallel, seed=cfg.seed)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        d = cfg.data
        per_step = d.micro_batch * self.dp_size
        if d.global_batch % per_step:
            raise ConfigError(f"{cfg.source}: data.global_batch: {d.global_batch} is not a multiple of micro_batch × "
                              f"data-parallel size = {d.micro_batch} × {self.dp_size}")
        self.accumulation = d.global_batch // per_step
        if (d.seq_len * d.micro_batch) % self.tp_size:
            raise ConfigError(f"{cfg.source}: data.seq_len: {d.seq_len}·micro_batch must be divisible by "
                              f"tp={self.tp_size} (sequence parallelism)")

        self.train_data = HarmonyPackedDataset(d.path, "train")  # checked before the models are built
        if self.train_data.seq_len != d.seq_len:
            raise ConfigError(f"{cfg.source}: data.seq_len: {d.seq_len}, but {d.path} was prepared with seq_len "
                              f"{self.train_data.seq_len}")
        self.stream = BatchStream(self.train_data, ResumableSampler(len(self.train_data), d.seed, d.shuffle,
                                                                    self.dp_rank, self.dp_size), d.micro_batch)

        self.resume_dir = self._resume_directory()
        if self.resume_dir is not None:
            self._check_resume_layout(self.resume_dir)
        student_source = self.resume_dir or cfg.student.megatron or cfg.student.hf
        self.student, self.student_config, self.student_config_dict = load_model(student_source, "student",
                                                                                 student_parallel)
        teacher_dtype = DTYPES.get(cfg.teacher.dtype, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        teacher_parallel = ParallelConfig(**{**student_parallel.__dict__, "params_dtype": teacher_dtype,
                                             "recompute": None})
        self.teacher, self.teacher_config, _ = load_model(cfg.teacher.path, "teacher", teacher_parallel)
        self.teacher.eval().requires_grad_(False)
        self._check_pair()
        self.vocab_size = self.student_config.vocab_size

        self.frozen = apply_freeze(self.student, cfg)
        self.ddp = DistributedDataParallel(
            self.student.config, DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                use_distributed_optimizer=self.optimizer_implementation == "megatron" and cfg.optimizer.distributed),
            self.student)
        self.optimizer = (MegatronAdam(self.ddp, self.student, cfg, self.student_dtype)
                          if self.optimizer_implementation == "megatron" else TorchAdamW(self.student, cfg))

        self.specs: list[LogitLoss] = cfg.logit_losses()
        self.loss_weights = [item.weight for item in cfg.losses.logits]
        self.hidden_pairs = self._hidden_pairs()
        self.attn_layers = self._attention_layers()
        self.student_capture, self.teacher_capture = Capture(), Capture()
        self.student_capture.layers(self.student, sorted({s for s, _ in self.hidden_pairs}))
        self.teacher_capture.layers(self.teacher, sorted({t for _, t in self.hidden_pairs}))
        self.teacher_capture.attention(self.teacher, self.attn_layers)
        self.router_stats = RouterStats(self.student, cfg.logging.router_min_entropy)
        self.flops_per_token = 6 * active_parameters(self.student) + 2 * active_parameters(self.teacher)

        self.step = 0
        self.tokens_seen = 0
        self.consecutive_bad = 0
        self.skipped_total = 0
        if self.resume_dir is not None:
            self._load_trainer_state(self.resume_dir)
        self.sink = MetricsSink(cfg.logging.dir, enabled=self.rank == 0, tensorboard=cfg.logging.tensorboard,
                                wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
                                run_name=cfg.stage, config=cfg.resolved(),
                                resume_step=self.step if self.resume_dir is not None else None)

    # ---- setup helpers

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _resume_directory(self) -> Path | None:
        root = Path(self.config.checkpoint.dir)
        if self.config.checkpoint.resume and (root / TRACKER_NAME).is_file():
            return resolve_megatron_dir(root)
        return None

    def _check_pair(self) -> None:
        s, t = self.student_config, self.teacher_config
        for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if getattr(s, key) != getattr(t, key):
                raise ValueError(f"student and teacher differ in {key}: {getattr(s, key)} vs {getattr(t, key)}")

    def _hidden_pairs(self) -> list[tuple[int, int]]:
        h = self.config.losses.hidden
        if h.weight == 0:
            return []
        n_s, n_t = len(self.student.decoder.layers), len(self.teacher.decoder.layers)
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
        self.teacher_capture.clear()
        with torch.no_grad():
            teacher_logits = self.teacher(mb.tokens, None, None, packed_seq_params=mb.packed)
        student_logits = self.ddp(mb.tokens, None, None, packed_seq_params=mb.packed)
        sums = logit_losses(student_logits[0], teacher_logits[0], self.specs, mb.weights, labels=mb.targets,
                            vocab_size=self.vocab_size, tp_group=self.tp_group,
                            chunk_size=self.config.losses.chunk_size)
        loss = sum(w * s for w, s in zip(self.loss_weights, sums)) / normaliser
        parts = {spec.kind: (s / normaliser).detach() for spec, s in zip(self.specs, sums)}
        local_weights = self._local_tokens(mb.weights)
        locals_: dict[str, torch.Tensor] = {}
        if self.hidden_pairs:
            pairs = [(self.student_capture.outputs[s], self.teacher_capture.outputs[t]) for s, t in self.hidden_pairs]
            locals_["hidden"] = hidden_state_loss(pairs, local_weights, self.config.losses.hidden.kind)
        if self.attn_layers:
            total = 0.0
            for i in self.attn_layers:
                attention = self.student.decoder.layers[i].self_attention
                total = total + attention_alignment_loss(
                    lambda x, attention=attention: _with_bias(attention(x, attention_mask=None,
                                                                        packed_seq_params=mb.packed)),
                    self.teacher_capture.attn_in[i], self.teacher_capture.attn_out[i], local_weights,
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
        cfg = self.config
        start = time.perf_counter()
        batches = [make_micro_batch(self.stream.next_items(), cfg.losses.channels, self.device)
                   for _ in range(self.accumulation)]
        normaliser = global_normaliser([mb.weights for mb in batches], mode=cfg.losses.normaliser,
                                       group=self.dp_group, dp_grad_average=True)
        self.ddp.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        totals: dict[str, torch.Tensor] = {}
        bad = False
        for mb in batches:
            loss, parts = self._micro_losses(mb, normaliser)
            try:
                check_finite({**parts, "total": loss}, self.step)
            except NonFiniteLossError as e:
                bad = True
                if self.rank == 0 or self.dp_size > 1:
                    print(f"[rank {self.rank}] step {self.step}: {e}", flush=True)
            loss.backward()
            for name, value in parts.items():
                totals[name] = totals.get(name, 0.0) + value
        finalize_model_grads([self.ddp])
        grad_norm = self.optimizer.grad_norm()
        flag = torch.tensor([float(bad or not math.isfinite(grad_norm))], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        skipped = bool(flag.item())
        lr = learning_rate(cfg, self.step)
        if skipped:
            self.consecutive_bad += 1
            self.skipped_total += 1
        else:
            self.consecutive_bad = 0
            self.optimizer.step(lr, grad_norm)
        tokens = torch.tensor([float(sum(mb.num_tokens for mb in batches)),
                               float(sum(mb.analysis_tokens for mb in batches)),
                               float(sum(mb.final_tokens for mb in batches))], device=self.device)
        dist.all_reduce(tokens, group=self.dp_group)
        self.tokens_seen += int(tokens[0])
        elapsed = time.perf_counter() - start
        # Each rank's components are its share of the step's loss (the normaliser counts every DP rank's tokens
        # and is divided by the DP size for DDP's gradient average): their DP mean is the step's loss.
        names = sorted(totals)
        shares = torch.stack([torch.as_tensor(totals[n], dtype=torch.float64, device=self.device).detach() for n in names])
        if self.dp_size > 1:
            dist.all_reduce(shares, group=self.dp_group)
            shares /= self.dp_size
        components = dict(zip(names, shares.tolist()))
        total = sum(item.weight * components[item.kind] for item in cfg.losses.logits)
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

    # ---- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Forward KL (T = 1) and CE per weighted token over the first ``eval.batches`` micro-batches of the valid
        split (this DP rank's share), summed over DP."""
        cfg = self.config
        data = HarmonyPackedDataset(cfg.data.path, "valid")
        sampler = ResumableSampler(len(data), cfg.data.seed, False, self.dp_rank, self.dp_size)
        order = list(sampler.epoch_order(0))
        specs = [LogitLoss("forward_kl"), LogitLoss("ce")]
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.ddp.eval()
        self.router_stats.enabled = False
        try:
            for b in range(cfg.eval.batches):
                chosen = order[b * cfg.data.micro_batch:(b + 1) * cfg.data.micro_batch]
                if len(chosen) < cfg.data.micro_batch:
                    break
                mb = make_micro_batch([data[i] for i in chosen], cfg.losses.channels, self.device)
                t = self.teacher(mb.tokens, None, None, packed_seq_params=mb.packed)
                s = self.ddp(mb.tokens, None, None, packed_seq_params=mb.packed)
                kl_ce = logit_losses(s[0], t[0], specs, mb.weights, labels=mb.targets, vocab_size=self.vocab_size,
                                     tp_group=self.tp_group, chunk_size=cfg.losses.chunk_size)
                sums[:2] += kl_ce.double()
                sums[2] += (mb.weights != 0).sum()
        finally:
            self.router_stats.enabled = True
            self.ddp.train()
        dist.all_reduce(sums, group=self.dp_group)
        if sums[2] == 0:
            return {}
        kl, ce = float(sums[0] / sums[2]), float(sums[1] / sums[2])
        return {"eval/forward_kl": kl, "eval/ce": ce, "eval/perplexity": math.exp(min(ce, 50.0))}

    # ---- checkpoints

    def _trainer_state(self) -> dict:
        state = {
            "step": self.step, "tokens_seen": self.tokens_seen, "consecutive_bad": self.consecutive_bad,
            "skipped_total": self.skipped_total,
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.stream.state_dict(),
            "layout": self._layout(),
            "rng": {"python": random.getstate(), "numpy": _numpy_rng_plain(np.random.get_state()),
                    "torch": torch.get_rng_state()},
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state()
            state["rng"]["cuda_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
        return state

    def _layout(self) -> dict:
        """What a resume must share with the run that wrote the per-rank trainer files."""
        return {"world": self.world, "tp": self.tp_size, "ep": self.config.parallel.ep,
                "optimizer": self.optimizer_implementation}

    def _check_resume_layout(self, directory: Path) -> None:
        """Refuse a resume at another layout before any model is built (a checkpoint of another TP does not even
        fit this run's vocabulary padding): the checkpoint's trainer/layout.json against this run's."""
        path = directory / "trainer" / LAYOUT_FILE
        if path.is_file():
            self._require_layout(path, json.loads(path.read_text()))

    def _require_layout(self, path: Path, written: dict) -> None:
        layout = self._layout()
        if written != layout:
            raise ValueError(f"{path}: written with {written}, resuming with {layout}; resume needs the same "
                             "layout (start a new stage from it with student.megatron to change it)")

    def _load_trainer_state(self, directory: Path) -> None:
        path = directory / "trainer" / f"rank_{self.rank:05d}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no trainer state for rank {self.rank} (was the checkpoint written with "
                                    "a different world size?)")
        state = safe_torch_load(path)
        self._require_layout(path, state["layout"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.consecutive_bad, self.skipped_total = state["consecutive_bad"], state["skipped_total"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["sampler"])
        random.setstate(state["rng"]["python"])
        name, keys, position, has_gauss, cached = state["rng"]["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
            tensor_parallel.get_cuda_rng_tracker().set_states(state["rng"]["cuda_tracker"])

    def save_checkpoint(self) -> Path:
        root = Path(self.config.checkpoint.dir)
        name = f"iter_{self.step:07d}"
        tmp, final = root / f".tmp-{name}", root / name
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        metadata = {
            "format_version": FORMAT_VERSION, "role": "student", "hf_config": self.student_config_dict,
            "source": str(self.config.student.megatron or self.config.student.hf), "stage": self.config.stage,
            "tokens_seen": self.tokens_seen, "dtype": next(k for k, v in DTYPES.items() if v == self.student_dtype),
            "step": self.step,
            "layout": {"written_tp": self.tp_size, "written_ep": self.config.parallel.ep,
                       "target_tp": self.tp_size, "target_ep": self.config.parallel.ep,
                       "make_vocab_size_divisible_by": VOCAB_DIVISIBLE_BY},
        }
        sharded = self.student.sharded_state_dict()
        sharded[METADATA_KEY] = metadata
        dist_checkpointing.save(sharded, str(tmp), sharded_strategy=InProcessSaveStrategy())
        (tmp / "trainer").mkdir(exist_ok=True)
        torch.save(self._trainer_state(), tmp / "trainer" / f"rank_{self.rank:05d}.pt")
        dist.barrier()
        if self.rank == 0:
            (tmp / "config.yaml").write_text(dump_config(self.config))
            (tmp / "trainer" / LAYOUT_FILE).write_text(json.dumps(self._layout(), sort_keys=True) + "\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            tracker = root / (TRACKER_NAME + ".tmp")
            tracker.write_text(f"{self.step}\n")
            os.replace(tracker, root / TRACKER_NAME)
        dist.barrier()
        return final

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
                          f"EP {cfg.parallel.ep}, DP {self.dp_size}), {self.accumulation} micro-batch(es) per step, "
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


def _numpy_rng_plain(state: tuple) -> tuple:
    """numpy's MT19937 state with its key array as a tensor: loadable with ``weights_only=True``."""
    name, keys, position, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)


def train(config: TrainConfig, stop: GracefulStop | None = None) -> list[StepRecord]:
    """Run one stage (initialising torch.distributed from the environment when needed); returns this process's
    step records. ``stop``: see :meth:`Trainer.fit`."""
    with distributed_context():
        trainer = Trainer(config)
        return trainer.fit(stop)
