"""Token dispatch without host synchronisation for expert parallelism 1.

At EP = 1 (expert TP is always 1 here) Megatron-Core's allgather and alltoall dispatchers communicate nothing: each
rank routes its own tokens (its sequence shard under sequence parallelism) to all experts, which it holds. Their
local work still reads the host: ``permute`` selects the routed tokens with ``masked_select`` over the [tokens,
experts] routing map (a ``nonzero`` and a stream sync each, for the tokens and again for the probabilities), and
the per-expert counts come back with ``.cpu()``/``.tolist()``. :class:`SortedTokenDispatcher` keeps everything on
the device: the router's k experts per token are sorted by expert (``ops.moe.ExpertSort``, the permutation the HF
modules use too), the rows gathered, the experts run on device counts (``GroupedExperts``: ``grouped_mm`` takes
device offsets), and each token's k weighted outputs are summed back. The sorted order is the one ``permute``
produces (expert-major, tokens ascending), so the experts see the same rows; only the final sum over a token's k
outputs runs in another order.

Megatron's ``MoELayer`` (its router, experts, forward, recompute and checkpoint layout) runs with that dispatcher;
the model builder installs it (:func:`install_sorted_dispatch`) when ``ParallelConfig.token_dispatcher`` is
``sorted`` (``parallel.dispatcher: auto`` at EP = 1). Router statistics and the router's own losses see the
router's output, which the dispatcher does not change.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from ..ops.moe import ExpertSort
from .layers import GptOssRouter


def routed_experts(probs: torch.Tensor, routing_map: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [N, k], expert indices [N, k]) from a router's dense output, probs [N, E] (≥ 0) and routing_map
    [N, E] with exactly k experts per token: the selected entries are the k largest once every other entry is set
    below zero. Differentiable in ``probs`` (the gradient reaches the selected entries only, as ``masked_select``'s)."""
    return probs.masked_fill(~routing_map, -1.0).topk(top_k, dim=1)


class SortedTokenDispatcher(MoETokenDispatcher):
    """Megatron's dispatcher contract (``MoELayer.forward`` calls the six steps) for EP = 1, with no host sync:
    ``dispatch_postprocess`` gives the experts their rows sorted by expert, the per-expert counts as a device tensor
    and each row's routing weight; ``combine_preprocess`` sums every token's k weighted expert outputs."""

    def __init__(self, num_local_experts: int, config, pg_collection):
        super().__init__(config=config, pg_collection=pg_collection)
        if self.ep_size != 1 or self.tp_size != 1:
            raise ValueError(f"the sorted token dispatcher needs expert parallelism 1 and expert TP 1, got EP "
                             f"{self.ep_size}, expert TP {self.tp_size}: use the allgather or alltoall dispatcher")
        if config.moe_expert_capacity_factor is not None or config.moe_pad_expert_input_to_capacity:
            raise ValueError("the sorted token dispatcher routes every token (no expert capacity, no padding)")
        self.num_local_experts = num_local_experts
        self.top_k = config.moe_router_topk
        self.sort: ExpertSort | None = None

    def dispatch_preprocess(self, tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        """[s, b, H] tokens → ([s·b, H], routing weights [s·b, k]); sorts the (token, slot) pairs by expert."""
        self.hidden_shape = tokens.shape
        weights, experts = routed_experts(probs, routing_map, self.top_k)
        self.sort = ExpertSort.of(experts, self.num_local_experts)
        return tokens.view(-1, tokens.shape[-1]), weights

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        return hidden_states, probs  # every expert is local

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        return self.sort.rows(hidden_states), self.sort.counts, self.sort.row_weights(probs)

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.sort.combine(hidden_states)
        self.sort = None
        return out

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.view(self.hidden_shape)


def install_sorted_dispatch(model: torch.nn.Module) -> None:
    """Give every ``MoELayer`` of ``model`` a :class:`SortedTokenDispatcher` in place of the one Megatron built
    from ``config.moe_token_dispatcher_type`` (same process groups). A module swap after the
    build, not a ``MoELayer`` subclass in the spec: ``TransformerLayer`` hands its process groups only to the exact
    Megatron MLP classes. The routers must give exactly k experts per token (``GptOssRouter``)."""
    for name, module in model.named_modules():
        if not isinstance(module, MoELayer):
            continue
        if not isinstance(module.router, GptOssRouter):
            raise TypeError(f"{name}: the sorted token dispatch needs a router with exactly top-k experts per token "
                            f"(GptOssRouter), got {type(module.router).__name__}")
        built = module.token_dispatcher
        groups = SimpleNamespace(ep=built.ep_group, expt_tp=built.tp_group, tp_ep=built.tp_ep_group)
        module.token_dispatcher = SortedTokenDispatcher(module.num_local_experts, module.config, groups)
