"""Training metrics: router load statistics and the metrics sink (console, metrics.jsonl, TensorBoard, W&B).

Router statistics count, per MoE layer of the student, how many (token, slot) routing decisions each expert
received since the last report, summed over every rank (each rank routes its own tokens: its data-parallel
batch and, under sequence parallelism, its sequence shard). Reported per layer: the fraction per expert, the
entropy of that distribution normalised by log(E) (1 = uniform) and the largest share. A layer whose normalised
entropy falls below ``min_entropy`` is reported as collapsing.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist


def expert_balance(counts: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(load fraction per expert, entropy of it normalised by log(E) (1 = uniform), largest fraction) of one
    layer's routing counts (not all zero)."""
    fraction = counts / counts.sum()
    nonzero = fraction[fraction > 0]
    entropy = float(-(nonzero * nonzero.log()).sum()) / math.log(len(fraction)) if len(fraction) > 1 else 1.0
    return fraction, entropy, float(fraction.max())


class RouterStats:
    """Forward hooks on every router of ``model`` (modules with a ``routing`` method and ``num_moe_experts``);
    counts accumulate while ``enabled``."""

    def __init__(self, model: torch.nn.Module, min_entropy: float):
        self.min_entropy = min_entropy
        self.enabled = True
        self.counts: dict[str, torch.Tensor] = {}
        self._handles = []
        for name, module in model.named_modules():
            if hasattr(module, "routing") and hasattr(module, "topk"):
                layer = name.removesuffix(".mlp.router").replace("decoder.layers.", "layer_")
                self.counts[layer] = torch.zeros(module.config.num_moe_experts, dtype=torch.float64)
                self._handles.append(module.register_forward_hook(self._hook(layer)))
        if not self.counts:
            raise ValueError("RouterStats: the model has no MoE router")

    def _hook(self, layer: str):
        def hook(module, args, output):
            if self.enabled:
                routing_map = output[1]
                counts = routing_map.detach().sum(0).to(torch.float64)  # stays on the device: no sync per layer
                self.counts[layer] = self.counts[layer].to(counts.device) + counts
        return hook

    def report(self, group=None) -> tuple[dict[str, float], list[str]]:
        """(scalars, collapsing layer names) over everything counted since the last report, summed over
        ``group`` (None: every rank); resets the counts."""
        names = sorted(self.counts, key=lambda n: int(n.split("_")[-1]))
        stacked = torch.stack([self.counts[n] for n in names])
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)  # counts live where NCCL/gloo expects them
        stacked = stacked.cpu()
        scalars, collapsing = {}, []
        for name, counts in zip(names, stacked):
            self.counts[name].zero_()
            total = float(counts.sum())
            if total == 0:
                continue
            fraction, entropy, max_share = expert_balance(counts)
            scalars[f"router/{name}/entropy"] = entropy
            scalars[f"router/{name}/max_share"] = max_share
            for e, f in enumerate(fraction.tolist()):
                scalars[f"router/{name}/expert_{e}"] = f
            if entropy < self.min_entropy:
                collapsing.append(name)
        scalars["router/collapsing_layers"] = float(len(collapsing))
        return scalars, collapsing

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class MetricsSink:
    """Rank 0 writes ``metrics.jsonl``, TensorBoard events (``tensorboard``) and W&B (``wandb``, when the package
    is installed) under ``log_dir``; other ranks write nothing. ``resume_step``: the run resumes after that many
    steps, so the records logged past it by the interrupted run are dropped (metrics.jsonl rewritten without them,
    TensorBoard told to purge them), and the resumed run's records replace them."""

    def __init__(self, log_dir: str | Path, *, enabled: bool, tensorboard: bool, wandb: bool, wandb_project: str,
                 run_name: str, config: dict, resume_step: int | None = None):
        self.enabled = enabled
        self.tb = self.wandb = self.jsonl = None
        if not enabled:
            return
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        jsonl = log_dir / "metrics.jsonl"
        if resume_step is not None and jsonl.is_file():
            kept = [line for line in jsonl.read_text().splitlines(keepends=True)
                    if line.strip() and _logged_step(line) <= resume_step]
            tmp = jsonl.with_name(jsonl.name + ".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(jsonl)
        self.jsonl = open(jsonl, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1  # events at later steps are dropped on load
            self.tb = SummaryWriter(str(log_dir / "tensorboard"), purge_step=purge)
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                warnings.warn("logging.wandb is set but wandb is not installed; logging to TensorBoard/jsonl only")
            else:
                self.wandb = wandb_module.init(project=wandb_project, name=run_name, config=config, dir=str(log_dir))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def console(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _logged_step(line: str) -> int:
    """The step of a metrics.jsonl line; a line cut short by a kill counts as after any step."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return sys.maxsize


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` written by :class:`MetricsSink`."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curves(stages: dict[str, list[dict]], out: Path) -> None:
    """One PNG of loss/KL/CE/hidden/eval-KL curves, stages concatenated along the step axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("train/loss", "train/forward_kl", "train/ce", "train/hidden", "eval/forward_kl")
            if any(k in r for rows in stages.values() for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    axes = axes[0]
    offset = 0
    for name, rows in stages.items():
        for ax, key in zip(axes, keys):
            points = [(r["step"] + offset, r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker=".", label=name)
        offset += max((r["step"] for r in rows), default=0)
    for ax, key in zip(axes, keys):
        ax.set_title(key)
        ax.set_xlabel("step (stages concatenated)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
