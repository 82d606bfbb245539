"""The optimizer side of a stage: LR schedule, freezing, parameter groups, and the two optimizer implementations.

``MegatronAdam`` is Megatron-Core's optimizer (``get_megatron_optimizer``): fp32 main weights for a bf16 student,
optionally the distributed optimizer (state sharded over data-parallel ranks), its own gradient norm; it allocates
on CUDA, so it is the GPU path. ``TorchAdamW`` is torch's AdamW stepping an fp32 student on Megatron DDP's fp32
``main_grad`` buffers with our gradient norm: the CPU path, and the reference the GPU tests compare against.

Both follow one protocol per step, so the trainer can skip a non-finite step before anything is touched:
``grad_norm()`` (after ``finalize_model_grads``) → the caller checks it → ``step(lr, grad_norm)`` clips to
``optimizer.grad_clip`` and updates with per-group ``lr × lr_scale`` and weight decay.
"""

from __future__ import annotations

import math
import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from .config import ConfigError, TrainConfig


def learning_rate(config: TrainConfig, step: int) -> float:
    """The base learning rate at (0-based) ``step``."""
    lr, s = config.optimizer.lr, config.schedule
    if step < s.warmup_steps:
        return lr * (step + 1) / s.warmup_steps
    if s.decay == "constant":
        return lr
    span = max(config.steps - s.warmup_steps - 1, 1)
    progress = min((step - s.warmup_steps) / span, 1.0)
    if s.decay == "linear":
        return s.min_lr + (lr - s.min_lr) * (1.0 - progress)
    return s.min_lr + (lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_freeze(model: torch.nn.Module, config: TrainConfig) -> list[str]:
    """Switch off ``requires_grad`` for parameters matching ``optimizer.freeze``; returns the frozen names."""
    frozen = []
    for i, pattern in enumerate(config.optimizer.freeze):
        regex = re.compile(pattern)
        hits = [name for name, _ in model.named_parameters() if regex.search(name)]
        if not hits:
            raise ConfigError(f"{config.source}: optimizer.freeze[{i}]: {pattern!r} matches no student parameter")
        frozen.extend(hits)
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    if all(not p.requires_grad for p in params.values()):
        raise ConfigError(f"{config.source}: optimizer.freeze: every student parameter is frozen")
    return sorted(set(frozen))


def parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW groups: one per ``optimizer.param_groups`` entry (first match wins) plus the default group."""
    specs = config.optimizer.param_groups
    regexes = [re.compile(g.pattern) for g in specs]
    members: list[list] = [[] for _ in range(len(specs) + 1)]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        index = next((i for i, r in enumerate(regexes) if r.search(name)), len(specs))
        members[index].append(p)
    groups = []
    for i, spec in enumerate(specs):
        if not members[i]:
            raise ConfigError(f"{config.source}: optimizer.param_groups[{i}].pattern: {spec.pattern!r} matches no "
                              "trainable student parameter (or only ones an earlier group took)")
        wd = config.optimizer.weight_decay if spec.weight_decay is None else spec.weight_decay
        groups.append({"params": members[i], "lr_scale": spec.lr_scale, "weight_decay": wd})
    if members[-1]:
        groups.append({"params": members[-1], "lr_scale": 1.0,
                       "weight_decay": config.optimizer.weight_decay})
    return groups


def is_expert_parameter(p: torch.nn.Parameter) -> bool:
    return not getattr(p, "allreduce", True)


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


def global_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm of the whole model's (DP-reduced) gradient: TP-sharded parameters summed over TP, TP-replicated
    ones counted once, expert parameters summed over EP. Identical on every rank."""
    device = params[0].main_grad.device
    dense = torch.zeros((), dtype=torch.float64, device=device)
    expert = torch.zeros((), dtype=torch.float64, device=device)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for p in params:
        sq = p.main_grad.double().pow(2).sum()
        if is_expert_parameter(p):
            expert += sq
        elif getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            dense += sq
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(dense, group=parallel_state.get_tensor_model_parallel_group())
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        dist.all_reduce(expert, group=parallel_state.get_expert_model_parallel_group())
    return (dense + expert).sqrt()


class TorchAdamW:
    """torch AdamW on the DDP ``main_grad`` buffers (fp32 student). Its state goes into the per-rank trainer file."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig):
        o = config.optimizer
        if any(p.dtype != torch.float32 for p in model.parameters() if p.requires_grad):
            raise ConfigError(f"{config.source}: optimizer.implementation: torch AdamW steps fp32 parameters only; "
                              "use student.dtype=fp32 or optimizer.implementation=megatron")
        self.groups = parameter_groups(model, config)
        self.params = [p for g in self.groups for p in g["params"]]
        self.clip = o.grad_clip
        self.optimizer = torch.optim.AdamW(
            [{"params": g["params"], "lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"]}
             for g in self.groups], lr=o.lr, betas=tuple(o.betas), eps=o.eps)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self) -> float:
        return float(global_grad_norm(self.params))

    def step(self, lr: float, grad_norm: float) -> None:
        if self.clip > 0 and grad_norm > self.clip:
            scale = self.clip / (grad_norm + 1e-6)
            for p in self.params:
                p.main_grad.mul_(scale)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        for p in self.params:
            p.grad = p.main_grad
        self.optimizer.step()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


class MegatronAdam:
    """Megatron-Core's Adam (decoupled weight decay) from ``get_megatron_optimizer``: a ChainedOptimizer over the
    dense and the expert-parallel parameters, mixed precision for a bf16 student (fp32 main weights), the
    distributed optimizer when ``optimizer.distributed``. Our parameter groups become Megatron config overrides
    (one ``group_index`` each); every Megatron group is mapped back to its ``lr_scale``/weight decay by position,
    since a loaded checkpoint's group dicts are matched on Megatron's identity keys (wd_mult, lr_mult, ...), which
    do not tell our groups apart.

    Its state goes into the per-rank trainer file like torch AdamW's: each chained part's inner torch AdamW state
    and its fp32 main parameters (this rank's shard). megatron-core 0.16.1's own ``sharded_state_dict`` formats
    do not round-trip here (its default builds ShardedTensors its dist_checkpointing rejects; 'dp_reshardable'
    cannot be loaded into a fresh torch AdamW and resumes with a different trajectory), and resume keeps the
    layout anyway."""

    def __init__(self, ddp: torch.nn.Module, model: torch.nn.Module, config: TrainConfig, dtype: torch.dtype):
        from megatron.core.optimizer import OptimizerConfig, ParamKey, get_megatron_optimizer
        from megatron.core.optimizer.optimizer_config import ParamWithNamePredicate

        if not torch.cuda.is_available():
            raise ConfigError(f"{config.source}: optimizer.implementation: megatron allocates on CUDA; on CPU use "
                              "torch (or auto)")
        o = config.optimizer
        self.groups = parameter_groups(model, config)
        self.clip = o.grad_clip
        index_of = {id(p): i for i, g in enumerate(self.groups) for p in g["params"]}
        overrides = {
            ParamKey(with_name_predicate=ParamWithNamePredicate(
                name=f"group_{i}", fn=lambda param, name, i=i: index_of.get(id(param)) == i)): {"group_index": i}
            for i in range(len(self.groups))}
        self.config = OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=config.schedule.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.grad_clip,
            bf16=dtype == torch.bfloat16, params_dtype=dtype, use_distributed_optimizer=o.distributed)
        self.optimizer = get_megatron_optimizer(self.config, [ddp], config_overrides=overrides)
        self.group_specs = [self.groups[g["group_index"]] for g in self.optimizer.param_groups]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def grad_norm(self) -> float:
        self.optimizer.prepare_grads()  # model grads → fp32 main grads (its inf flag needs a loss scaler: fp16 only)
        return float(self.optimizer.get_grad_norm())

    def step(self, lr: float, grad_norm: float) -> None:
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        for group, spec in zip(self.optimizer.param_groups, self.group_specs):
            group["lr"] = lr * spec["lr_scale"]
            group["weight_decay"] = spec["weight_decay"]
        if self.clip > 0:
            for part in self.optimizer.chained_optimizers:
                params = part.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(params, self.clip, grad_norm)
        self.optimizer.step_with_ready_grads()

    def _torch_optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch AdamW inside each chained part (a part without parameters on this rank has none)."""
        return [part.optimizer for part in self.optimizer.chained_optimizers
                if getattr(part, "optimizer", None) is not None]

    def state_dict(self) -> dict:
        return {"parts": [{"adam": inner.state_dict(),
                           "main_params": [p.detach().cpu() for g in inner.param_groups for p in g["params"]]}
                          for inner in self._torch_optimizers()]}

    def load_state_dict(self, state: dict) -> None:
        parts = self._torch_optimizers()
        if len(parts) != len(state["parts"]):
            raise ValueError(f"optimizer state has {len(state['parts'])} parts, this optimizer {len(parts)}")
        with torch.no_grad():  # main params of fp32 model params are views of those grad-requiring leaves
            for i, (inner, saved) in enumerate(zip(parts, state["parts"])):
                params = [p for g in inner.param_groups for p in g["params"]]
                shapes = [tuple(p.shape) for p in params]
                if shapes != [tuple(t.shape) for t in saved["main_params"]]:
                    raise ValueError(f"optimizer part {i}: saved main-parameter shards do not match this layout")
                for p, value in zip(params, saved["main_params"]):
                    p.copy_(value)
                inner.load_state_dict(saved["adam"])


def optimizer_implementation(config: TrainConfig) -> str:
    """``optimizer.implementation`` resolved: auto is Megatron's optimizer on CUDA and torch AdamW on CPU."""
    choice = config.optimizer.implementation
    if choice == "auto":
        return "megatron" if torch.cuda.is_available() else "torch"
    return choice
