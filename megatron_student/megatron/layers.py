"""Megatron-Core building blocks shared by the student and the teacher: an SP-capable RMSNorm, the gpt-oss router,
the clamped-SwiGLU expert activation, and tensor-parallel parameter holders.

All math comes from ``megatron_student.ops``. Tensor-parallel rules:
- a TP-sharded raw parameter carries ``tensor_model_parallel``/``partition_dim`` (set here) and is saved with that
  axis in ``sharded_state_dict``;
- a replicated parameter that only sees this rank's heads or sequence shard gets a partial gradient; it is flagged
  ``sequence_parallel = True`` so ``finalize_model_grads`` sums it over TP (requires ``config.sequence_parallel``,
  which the builders switch on whenever TP > 1);
- parameters that must stay fp32 under bf16 carry ``keep_fp32 = True`` (see :func:`restore_fp32_parameters`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.router import TopKRouter

from ..ops.moe import clamped_swiglu_stacked, router_topk_softmax
from ..ops.norm import rms_norm


def param_device(config) -> torch.device:
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def new_parameter(config, shape, *, tp_axis: int | None, init: str = "normal", dtype=None) -> torch.nn.Parameter:
    """An uninitialised-then-initialised parameter of this rank's ``shape``. ``tp_axis`` None: replicated over TP
    with a partial gradient (summed over TP, see module doc); otherwise sharded along ``tp_axis``.
    init: "normal" (config.init_method), "zeros" or "ones"."""
    p = torch.nn.Parameter(torch.empty(shape, dtype=dtype or config.params_dtype, device=param_device(config)))
    with torch.no_grad():
        if init == "zeros":
            p.zero_()
        elif init == "ones":
            p.fill_(1.0)
        elif init == "normal":
            if config.perform_initialization:
                config.init_method(p)
        else:
            raise ValueError(f"unknown init {init!r}")
    if tp_axis is None:
        p.sequence_parallel = True
    else:
        set_tensor_model_parallel_attributes(p, True, tp_axis, 1)
    return p


class Projection(torch.nn.Module):
    """A local linear map: weight [*out_shape, in] (flattened over the output axes when applied) and optional bias
    [*out_shape]. Its output axes are head-major or rank-major as the caller declares with ``tp_axis`` (an axis of
    the weight; the bias shares the output axes)."""

    def __init__(self, config, in_features: int, out_shape: tuple[int, ...], *, bias: bool, tp_axis: int | None,
                 bias_init: str = "zeros"):
        super().__init__()
        self.weight = new_parameter(config, (*out_shape, in_features), tp_axis=tp_axis)
        self.bias = new_parameter(config, out_shape, tp_axis=tp_axis, init=bias_init) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.flatten(0, -2)
        bias = None if self.bias is None else self.bias.flatten()
        return F.linear(x, weight, bias)


class ParallelRMSNorm(torch.nn.Module):
    """gpt-oss RMSNorm (fp32 math, ops.norm) usable under sequence parallelism: with SP each rank normalises its
    sequence shard, so the weight's gradient is partial and is summed over TP (``sequence_parallel`` flag)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=param_device(config)))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class ClampedSwiGLU(MegatronModule):
    """gpt-oss expert activation on Megatron's [gate; up] fc1 output (ops.moe.clamped_swiglu_stacked). Used as
    ``MLPSubmodules.activation_func``; MLP applies it to the full fc1 output (bias added) when
    ``config.use_te_activation_func`` is set, which despite its name only selects the spec-built activation
    (no Transformer Engine involved). A MegatronModule because MLP.sharded_state_dict visits every child."""

    def __init__(self, config, limit: float):
        super().__init__(config=config)
        self.limit = limit

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return clamped_swiglu_stacked(gate_up, limit=self.limit)


class GptOssRouter(TopKRouter):
    """gpt-oss routing: fp32 logits x·Wᵀ + b, top-k over the raw logits, softmax over the k selected
    (ops.moe.router_topk_softmax). Weight and bias stay fp32 under bf16 (``keep_fp32``)."""

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        if self.routing_type != "none" or self.config.moe_z_loss_coeff or self.config.moe_input_jitter_eps:
            raise ValueError(
                "GptOssRouter supports moe_router_load_balancing_type='none' without z-loss or input jitter; got "
                f"{self.routing_type!r}, z_loss={self.config.moe_z_loss_coeff}, jitter={self.config.moe_input_jitter_eps}")
        if self.bias is None:
            raise ValueError("the gpt-oss router has a bias: build it with config.add_bias_linear=True")
        for p in (self.weight, self.bias):
            p.data = p.data.to(device=param_device(config))
            p.keep_fp32 = True

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input.float(), self.weight.float(), self.bias.float())

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        logits = logits.reshape(-1, self.config.num_moe_experts)
        weights, indices = router_topk_softmax(logits, self.topk)
        probs = torch.zeros_like(logits).scatter(1, indices, weights)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, indices, True)
        return probs, routing_map


def restore_fp32_parameters(model: torch.nn.Module) -> int:
    """Re-upcast parameters flagged ``keep_fp32`` (router, KDA A_log/dt_bias) after a bf16 cast such as
    ``Float16Module``; returns how many were restored. Call before building the optimizer."""
    count = 0
    for p in model.parameters():
        if getattr(p, "keep_fp32", False) and p.dtype != torch.float32:
            p.data = p.data.float()
            count += 1
    return count


def padded_vocab_size(vocab_size: int, tp_size: int, divisible_by: int) -> int:
    """Megatron's vocabulary padding: a multiple of divisible_by·TP."""
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)
