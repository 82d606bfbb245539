"""Layouts that decide which GPU kernels the distillation step runs (issue 18), checked on CPU: every linear layer of
the frozen teacher gets an input that ``torch.matmul`` folds into one 2-D mm, and the MoE token permutation's
backward is an index_add (no sort-based index_put)."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_harness import run_distributed
from megatron_harness_workers import batch, build


def _foldable(x: torch.Tensor) -> bool:
    """torch.matmul's condition for viewing [..., K] as one [rows, K] matrix (no copy): the leading dims nest."""
    return all(x.stride(i) == x.stride(i + 1) * x.shape[i + 1] for i in range(x.dim() - 2))


def frozen_teacher_linear_inputs_worker(rank: int, world: int, seed: int):
    model = build("teacher", None, 1, 1, seed).eval().requires_grad_(False)
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = (tuple(args[0].shape), _foldable(args[0]))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            module.register_forward_pre_hook(record(name))
    tokens, _ = batch(seed, batch_size=1)
    with torch.no_grad():
        model(tokens, None, None)
    return seen


def test_frozen_teacher_linear_inputs_fold_into_one_mm():
    # LinearWithFrozenWeight runs torch.matmul(input, weight.t()); an input whose leading dims do not nest (the
    # attention output transposed to [S, 1, F]) made it a batched matmul of S vector-matrix products on the GPU
    seen = run_distributed(frozen_teacher_linear_inputs_worker, 1, 0)[0]
    assert any(name.endswith("o_proj") for name in seen) and any(name.endswith("output_layer") for name in seen)
    bad = {name: shape for name, (shape, ok) in seen.items() if not ok}
    assert not bad, f"teacher linear inputs torch.matmul would not fold into one mm: {bad}"


def _backward_nodes(t: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_grouped_experts_permute_tokens_without_sorting_or_atomics():
    # x[idx]'s backward (IndexBackward0) is a sorting index_put on the GPU, index_select's an index_add with atomics:
    # the tokens' rows are gathered by _SortedRows (backward: a permutation and a sum over the k slots), the routing
    # weights by index_select
    from megatron_student.ops.moe import experts_forward_grouped, router_topk_softmax

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g, requires_grad=True)
    weights, indices = router_topk_softmax(torch.randn(16, 4, generator=g, requires_grad=True), 2)
    params = [torch.randn(4, 8, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(4, 8, 8, generator=g),
              torch.randn(4, 8, generator=g)]
    nodes = _backward_nodes(experts_forward_grouped(x, indices, weights, *params))
    assert {"_SortedRowsBackward", "IndexSelectBackward0"} <= nodes and "IndexBackward0" not in nodes, sorted(nodes)
