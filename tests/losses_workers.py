"""Multi-process workers for tests/test_losses.py: ``spawn`` runs ``fn(rank, world_size, *args)`` on gloo
processes and returns each rank's result (through ``torch.save`` files)."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_student.ops.losses import LogitLoss, global_normaliser, logit_losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args) -> list:
    """Run ``fn`` on ``world_size`` spawned gloo ranks; a rank's exception is re-raised here."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world_size, _free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world_size)]


def tp_logit_losses(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    """Each case holds full-vocabulary ``student``/``teacher`` logits; this rank keeps its column shard and
    returns the chunked vocab-parallel losses and the gradient of their sum for its shard, and the losses over
    the whole vocabulary with a TP group of one (this rank alone)."""
    group = dist.new_group(list(range(world_size)))
    alone = [dist.new_group([r]) for r in range(world_size)][rank]
    out = []
    for case in cases:
        local = case["student"].shape[-1] // world_size
        cols = slice(rank * local, (rank + 1) * local)
        student = case["student"][:, cols].clone().requires_grad_(True)
        specs = [LogitLoss(**s) for s in case["specs"]]
        values = logit_losses(student, case["teacher"][:, cols], specs, case["weights"], labels=case["labels"],
                              vocab_size=case["vocab_size"], tp_group=group, chunk_size=case["chunk_size"])
        (grad,) = torch.autograd.grad(values.sum(), student)
        unsplit = logit_losses(case["student"], case["teacher"], specs, case["weights"], labels=case["labels"],
                               vocab_size=case["vocab_size"], tp_group=alone, chunk_size=case["chunk_size"])
        out.append({"values": values.detach(), "grad": grad, "unsplit": unsplit})
    return out


def dp_accumulated_step(rank: int, world_size: int, w0: torch.Tensor, micro_batches: list[list[dict]],
                        dp_grad_average: bool) -> dict:
    """One optimiser step of a linear "student" (logits = x @ w) on this DP rank's micro-batches, with the loss
    normalised by ``global_normaliser`` and the gradients reduced over DP as DDP would (SUM, or AVG when
    ``dp_grad_average``). Returns the DP-summed loss and the reduced gradient."""
    group = dist.new_group(list(range(world_size)))
    mine = micro_batches[rank]
    normaliser = global_normaliser([mb["weights"] for mb in mine], mode="weight", group=group,
                                   dp_grad_average=dp_grad_average)
    w = w0.clone().requires_grad_(True)
    specs = [LogitLoss("forward_kl", temperature=2.0), LogitLoss("ce")]
    loss_sum = torch.zeros((), dtype=torch.float64)
    for mb in mine:
        values = logit_losses(mb["x"] @ w, mb["teacher"], specs, mb["weights"], labels=mb["labels"], chunk_size=5)
        loss = values.sum() / normaliser
        loss.backward()
        loss_sum = loss_sum + loss.detach()
    grad = w.grad.clone()
    dist.all_reduce(grad, op=dist.ReduceOp.AVG if dp_grad_average else dist.ReduceOp.SUM, group=group)
    dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG if dp_grad_average else dist.ReduceOp.SUM, group=group)
    return {"loss": loss_sum, "grad": grad}


def tp_sparse_losses(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    """As tp_logit_losses for ops.losses.sparse_logit_losses (stored top-k teacher) and vocab_parallel_topk."""
    from megatron_student.ops.losses import sparse_logit_losses, vocab_parallel_topk

    group = dist.new_group(list(range(world_size)))
    out = []
    for case in cases:
        local = case["student"].shape[-1] // world_size
        cols = slice(rank * local, (rank + 1) * local)
        student = case["student"][:, cols].clone().requires_grad_(True)
        specs = [LogitLoss(**s) for s in case["specs"]]
        values = sparse_logit_losses(student, case["ids"], case["logprobs"], case["log_tail"], specs,
                                     case["weights"], vocab_size=case["vocab_size"], tp_group=group,
                                     chunk_size=case["chunk_size"])
        (grad,) = torch.autograd.grad(values.sum(), student)
        topk = vocab_parallel_topk(case["student"][:, cols], case["k"], vocab_size=case["vocab_size"],
                                   tp_group=group)
        out.append({"values": values.detach(), "grad": grad, "topk": topk})
    return out
