"""Fused Triton kernels for the elementwise work around the grouped expert GEMMs of
:func:`megatron_student.ops.moe.expert_mlp_grouped`, on M rows sorted by expert (``row_expert`` [M] the expert of each
row, ``group_ends`` [E] int32 the cumulative row count per expert, both on the device: no host sync anywhere).

- fc1 epilogue, bias + clamped SwiGLU: ``h`` [M, 2I] (the fc1 GEMM output) and ``bias`` [E, 2I] →
  ``act = (u + 1)·g·σ(α·g)`` [M, I] with ``g = min(h_gate + b_gate, limit)`` and ``u = clamp(h_up + b_up, ±limit)``,
  gate and up in the "stacked" (Megatron: [gate; up] halves) or "interleaved" (HF: gate even, up odd columns)
  layout. The backward recomputes from ``h`` and the bias: ``d act/d u = g·σ(α·g)`` where −limit ≤ u ≤ limit, 0
  elsewhere; ``d act/d g = (u + 1)·σ(α·g)·(1 + α·g·(1 − σ(α·g)))`` where g ≤ limit, 0 elsewhere (the boundary
  value passes the gradient, as torch's ``clamp`` backward does).
- fc2 epilogue, bias + routing weight: ``out = (y + bias[row_expert])·w`` [M, H]; backward ``grad_y = g·w`` and
  ``grad_w = Σ_j g·(y + b)`` per row (one program owns whole rows: no atomics).
- bias gradients: rows are sorted by expert, so ``grad_bias[e]`` is the sum of the rows
  ``group_ends[e − 1]:group_ends[e]`` of the rows' gradient: one program per (expert, column block) loops over its
  expert's rows, reading the bounds on the device.

Everything is computed in float32 and stored in the tensors' dtypes (bf16, fp16 or fp32). On a machine without a GPU,
``TRITON_INTERPRET=1`` (set before this module is imported) runs the kernels through Triton's interpreter on CPU
tensors: that is how the CPU tests check them against the torch reference of ``ops.moe``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# elementwise tiles: 32 rows × 128 columns (16 values per thread with 4 warps)
BLOCK_M = 32
BLOCK_N = 128
# fc2 backward: 16 whole rows per program, 256 columns per step of its loop over the row
WEIGHT_BLOCK_M = 16
WEIGHT_BLOCK_N = 256
# bias gradients: 64 rows × 64 columns per step of an expert's loop over its rows
SUM_BLOCK_M = 64
SUM_BLOCK_N = 64
NUM_WARPS = 4


@triton.jit
def _pair_columns(col_block, inter, BLOCK_N: tl.constexpr):
    """The interleaved layout's columns of a block's BLOCK_N (gate, up) pairs: 2·BLOCK_N consecutive columns, loaded
    and stored as one contiguous (vectorised) tile."""
    cols = col_block * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
    return cols, cols < 2 * inter


@triton.jit
def _gate_up(h_ptr, bias_ptr, expert_ptr, rows, col_block, n_rows, inter, stride_h, stride_b,
             INTERLEAVED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Gate and up [BLOCK_M, BLOCK_N] of the column block, float32, with the rows' expert biases added."""
    row_mask = rows < n_rows
    experts = tl.load(expert_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    h_row = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    b_row = bias_ptr + experts[:, None] * stride_b
    if INTERLEAVED:
        cols, col_mask = _pair_columns(col_block, inter, BLOCK_N)
        mask = row_mask[:, None] & col_mask[None, :]
        pairs = tl.load(h_row + cols[None, :], mask=mask, other=0.0).to(tl.float32) + \
            tl.load(b_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gate, up = tl.split(tl.reshape(pairs, (BLOCK_M, BLOCK_N, 2)))
    else:
        cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < inter)[None, :]
        gate = tl.load(h_row + cols[None, :], mask=mask, other=0.0).to(tl.float32) + \
            tl.load(b_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_row + inter + cols[None, :], mask=mask, other=0.0).to(tl.float32) + \
            tl.load(b_row + inter + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return gate, up


@triton.jit
def _swiglu_fwd_kernel(h_ptr, bias_ptr, expert_ptr, act_ptr, n_rows, inter, stride_h, stride_b, stride_act, alpha,
                       limit, INTERLEAVED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    gate, up = _gate_up(h_ptr, bias_ptr, expert_ptr, rows, tl.program_id(1), n_rows, inter, stride_h, stride_b,
                        INTERLEAVED, BLOCK_M, BLOCK_N)
    gate = tl.minimum(gate, limit, propagate_nan=tl.PropagateNan.ALL)  # a NaN stays NaN, as in torch's clamp
    up = tl.minimum(tl.maximum(up, -limit, propagate_nan=tl.PropagateNan.ALL), limit,
                    propagate_nan=tl.PropagateNan.ALL)
    act = (up + 1.0) * gate * tl.sigmoid(alpha * gate)
    tl.store(act_ptr + rows.to(tl.int64)[:, None] * stride_act + cols[None, :], act.to(act_ptr.dtype.element_ty),
             mask=(rows < n_rows)[:, None] & (cols < inter)[None, :])


@triton.jit
def _swiglu_bwd_kernel(h_ptr, bias_ptr, expert_ptr, grad_act_ptr, grad_h_ptr, n_rows, inter, stride_h, stride_b,
                       stride_grad_act, stride_grad_h, alpha, limit, INTERLEAVED: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    gate, up = _gate_up(h_ptr, bias_ptr, expert_ptr, rows, tl.program_id(1), n_rows, inter, stride_h, stride_b,
                        INTERLEAVED, BLOCK_M, BLOCK_N)
    grad = tl.load(grad_act_ptr + rows.to(tl.int64)[:, None] * stride_grad_act + cols[None, :],
                   mask=row_mask[:, None] & (cols < inter)[None, :], other=0.0).to(tl.float32)
    gate_clamped = tl.minimum(gate, limit, propagate_nan=tl.PropagateNan.ALL)
    up_clamped = tl.minimum(tl.maximum(up, -limit, propagate_nan=tl.PropagateNan.ALL), limit,
                            propagate_nan=tl.PropagateNan.ALL)
    sig = tl.sigmoid(alpha * gate_clamped)
    grad_up = tl.where((up >= -limit) & (up <= limit), grad * gate_clamped * sig, 0.0)
    grad_gate = grad * (up_clamped + 1.0) * sig * (1.0 + alpha * gate_clamped * (1.0 - sig))
    grad_gate = tl.where(gate <= limit, grad_gate, 0.0)
    out = grad_h_ptr + rows.to(tl.int64)[:, None] * stride_grad_h
    if INTERLEAVED:
        pair_cols, col_mask = _pair_columns(tl.program_id(1), inter, BLOCK_N)
        pairs = tl.reshape(tl.join(grad_gate, grad_up), (BLOCK_M, 2 * BLOCK_N))
        tl.store(out + pair_cols[None, :], pairs.to(grad_h_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])
    else:
        mask = row_mask[:, None] & (cols < inter)[None, :]
        tl.store(out + cols[None, :], grad_gate.to(grad_h_ptr.dtype.element_ty), mask=mask)
        tl.store(out + inter + cols[None, :], grad_up.to(grad_h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_weight_fwd_kernel(y_ptr, bias_ptr, expert_ptr, w_ptr, out_ptr, n_rows, n_cols, stride_y, stride_b,
                            stride_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    experts = tl.load(expert_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    w = tl.load(w_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + experts[:, None] * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = (y + b) * w[:, None]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _bias_weight_bwd_kernel(grad_ptr, y_ptr, bias_ptr, expert_ptr, w_ptr, grad_y_ptr, grad_w_ptr, n_rows, n_cols,
                            stride_grad, stride_y, stride_b, stride_grad_y, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    experts = tl.load(expert_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    w = tl.load(w_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    rows64 = rows.to(tl.int64)[:, None]
    dot = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        g = tl.load(grad_ptr + rows64 * stride_grad + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows64 * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + experts[:, None] * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_y_ptr + rows64 * stride_grad_y + cols[None, :], (g * w[:, None]).to(grad_y_ptr.dtype.element_ty),
                 mask=mask)
        dot += tl.sum(g * (y + b), 1)
    tl.store(grad_w_ptr + rows, dot.to(grad_w_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _segment_sum_kernel(x_ptr, group_ends_ptr, out_ptr, n_cols, stride_x, stride_out, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    expert = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    end = tl.load(group_ends_ptr + expert).to(tl.int64)
    start = tl.load(group_ends_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for first in range(start, end, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        mask = (rows < end)[:, None] & col_mask[None, :]
        acc += tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + expert * stride_out + cols, tl.sum(acc, 0).to(out_ptr.dtype.element_ty), mask=col_mask)


def _rows_major(t: torch.Tensor) -> torch.Tensor:
    """The kernels index a row by its stride and the columns as consecutive."""
    return t if t.stride(-1) == 1 else t.contiguous()


def bias_swiglu(h: torch.Tensor, bias: torch.Tensor, row_expert: torch.Tensor, alpha: float, limit: float,
                interleaved: bool) -> torch.Tensor:
    """The clamped SwiGLU of ``h + bias[row_expert]`` (``h`` [M, 2I], ``bias`` [E, 2I]) → [M, I] in h's dtype."""
    h, bias = _rows_major(h), _rows_major(bias)
    n_rows, inter = h.shape[0], h.shape[1] // 2
    act = torch.empty(n_rows, inter, dtype=h.dtype, device=h.device)
    if n_rows and inter:
        grid = (triton.cdiv(n_rows, BLOCK_M), triton.cdiv(inter, BLOCK_N))
        _swiglu_fwd_kernel[grid](h, bias, row_expert, act, n_rows, inter, h.stride(0), bias.stride(0), act.stride(0),
                                 alpha, limit, INTERLEAVED=interleaved, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                 num_warps=NUM_WARPS)
    return act


def bias_swiglu_grad(grad_act: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, row_expert: torch.Tensor,
                     alpha: float, limit: float, interleaved: bool) -> torch.Tensor:
    """The gradient w.r.t. ``h`` (and ``h + bias[row_expert]``) [M, 2I] in h's dtype of :func:`bias_swiglu`, from
    ``grad_act`` [M, I]."""
    h, bias, grad_act = _rows_major(h), _rows_major(bias), _rows_major(grad_act)
    n_rows, inter = grad_act.shape
    grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if n_rows and inter:
        grid = (triton.cdiv(n_rows, BLOCK_M), triton.cdiv(inter, BLOCK_N))
        _swiglu_bwd_kernel[grid](h, bias, row_expert, grad_act, grad_h, n_rows, inter, h.stride(0), bias.stride(0),
                                 grad_act.stride(0), grad_h.stride(0), alpha, limit, INTERLEAVED=interleaved,
                                 BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    return grad_h


def bias_weight(y: torch.Tensor, bias: torch.Tensor, row_expert: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(y + bias[row_expert])·weights[:, None]`` (``y`` [M, H], ``bias`` [E, H], ``weights`` [M]) in y's dtype."""
    y, bias, weights = _rows_major(y), _rows_major(bias), weights.contiguous()
    n_rows, n_cols = y.shape
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if n_rows and n_cols:
        grid = (triton.cdiv(n_rows, BLOCK_M), triton.cdiv(n_cols, BLOCK_N))
        _bias_weight_fwd_kernel[grid](y, bias, row_expert, weights, out, n_rows, n_cols, y.stride(0), bias.stride(0),
                                      out.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    return out


def bias_weight_grad(grad: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, row_expert: torch.Tensor,
                     weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`bias_weight` from ``grad`` [M, H]: w.r.t. ``y`` (and ``y + bias[row_expert]``),
    ``grad·w`` in y's dtype, and w.r.t. ``weights``, ``Σ_j grad·(y + b)`` per row accumulated in float32, in the
    weights' dtype."""
    grad, y, bias, weights = _rows_major(grad), _rows_major(y), _rows_major(bias), weights.contiguous()
    n_rows, n_cols = y.shape
    grad_y = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    grad_w = torch.empty_like(weights)
    if n_rows and n_cols:
        _bias_weight_bwd_kernel[(triton.cdiv(n_rows, WEIGHT_BLOCK_M),)](
            grad, y, bias, row_expert, weights, grad_y, grad_w, n_rows, n_cols, grad.stride(0), y.stride(0),
            bias.stride(0), grad_y.stride(0), BLOCK_M=WEIGHT_BLOCK_M, BLOCK_N=WEIGHT_BLOCK_N, num_warps=NUM_WARPS)
    return grad_y, grad_w


def segment_sum(rows: torch.Tensor, group_ends: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each expert's sum of its rows [E, N] in ``dtype``, accumulated in float32: ``rows`` [M, N] sorted by expert,
    ``group_ends`` [E] int32 cumulative row counts (an expert without rows gets 0)."""
    rows = _rows_major(rows)
    experts, n_cols = group_ends.shape[0], rows.shape[1]
    out = torch.empty(experts, n_cols, dtype=dtype, device=rows.device)
    if experts and n_cols:
        _segment_sum_kernel[(experts, triton.cdiv(n_cols, SUM_BLOCK_N))](
            rows, group_ends, out, n_cols, rows.stride(0), out.stride(0), BLOCK_M=SUM_BLOCK_M, BLOCK_N=SUM_BLOCK_N,
            num_warps=NUM_WARPS)
    return out
