"""Training-stage configuration: dataclasses loaded from YAML with strict validation.

``load_config(path, overrides)`` reads a stage YAML, applies ``key.path=value`` overrides (values parsed as YAML
scalars/lists), and returns a :class:`TrainConfig`. Unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` naming the file and the dotted key path. ``TrainConfig.resolved()`` is the complete
plain-dict form (every default filled in) written next to each checkpoint as ``config.yaml``.

Relative paths in the YAML are kept as written (they resolve against the working directory of the run).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..ops.losses import ALIGNMENT_KINDS, LOGIT_LOSS_KINDS, LogitLoss
from .graceful_stop import signal_number


class ConfigError(ValueError):
    """An invalid training config; the message names the file and the key path."""


# --------------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class StudentSection:
    """Where the student's weights come from: exactly one of ``hf`` (an ``init-student`` output directory) or
    ``megatron`` (a Megatron torch_dist checkpoint: ``convert-hf-to-megatron --role student`` output, or a previous
    stage's checkpoint dir, whose latest iteration is used). ``dtype``: the student's parameter dtype; auto = bf16
    with Megatron's optimizer (it keeps fp32 main weights: the GPU default), fp32 with torch AdamW (CPU). Router and KDA decay
    parameters stay fp32 either way."""

    hf: str | None = None
    megatron: str | None = None
    dtype: Literal["auto", "bf16", "fp32"] = "auto"


@dataclass
class TeacherSection:
    """A teacher. ``kind: online`` (the default): co-located on the student's ranks with the same TP/EP, run under
    no_grad; ``path`` an HF gpt-oss directory or a converted Megatron teacher checkpoint (auto-detected);
    ``dtype``: auto = bf16 on GPU, fp32 on CPU. ``kind: offline``: ``path`` a ``capture-teacher`` output
    directory; no teacher model in memory, the sparse logit losses on its stored ids and tail
    (``ops.losses.sparse_logit_losses``: forward_kl, reverse_kl, jsd, tvd); no activations, so no hidden-state or
    attention alignment. In a ``teachers:`` list, ``weight`` scales this teacher's logit losses and ``losses``
    (default: ``losses.logits`` without ``ce``) are its own; ``ce`` is teacher-free and belongs in
    ``losses.logits``."""

    kind: Literal["online", "offline"] = "online"
    path: str = ""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    weight: float = 1.0
    losses: list[LogitLossItem] | None = None


@dataclass
class DataSection:
    """``path``: a ``prepare-data`` output (train/ and valid/ splits); ``seq_len`` must equal the prepared
    length. ``global_batch`` = micro_batch × data-parallel size × gradient-accumulation steps."""

    path: str = ""
    seq_len: int = 2048
    micro_batch: int = 1
    global_batch: int = 1
    shuffle: bool = True
    seed: int = 1234


@dataclass
class ParallelSection:
    """``tp``/``ep``: tensor (with sequence) and expert parallelism. ``cp``: context parallelism, each packed
    micro-batch split into ``cp`` contiguous chunks, one per rank (``ops.context_parallel``); ``seq_len ·
    micro_batch`` must divide into ``tp × cp`` equal pieces. Data parallelism takes the remaining ranks:
    DP = world / (tp · cp).
    ``experts``: MoE experts as grouped GEMMs (``grouped``), Megatron's per-expert loop (``sequential``), or
    ``auto`` (grouped on CUDA in bf16); one checkpoint layout, so a run may switch between them.
    ``dispatcher``: MoE token dispatch. ``sorted`` (EP = 1 only): tokens sorted by expert on the device, no host
    synchronisation (``megatron.dispatch``); ``allgather``/``alltoall``: Megatron-Core's dispatchers (any EP; they
    read routing counts on the host); ``auto``: sorted at EP = 1, otherwise alltoall on GPU (allgather on the CPU,
    where alltoall cannot run). No parameters of their own: a checkpoint does not depend on it."""

    tp: int = 1
    ep: int = 1
    cp: int = 1
    dispatcher: Literal["auto", "sorted", "allgather", "alltoall"] = "auto"
    attention_backend: str = "auto"
    experts: Literal["auto", "grouped", "sequential"] = "auto"


@dataclass
class ParamGroup:
    """Parameters whose name matches ``pattern`` (``re.search`` on Megatron names such as
    ``decoder.layers.3.self_attention.q_proj.weight``; first matching group wins) train at ``lr × lr_scale``,
    with ``weight_decay`` when given (else the optimizer's)."""

    pattern: str = ""
    lr_scale: float = 1.0
    weight_decay: float | None = None


@dataclass
class OptimizerSection:
    """AdamW. ``freeze``: regexes (``re.search``) of parameters that do not train (excluded from DDP and the
    optimizer). ``grad_clip``: global gradient-norm clip (0 disables).
    ``implementation``: ``megatron`` = Megatron-Core's optimizer (``get_megatron_optimizer``: fp32 main weights for
    a bf16 student, its gradient norm and clipping; needs CUDA), ``torch`` = torch AdamW on DDP's fp32 gradient
    buffers (the CPU reference; fp32 student only), ``auto`` = megatron on GPU, torch on CPU.
    ``distributed``: with ``megatron``, Megatron's distributed optimizer (optimizer state and main weights sharded
    over data-parallel ranks, gradients reduce-scattered)."""

    implementation: Literal["auto", "megatron", "torch"] = "auto"
    distributed: bool = True
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    param_groups: list[ParamGroup] = field(default_factory=list)
    freeze: list[str] = field(default_factory=list)


@dataclass
class RecomputeSection:
    """Activation recompute (Megatron's full-layer recompute): ``full`` keeps only each recomputed layer's input
    and reruns its forward during backward. ``method``: ``uniform`` (groups of ``num_layers`` layers, one
    checkpoint each) or ``block`` (the first ``num_layers`` layers recomputed, the rest kept)."""

    granularity: Literal["none", "full"] = "none"
    method: Literal["uniform", "block"] = "uniform"
    num_layers: int = 1


@dataclass
class ScheduleSection:
    """Linear warmup from 0 to ``optimizer.lr`` over ``warmup_steps``, then ``decay`` to ``min_lr`` at the
    last step (``constant`` holds ``optimizer.lr``)."""

    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr: float = 0.0


@dataclass
class LogitLossItem:
    """One logit-loss component (ops.losses): kind, weight in the total, temperature (T² convention for the
    distillation kinds), β for jsd."""

    kind: str = "forward_kl"
    weight: float = 1.0
    temperature: float = 1.0
    beta: float = 0.5


@dataclass
class HiddenSection:
    """Residual-stream alignment (output of student layer s vs teacher layer t). ``layer_map``: ``all`` (i ↔ i)
    or a list of [student_layer, teacher_layer] pairs. Weight 0 disables it."""

    weight: float = 0.0
    kind: str = "cosine"
    layer_map: Union[str, list[list[int]]] = "all"


@dataclass
class AttentionAlignSection:
    """RADLADS teacher-forced attention alignment: each listed student attention module gets the teacher's
    normalised layer input and is matched to the teacher attention output. ``layers``: ``all`` or indices."""

    weight: float = 0.0
    kind: str = "mse"
    layers: Union[str, list[int]] = "all"


@dataclass
class ChannelSection:
    """Per-token weights by Harmony channel (times the data's analysis_weight)."""

    final: float = 1.0
    analysis: float = 1.0
    other: float = 1.0


@dataclass
class LossSection:
    """Total = Σ weight·component / normaliser, the normaliser counting the whole optimiser step
    (``tokens``: weighted tokens; ``weight``: the sum of weights) over all micro-batches and data-parallel ranks."""

    logits: list[LogitLossItem] = field(default_factory=lambda: [LogitLossItem("forward_kl", 1.0)])
    hidden: HiddenSection = field(default_factory=HiddenSection)
    attention: AttentionAlignSection = field(default_factory=AttentionAlignSection)
    channels: ChannelSection = field(default_factory=ChannelSection)
    normaliser: Literal["tokens", "weight"] = "tokens"
    chunk_size: int = 512


@dataclass
class CheckpointSection:
    """``dir``: save directory (Megatron-LM layout: iter_NNNNNNN/ + latest_checkpointed_iteration.txt).
    ``every``: steps between saves (0: only at the end). ``resume``: continue from the latest checkpoint in
    ``dir`` when one exists."""

    dir: str = ""
    every: int = 0
    resume: bool = True


@dataclass
class LoggingSection:
    """``dir``: TensorBoard event files and metrics.jsonl. ``router_min_entropy``: normalised routing entropy
    (1 = uniform) below which a layer's routing counts as collapsing (warning). ``peak_tflops``: per-device
    peak for the MFU estimate (unset: no MFU)."""

    dir: str = ""
    every: int = 1
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "megatron-student"
    router_min_entropy: float = 0.5
    peak_tflops: float | None = None


@dataclass
class EvalSection:
    """Held-out (valid split) forward KL(T=1) and CE every ``every`` steps over ``batches`` micro-batches
    (0 disables). ``suite``: an evaluation suite (``default``, ``demo`` or a suite YAML; see ``megatron-student
    evaluate``) run by rank 0 on the checkpoint written every ``suite_every`` steps (a multiple of
    ``checkpoint.every``) and at the last step, against ``suite_teacher`` (an HF gpt-oss dir; default
    ``teacher.path`` when that is an HF dir); reports go to ``<logging.dir>/suite/step_N``, scores to the metrics
    and failed gates are logged as warnings."""

    every: int = 0
    batches: int = 4
    suite: str | None = None
    suite_every: int = 0
    suite_teacher: str | None = None


@dataclass
class NanGuardSection:
    """A step whose loss or gradient norm is NaN/Inf is skipped and counted; more than ``max_consecutive`` in a
    row stop the run after a checkpoint."""

    max_consecutive: int = 3


@dataclass
class ExitSection:
    """Graceful stop (train/graceful_stop.py): on any of ``signals`` (Slurm's SIGTERM on preemption or scancel; the
    early warning of ``sbatch --signal=USR1@120`` before the time limit), or once ``duration_minutes`` of wall time
    have passed since the run started (0: no budget), every rank finishes the current step, a checkpoint is written
    and ``megatron-student train`` exits with status 75 (resumable: the launcher requeues the job)."""

    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    duration_minutes: float = 0.0


@dataclass
class TrainConfig:
    stage: str = ""
    steps: int = 1
    seed: int = 1234
    student: StudentSection = field(default_factory=StudentSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    teachers: list[TeacherSection] = field(default_factory=list)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    recompute: RecomputeSection = field(default_factory=RecomputeSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    losses: LossSection = field(default_factory=LossSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    nan_guard: NanGuardSection = field(default_factory=NanGuardSection)
    exit: ExitSection = field(default_factory=ExitSection)
    source: str = field(default="<dict>", metadata={"internal": True})

    def resolved(self) -> dict:
        """Every field, defaults included, as plain YAML-able data (without the internal ``source``)."""
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def logit_losses(self) -> list[LogitLoss]:
        return [LogitLoss(item.kind, item.temperature, item.beta) for item in self.losses.logits]

    def teacher_list(self) -> list[TeacherSection]:
        """The stage's teachers: ``teachers`` when given, else the one ``teacher``."""
        return list(self.teachers) if self.teachers else [self.teacher]

    def teacher_losses(self, teacher: TeacherSection) -> list[tuple[LogitLoss, float]]:
        """(loss, weight) of one teacher's logit losses: its own ``losses`` or ``losses.logits`` without ``ce``,
        each weight times the teacher's ``weight``."""
        items = teacher.losses if teacher.losses is not None else [i for i in self.losses.logits if i.kind != "ce"]
        return [(LogitLoss(i.kind, i.temperature, i.beta), i.weight * teacher.weight) for i in items]


# --------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data


_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, path: str, src: str):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{src}: {path}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, src)
            except ConfigError as e:
                errors.append(str(e).split(": ", 2)[-1])
        raise ConfigError(f"{src}: {path}: {value!r} fits none of {' | '.join(_type_name(a) for a in args)} "
                          f"({'; '.join(errors)})")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{src}: {path}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{src}: {path}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]", src) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, src)
    if value is None:
        raise ConfigError(f"{src}: {path}: must not be null (expected {_type_name(tp)})")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{src}: {path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{src}: {path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value):
            value = float(value)  # PyYAML (YAML 1.1) reads 1e-4 as a string; YAML 1.2 reads it as a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{src}: {path}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{src}: {path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"config field {path}: unsupported annotation {tp!r}")


def _build(cls, data: Any, path: str, src: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: {path or '<top level>'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{src}: unknown key {where}{unknown[0]} (known keys here: {', '.join(sorted(fields))})")
    kwargs = {name: _convert(value, hints[name], f"{path}.{name}" if path else name, src)
              for name, value in data.items()}
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# Semantic checks


def _check(cond: bool, src: str, path: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{src}: {path}: {message}")


def validate(config: TrainConfig) -> TrainConfig:
    src = config.source
    _check(bool(config.stage), src, "stage", "a stage name is required")
    _check(config.steps >= 1, src, "steps", f"must be >= 1, got {config.steps}")
    _check((config.student.hf is None) != (config.student.megatron is None), src, "student",
           "set exactly one of student.hf (HF student dir) or student.megatron (Megatron checkpoint)")
    d = config.data
    _check(bool(d.path), src, "data.path", "a prepare-data output directory is required")
    for key in ("seq_len", "micro_batch", "global_batch"):
        _check(getattr(d, key) >= 1, src, f"data.{key}", f"must be >= 1, got {getattr(d, key)}")
    _check(d.global_batch % d.micro_batch == 0, src, "data.global_batch",
           f"{d.global_batch} is not a multiple of data.micro_batch={d.micro_batch}")
    p = config.parallel
    _check(p.tp >= 1, src, "parallel.tp", f"must be >= 1, got {p.tp}")
    _check(p.ep >= 1, src, "parallel.ep", f"must be >= 1, got {p.ep}")
    _check(p.cp >= 1, src, "parallel.cp", f"must be >= 1, got {p.cp}")
    _check(p.dispatcher != "sorted" or p.ep == 1, src, "parallel.dispatcher",
           f"'sorted' needs parallel.ep 1 (got {p.ep}): use allgather or alltoall, or auto")
    _check((d.seq_len * d.micro_batch) % (p.tp * p.cp) == 0, src, "data.seq_len",
           f"{d.seq_len} × data.micro_batch {d.micro_batch} must be divisible by parallel.tp × parallel.cp = "
           f"{p.tp} × {p.cp} (equal context-parallel chunks, each split over TP by sequence parallelism)")
    o = config.optimizer
    _check(o.lr > 0, src, "optimizer.lr", f"must be > 0, got {o.lr}")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), src, "optimizer.betas",
           f"must be two numbers in [0, 1), got {o.betas}")
    _check(o.eps > 0, src, "optimizer.eps", f"must be > 0, got {o.eps}")
    _check(o.weight_decay >= 0, src, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(o.grad_clip >= 0, src, "optimizer.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip}")
    for i, group in enumerate(o.param_groups):
        _check(bool(group.pattern), src, f"optimizer.param_groups[{i}].pattern", "must be a non-empty regex")
        _regex(group.pattern, src, f"optimizer.param_groups[{i}].pattern")
        _check(group.lr_scale >= 0, src, f"optimizer.param_groups[{i}].lr_scale", f"must be >= 0, got {group.lr_scale}")
        _check(group.weight_decay is None or group.weight_decay >= 0, src,
               f"optimizer.param_groups[{i}].weight_decay", f"must be >= 0, got {group.weight_decay}")
    for i, pattern in enumerate(o.freeze):
        _regex(pattern, src, f"optimizer.freeze[{i}]")
    _check(not (o.implementation == "torch" and config.student.dtype == "bf16"), src, "student.dtype",
           "bf16 needs optimizer.implementation megatron (fp32 main weights); torch AdamW trains an fp32 student")
    _check(config.recompute.num_layers >= 1, src, "recompute.num_layers",
           f"must be >= 1, got {config.recompute.num_layers}")
    s = config.schedule
    _check(0 <= s.warmup_steps <= config.steps, src, "schedule.warmup_steps",
           f"must be in [0, steps={config.steps}], got {s.warmup_steps}")
    _check(0 <= s.min_lr <= o.lr, src, "schedule.min_lr", f"must be in [0, optimizer.lr={o.lr}], got {s.min_lr}")
    losses = config.losses
    for i, item in enumerate(losses.logits):
        where = f"losses.logits[{i}]"
        _check(item.kind in LOGIT_LOSS_KINDS, src, f"{where}.kind",
               f"{item.kind!r} is not one of {list(LOGIT_LOSS_KINDS)}")
        _check(item.weight >= 0, src, f"{where}.weight", f"must be >= 0, got {item.weight}")
        try:
            LogitLoss(item.kind, item.temperature, item.beta)
        except ValueError as e:
            raise ConfigError(f"{src}: {where}: {e}") from e
    kinds = [item.kind for item in losses.logits]
    _check(len(set(kinds)) == len(kinds), src, "losses.logits", f"each kind at most once, got {kinds}")
    _validate_teachers(config, src)
    for name, section in (("hidden", losses.hidden), ("attention", losses.attention)):
        _check(section.weight >= 0, src, f"losses.{name}.weight", f"must be >= 0, got {section.weight}")
        _check(section.kind in ALIGNMENT_KINDS, src, f"losses.{name}.kind",
               f"{section.kind!r} is not one of {list(ALIGNMENT_KINDS)}")
    if isinstance(losses.hidden.layer_map, str):
        _check(losses.hidden.layer_map == "all", src, "losses.hidden.layer_map",
               f"'all' or a list of [student, teacher] pairs, got {losses.hidden.layer_map!r}")
    else:
        for i, pair in enumerate(losses.hidden.layer_map):
            _check(len(pair) == 2 and min(pair) >= 0, src, f"losses.hidden.layer_map[{i}]",
                   f"must be [student_layer, teacher_layer] (non-negative), got {pair}")
    if isinstance(losses.attention.layers, str):
        _check(losses.attention.layers == "all", src, "losses.attention.layers",
               f"'all' or a list of layer indices, got {losses.attention.layers!r}")
    else:
        _check(all(i >= 0 for i in losses.attention.layers), src, "losses.attention.layers",
               f"layer indices must be >= 0, got {losses.attention.layers}")
    active = (sum(item.weight for item in losses.logits) + losses.hidden.weight + losses.attention.weight
              + sum(w for t in config.teachers for _, w in config.teacher_losses(t)))
    _check(active > 0, src, "losses", "every loss weight is 0: nothing to train on")
    for key in ("final", "analysis", "other"):
        _check(getattr(losses.channels, key) >= 0, src, f"losses.channels.{key}", "must be >= 0")
    _check(losses.chunk_size >= 1, src, "losses.chunk_size", f"must be >= 1, got {losses.chunk_size}")
    _check(bool(config.checkpoint.dir), src, "checkpoint.dir", "a checkpoint directory is required")
    _check(config.checkpoint.every >= 0, src, "checkpoint.every", f"must be >= 0, got {config.checkpoint.every}")
    _check(bool(config.logging.dir), src, "logging.dir", "a log directory is required")
    _check(config.logging.every >= 1, src, "logging.every", f"must be >= 1, got {config.logging.every}")
    _check(0 <= config.logging.router_min_entropy <= 1, src, "logging.router_min_entropy", "must be in [0, 1]")
    _check(config.logging.peak_tflops is None or config.logging.peak_tflops > 0, src, "logging.peak_tflops",
           "must be > 0 or null")
    _check(config.eval.every >= 0, src, "eval.every", f"must be >= 0, got {config.eval.every}")
    _check(config.eval.batches >= 1, src, "eval.batches", f"must be >= 1, got {config.eval.batches}")
    if config.eval.suite:
        from ..evaluate.suite import BUILTIN

        _check(config.eval.suite in BUILTIN or Path(config.eval.suite).is_file(), src, "eval.suite",
               f"{config.eval.suite!r} is neither a built-in suite ({', '.join(BUILTIN)}) nor a suite file")
        _check(config.checkpoint.every >= 1 and config.eval.suite_every >= 1
               and config.eval.suite_every % config.checkpoint.every == 0, src, "eval.suite_every",
               f"must be a positive multiple of checkpoint.every={config.checkpoint.every} (the suite evaluates the "
               f"checkpoint written at that step), got {config.eval.suite_every}")
    _check(config.nan_guard.max_consecutive >= 0, src, "nan_guard.max_consecutive", "must be >= 0")
    for i, name in enumerate(config.exit.signals):
        try:
            signal_number(name)
        except ValueError as e:
            raise ConfigError(f"{src}: exit.signals[{i}]: {e}") from e
    _check(config.exit.duration_minutes >= 0, src, "exit.duration_minutes",
           f"must be >= 0 (0: no time budget), got {config.exit.duration_minutes}")
    return config


def _validate_teachers(config: TrainConfig, src: str) -> None:
    from ..ops.losses import SPARSE_KINDS

    if config.teachers:
        _check(config.teacher == TeacherSection(), src, "teacher",
               "give either teacher (one) or teachers (a list), not both")
        where = [f"teachers[{i}]" for i in range(len(config.teachers))]
    else:
        _check(config.teacher.weight == 1.0 and config.teacher.losses is None, src, "teacher",
               "weight and losses are per-teacher settings of a teachers: list; one teacher uses losses.logits")
        where = ["teacher"]
    online = [w for w, t in zip(where, config.teacher_list()) if t.kind == "online"]
    _check(len(online) <= 1, src, online[-1] if online else "teachers",
           f"at most one online teacher shares the student's ranks (online: {', '.join(online)})")
    for key, teacher in zip(where, config.teacher_list()):
        what = "the online teacher's checkpoint" if teacher.kind == "online" else "a capture-teacher output directory"
        _check(bool(teacher.path), src, f"{key}.path", f"{what} is required")
        _check(teacher.weight >= 0, src, f"{key}.weight", f"must be >= 0, got {teacher.weight}")
        own = teacher.losses is not None
        items = teacher.losses if own else config.losses.logits
        for i, item in enumerate(items):
            path = f"{key}.losses[{i}]" if own else f"losses.logits[{i}]"
            if item.kind == "ce" and not own:
                continue  # teacher-free: counted once for the stage
            _check(item.kind in LOGIT_LOSS_KINDS and item.kind != "ce", src, f"{path}.kind",
                   f"{item.kind!r} is not a teacher loss (one of {[k for k in LOGIT_LOSS_KINDS if k != 'ce']}; "
                   "ce is teacher-free: put it in losses.logits)")
            _check(item.weight >= 0, src, f"{path}.weight", f"must be >= 0, got {item.weight}")
            if teacher.kind == "offline":
                _check(item.kind in SPARSE_KINDS, src, f"{path}.kind",
                       f"{item.kind!r} is not defined for the offline teacher {key} (its stored top ids and tail "
                       f"support {list(SPARSE_KINDS)})")
            try:
                LogitLoss(item.kind, item.temperature, item.beta)
            except ValueError as e:
                raise ConfigError(f"{src}: {path}: {e}") from e
        if own:
            kinds = [item.kind for item in teacher.losses]
            _check(len(set(kinds)) == len(kinds), src, f"{key}.losses", f"each kind at most once, got {kinds}")
        if teacher.kind == "offline":
            _check((Path(teacher.path) / "capture.json").is_file(), src, f"{key}.path",
                   f"{Path(teacher.path) / 'capture.json'}: no capture here (run megatron-student capture-teacher)")
    for name, section in (("hidden", config.losses.hidden), ("attention", config.losses.attention)):
        if section.weight > 0 and not online:
            offline = [w for w, t in zip(where, config.teacher_list()) if t.kind == "offline"]
            raise ConfigError(f"{src}: losses.{name}.weight: {section.weight} needs teacher activations, and the "
                              f"offline teacher ({', '.join(offline)}) stores only its output distribution; set it "
                              "to 0 or add an online teacher")


def _regex(pattern: str, src: str, path: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{src}: {path}: invalid regex {pattern!r}: {e}") from e


# --------------------------------------------------------------------------------------------------------------
# Loading


def apply_override(data: dict, override: str, src: str) -> None:
    """Set ``key.path=value`` in ``data`` (value parsed as YAML: numbers, booleans, null, [lists], {maps})."""
    if "=" not in override:
        raise ConfigError(f"{src}: override {override!r} is not of the form key.path=value")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{src}: override {override!r}: empty key component")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: override {key}: cannot parse {text!r}: {e}") from e
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{src}: override {key}: {'.'.join(parts[:i + 1])} is not a mapping")
        node = child
    node[parts[-1]] = value


def config_from_dict(data: dict, overrides: list[str] = (), source: str = "<dict>") -> TrainConfig:
    data = dict(data or {})
    for override in overrides:
        apply_override(data, override, source)
    config = _build(TrainConfig, data, "", source)
    config.source = source
    return validate(config)


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read, override and validate a stage YAML."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return config_from_dict(data or {}, overrides, str(path))


def dump_config(config: TrainConfig) -> str:
    return yaml.safe_dump(config.resolved(), sort_keys=False)
