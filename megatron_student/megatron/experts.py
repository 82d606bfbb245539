"""MoE experts as grouped GEMMs for Megatron's token dispatchers.

``GroupedExperts`` is Megatron-Core's ``SequentialMLP`` (same per-expert ``MLP`` submodules, parameters, state-dict
keys and ``sharded_state_dict``, so checkpoints, converters and resharding cannot tell the two apart) with another
``forward``: the dispatcher's expert-sorted rows go through ``ops.moe.expert_mlp_grouped`` (two grouped GEMMs over
all local experts, clamped SwiGLU, both biases: the ``ClampedSwiGLU`` activation module's limit,
``ops.moe.SWIGLU_ALPHA``) instead of a Python loop with a host sync for the counts. The
experts' [out, in] weights are stacked to [E, out, in] per forward; weights that need no gradient (the frozen
teacher, evaluation) are kept in one contiguous buffer per kind so the stack is a view, not a copy.
"""

from __future__ import annotations

from operator import attrgetter

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from ..ops.moe import SWIGLU_ALPHA, ExpertActivation, expert_mlp_grouped

EXPERT_IMPLEMENTATIONS = ("auto", "grouped", "sequential")


class GroupedExperts(SequentialMLP):
    """All local experts in two grouped GEMMs; expert TP 1 (as ``ParallelConfig`` enforces: biased experts)."""

    _WEIGHTS = ("linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight", "linear_fc2.bias")

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection)
        if self.tp_group.size() != 1:
            raise ValueError(f"GroupedExperts: expert tensor parallelism {self.tp_group.size()} is not supported "
                             "(biased experts need expert TP 1)")
        if self.config.moe_apply_probs_on_input:
            raise ValueError("GroupedExperts: moe_apply_probs_on_input is not supported (gpt-oss weights the "
                             "expert outputs)")
        self._pack_weights()

    def _local(self, name: str) -> list[torch.Tensor]:
        get = attrgetter(name)  # looked up per call: a converter may swap the Parameter objects
        return [get(expert) for expert in self.local_experts]

    @torch.no_grad()
    def _pack_weights(self) -> None:
        """Put each kind of expert parameter (fc1 weight, …) of all local experts into one [E, …] buffer; every
        parameter stays its own ``Parameter`` (a view of the buffer), so nothing else changes. Moving or casting
        the model later gives the parameters new storage: ``_stacked`` then copies instead."""
        for name in self._WEIGHTS:
            params = self._local(name)
            packed = torch.stack([p.data for p in params])
            for p, view in zip(params, packed.unbind(0)):
                p.data = view

    def _stacked(self, name: str) -> torch.Tensor:
        params = self._local(name)
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            view = _consecutive_view(params)
            if view is not None:
                return view
        return torch.stack(params)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        """Rows [M, H] sorted by local expert, ``tokens_per_expert`` [E_local] (host or device), ``permuted_probs``
        [M] → (weighted expert outputs [M, H], None): the contract of ``SequentialMLP.forward``."""
        rows = permuted_local_hidden_states
        counts = torch.as_tensor(tokens_per_expert).to(device=rows.device, dtype=torch.int32, non_blocking=True)
        group_ends = counts.cumsum(0, dtype=torch.int32)
        row_expert = torch.repeat_interleave(torch.arange(self.num_local_experts, device=rows.device), counts,
                                             output_size=rows.shape[0])  # output_size: no host sync
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = (self._stacked(name) for name in self._WEIGHTS)
        activation = ExpertActivation("stacked", SWIGLU_ALPHA, self.local_experts[0].activation_func.limit)
        out = expert_mlp_grouped(rows, group_ends, row_expert, permuted_probs, fc1_weight.transpose(1, 2), fc1_bias,
                                 fc2_weight.transpose(1, 2), fc2_bias, activation)
        return out, None


def _consecutive_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors as one [len, …] view when they lie back to back in one storage (contiguous, same shape and
    dtype); None otherwise."""
    first = tensors[0]
    if not first.is_contiguous():
        return None
    storage, size = first.untyped_storage().data_ptr(), first.numel()
    for j, t in enumerate(tensors):
        if t.shape != first.shape or t.dtype != first.dtype or not t.is_contiguous() or \
                t.untyped_storage().data_ptr() != storage or t.storage_offset() != first.storage_offset() + j * size:
            return None
    return first.as_strided((len(tensors), *first.shape), (size, *first.stride()), first.storage_offset())
