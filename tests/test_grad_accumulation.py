"""``AccumulatingDDP`` (``megatron.grad_accumulation``): Megatron DDP whose backward hook adds large gradients into
the fp32 main-grad buffer with a vectorised Triton kernel. Over two micro-batches of a student (gloo, one rank, the
kernel in Triton's interpreter and taken for every tensor of ≥ 256 elements) the reduced main grads are bitwise those
of Megatron's own DDP, and a bf16 gradient is added exactly as ``add_`` adds it."""

import torch

from megatron_harness import run_distributed
from megatron_harness_workers import grad_accumulation_worker


def test_accumulating_ddp_equals_megatron_ddp_bitwise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned rank before it imports triton
    (result,) = run_distributed(grad_accumulation_worker, 1, 3)
    assert result["taken"] >= 10  # embedding, output layer, attention and expert matrices took the kernel
    ours, megatron = result["grads"]["accumulating"], result["grads"]["megatron"]
    assert ours.keys() == megatron.keys()
    for name, grad in megatron.items():
        assert grad.abs().max() > 0, name  # every parameter got a gradient: nothing compared on zeros
        assert torch.equal(ours[name], grad), name
    assert not any(result["flags"].values())  # the next micro-batch's hook adds again
    by_kernel, by_add = result["bf16"]
    assert torch.equal(by_kernel, by_add)
