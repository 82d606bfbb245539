"""gpt-oss MoE math: router (bias, top-k over raw logits, softmax over the k selected) and the clamped
SwiGLU ((up + 1)·gate·σ(α·gate), gate ≤ limit, |up| ≤ limit) with expert biases.

Two expert paths: :func:`experts_forward` loops over experts (one matmul each, a host sync for the counts): the
reference. :func:`expert_mlp_grouped` computes all experts of expert-sorted rows with two grouped GEMMs
(``torch.nn.functional.grouped_mm``, or ``torch._grouped_mm`` on a torch without it; differentiable), no Python
loop and no host sync; on the GPU the elementwise work around them (biases, clamped SwiGLU, routing weights and their
gradients) runs in the fused Triton kernels of ``ops.moe_kernels``, on the CPU as the torch composition of the
functions below; :func:`experts_forward_grouped` wraps it for the HF modules, ``megatron.experts`` for
Megatron's token dispatchers. :class:`ExpertSort` is the token permutation of both the HF modules and the Megatron
layers' sync-free dispatcher (``megatron.dispatch``): the (token, slot) pairs sorted by expert on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import triton_runs_on

# torch >= 2.10 exports grouped_mm; earlier 2.x only the private op (same arguments: mat_a, mat_b, offs=...).
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


def router_topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] → (weights [N, k], expert indices [N, k]); the softmax runs in the logits' dtype, as
    gpt-oss does."""
    if not 0 < top_k <= logits.shape[-1]:
        raise ValueError(f"top_k={top_k} must be in 1..{logits.shape[-1]} (number of experts)")
    top_values, top_indices = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(top_values, dim=-1), top_indices


def clamped_swiglu(
    gate: torch.Tensor, up: torch.Tensor, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT
) -> torch.Tensor:
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(alpha * gate))


def clamped_swiglu_interleaved(gate_up: torch.Tensor, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT):
    """HF/gpt-oss layout: gate in the even, up in the odd columns."""
    return clamped_swiglu(gate_up[..., 0::2], gate_up[..., 1::2], alpha, limit)


def clamped_swiglu_stacked(gate_up: torch.Tensor, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT):
    """Megatron layout: [gate; up] halves of the last dim."""
    gate, up = gate_up.chunk(2, dim=-1)
    return clamped_swiglu(gate, up, alpha, limit)


@dataclass(frozen=True)
class ExpertActivation:
    """The experts' clamped SwiGLU as a description the fused kernels can read: ``layout`` of gate and up in the fc1
    output, "interleaved" (HF/gpt-oss: :func:`clamped_swiglu_interleaved`) or "stacked" (Megatron:
    :func:`clamped_swiglu_stacked`), and its ``alpha`` and ``limit``. Calling it applies the torch reference."""

    layout: str
    alpha: float = SWIGLU_ALPHA
    limit: float = SWIGLU_LIMIT

    LAYOUTS = {"interleaved": clamped_swiglu_interleaved, "stacked": clamped_swiglu_stacked}

    def __post_init__(self):
        if self.layout not in self.LAYOUTS:
            raise ValueError(f"expert activation layout {self.layout!r}: choose one of {', '.join(self.LAYOUTS)}")

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.LAYOUTS[self.layout](gate_up, self.alpha, self.limit)


def experts_forward(
    x: torch.Tensor,
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down_proj: torch.Tensor,
    down_bias: torch.Tensor,
    alpha: float = SWIGLU_ALPHA,
    limit: float = SWIGLU_LIMIT,
) -> torch.Tensor:
    """x [N, H]; HF weight layout gate_up_proj [E, H, 2I] (interleaved), down_proj [E, I, H].
    Tokens are grouped per expert so each expert runs one matmul over the tokens routed to it."""
    num_tokens, top_k = expert_indices.shape
    flat_experts = expert_indices.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    token_of = order // top_k
    counts = torch.bincount(flat_experts, minlength=gate_up_proj.shape[0]).tolist()
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start : start + count]
        tokens = token_of[start : start + count]
        start += count
        hidden = F.linear(x[tokens], gate_up_proj[expert].t(), gate_up_bias[expert])
        y = F.linear(clamped_swiglu_interleaved(hidden, alpha, limit), down_proj[expert].t(), down_bias[expert])
        weights = expert_weights.reshape(-1)[rows, None]
        out.index_add_(0, tokens, (y * weights).to(x.dtype))
    return out


def grouped_mm_available() -> bool:
    return _GROUPED_MM is not None


def experts_forward_auto(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The HF modules' experts: grouped GEMMs for bf16 on CUDA (what every torch's CUDA grouped_mm runs), the
    per-expert reference otherwise (CPU, fp32)."""
    grouped = x.is_cuda and x.dtype == torch.bfloat16 and grouped_mm_available()
    return (experts_forward_grouped if grouped else experts_forward)(x, *args, **kwargs)


def _grouped_mm(rows: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    if _GROUPED_MM is None:
        raise RuntimeError(f"torch {torch.__version__} has neither torch.nn.functional.grouped_mm nor "
                           "torch._grouped_mm: use the per-expert path (experts: sequential)")
    for name, t in (("rows", rows), ("weight", weight)):
        if any((stride * t.element_size()) % 16 for stride in t.stride() if stride != 1):
            raise ValueError(f"grouped GEMM {name} {tuple(t.shape)} {t.dtype}: grouped_mm needs 16-byte aligned "
                             "strides (hidden and intermediate sizes a multiple of 8 in bf16, 4 in fp32)")
    return _GROUPED_MM(rows, weight, offs=group_ends)


class _AddExpertBias(torch.autograd.Function):
    """rows + bias[row_expert]. Its bias gradient sums each expert's rows in fp32: autograd's own backward of the
    gather accumulates the rows one by one in the bias dtype, a few percent off in bf16 for the ~10³ rows of an
    expert (the per-expert linear's bias gradient is one fp32-accumulated sum)."""

    @staticmethod
    def forward(ctx, rows, bias, row_expert):
        ctx.save_for_backward(row_expert)
        ctx.rows_dtype, ctx.bias_dtype, ctx.bias_shape = rows.dtype, bias.dtype, bias.shape
        return rows + bias[row_expert]

    @staticmethod
    def backward(ctx, grad):
        (row_expert,) = ctx.saved_tensors
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = grad.new_zeros(ctx.bias_shape, dtype=torch.float32).index_add_(0, row_expert, grad.float())
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad.to(ctx.rows_dtype), grad_bias, None


class _BiasSwiGLU(torch.autograd.Function):
    """The fc1 epilogue in Triton (``ops.moe_kernels``): activation(h + bias[row_expert]) in h's dtype, computed in
    float32; the backward recomputes from h and the bias and sums each expert's rows for the bias gradient."""

    @staticmethod
    def forward(ctx, h, bias, row_expert, group_ends, activation: ExpertActivation):
        from . import moe_kernels

        ctx.save_for_backward(h, bias, row_expert, group_ends)
        ctx.activation = activation
        return moe_kernels.bias_swiglu(h, bias, row_expert, activation.alpha, activation.limit,
                                       activation.layout == "interleaved")

    @staticmethod
    def backward(ctx, grad_act):
        from . import moe_kernels

        h, bias, row_expert, group_ends = ctx.saved_tensors
        activation = ctx.activation
        grad_h = moe_kernels.bias_swiglu_grad(grad_act, h, bias, row_expert, activation.alpha, activation.limit,
                                              activation.layout == "interleaved")
        grad_bias = moe_kernels.segment_sum(grad_h, group_ends, bias.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_bias, None, None, None


class _BiasWeight(torch.autograd.Function):
    """The fc2 epilogue in Triton (``ops.moe_kernels``): (y + bias[row_expert])·weights in y's dtype; the weights'
    gradient is each row's float32 dot product of the upstream gradient with y + bias, the bias gradient each
    expert's sum of its rows."""

    @staticmethod
    def forward(ctx, y, bias, weights, row_expert, group_ends):
        from . import moe_kernels

        ctx.save_for_backward(y, bias, weights, row_expert, group_ends)
        return moe_kernels.bias_weight(y, bias, row_expert, weights)

    @staticmethod
    def backward(ctx, grad):
        from . import moe_kernels

        y, bias, weights, row_expert, group_ends = ctx.saved_tensors
        grad_y, grad_weights = moe_kernels.bias_weight_grad(grad, y, bias, row_expert, weights)
        grad_bias = moe_kernels.segment_sum(grad_y, group_ends, bias.dtype) if ctx.needs_input_grad[1] else None
        return grad_y, grad_bias, grad_weights if ctx.needs_input_grad[2] else None, None, None


def fused_epilogues_available(rows: torch.Tensor) -> bool:
    """Whether :func:`expert_mlp_grouped` runs its elementwise work in the Triton kernels by default: float rows of
    16 or 32 bits on CUDA, or on any device under Triton's interpreter (``TRITON_INTERPRET=1``: the CPU tests)."""
    return rows.dtype in (torch.bfloat16, torch.float16, torch.float32) and triton_runs_on(rows)


def expert_mlp_grouped(
    rows: torch.Tensor,
    group_ends: torch.Tensor,
    row_expert: torch.Tensor,
    row_weights: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor,
    activation: ExpertActivation,
    fused: bool | None = None,
) -> torch.Tensor:
    """Every expert's MLP on its rows, weighted: rows [M, H] sorted by expert; group_ends [E] int32, the cumulative
    row count per expert (group e owns rows group_ends[e-1]:group_ends[e]); row_expert [M] the expert of each row;
    row_weights [M] its routing weight. Weights as right-hand matrices: gate_up [E, H, 2I], down [E, I, H] (any
    memory order, e.g. a transposed view of [E, out, in]); biases [E, 2I], [E, H]. Returns
    weight·(activation(rows·gate_up + b₁)·down + b₂) in the rows' dtype. ``fused``: the bias, activation and weight
    epilogues of the two GEMMs in the Triton kernels of ``ops.moe_kernels`` (float32 inside, forward and backward;
    None: where :func:`fused_epilogues_available`), or as the torch composition of the reference functions."""
    if fused is None:
        fused = fused_epilogues_available(rows)
    if fused:
        act = _BiasSwiGLU.apply(_grouped_mm(rows, gate_up, group_ends), gate_up_bias, row_expert, group_ends,
                                activation)
        return _BiasWeight.apply(_grouped_mm(act, down, group_ends), down_bias, row_weights, row_expert, group_ends)
    hidden = _AddExpertBias.apply(_grouped_mm(rows, gate_up, group_ends), gate_up_bias, row_expert)
    out = _AddExpertBias.apply(_grouped_mm(activation(hidden).to(rows.dtype), down, group_ends), down_bias, row_expert)
    return (out * row_weights[:, None]).to(rows.dtype)


@dataclass(frozen=True)
class ExpertSort:
    """The N·k (token, slot) routing pairs of top-k routing sorted by expert, computed on the device without a host
    sync: ``order`` [N·k] the pair index (token·k + slot) of each sorted row, expert-major and token-ascending within
    an expert (the order of Megatron's ``permute``); ``counts`` [E] int32 rows per expert; ``row_expert`` [N·k] the
    expert of each sorted row."""

    order: torch.Tensor
    counts: torch.Tensor
    row_expert: torch.Tensor
    top_k: int

    @classmethod
    def of(cls, expert_indices: torch.Tensor, num_experts: int) -> ExpertSort:
        """``expert_indices`` [N, k]: the k distinct experts of each token."""
        flat = expert_indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        # scatter_add, not bincount: CUDA's bincount reads the largest index on the host
        counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        return cls(order, counts, flat[order], expert_indices.shape[1])

    @property
    def group_ends(self) -> torch.Tensor:
        """[E] int32 cumulative row counts: the offsets ``grouped_mm`` takes."""
        return self.counts.cumsum(0, dtype=torch.int32)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] → [N·k, H], each pair's token in sorted order (an index_select). Its backward sums each token's
        k row gradients as :meth:`combine` sums outputs: autograd's backward of index_select is an index_add with
        atomics (and x[idx]'s an index_put that sorts the indices first, ~3 ms per layer for the 32k rows of
        T = 8192, top-4 on an H200)."""
        return _SortedRows.apply(x, self.order, self.top_k)

    def row_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """weights [N, k] → [N·k], each pair's routing weight in sorted order."""
        return weights.reshape(-1).index_select(0, self.order)

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        """Sorted rows [N·k, H] (already weighted) → [N, H], each token's k rows summed: back to (token, slot)
        order with a permutation (no atomics), then one reduction over the slots."""
        return _sum_slots(out, self.order, self.top_k)


def _sum_slots(rows: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
    """Sorted rows [N·k, H] → [N, H]: back to (token, slot) order with a permutation (no atomics), then each token's
    k rows summed in one reduction."""
    by_pair = rows.new_empty(rows.shape).index_copy_(0, order, rows)
    return by_pair.view(-1, top_k, rows.shape[-1]).sum(1)


class _SortedRows(torch.autograd.Function):
    """x.index_select(0, order // top_k), with the gradient of x as :func:`_sum_slots` of the rows' gradient."""

    @staticmethod
    def forward(ctx, x, order, top_k):
        ctx.save_for_backward(order)
        ctx.top_k = top_k
        return x.index_select(0, order // top_k)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return _sum_slots(grad, order, ctx.top_k), None, None


def experts_forward_grouped(
    x: torch.Tensor,
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down_proj: torch.Tensor,
    down_bias: torch.Tensor,
    alpha: float = SWIGLU_ALPHA,
    limit: float = SWIGLU_LIMIT,
) -> torch.Tensor:
    """:func:`experts_forward` (same arguments, HF layout) with grouped GEMMs: the N·k (token, expert) pairs sorted
    by expert on the device (:class:`ExpertSort`), no host sync; each token's k outputs are summed in one
    reduction."""
    sort = ExpertSort.of(expert_indices, gate_up_proj.shape[0])
    out = expert_mlp_grouped(
        sort.rows(x), sort.group_ends, sort.row_expert, sort.row_weights(expert_weights),
        gate_up_proj, gate_up_bias, down_proj, down_bias, ExpertActivation("interleaved", alpha, limit))
    return sort.combine(out)
