"""Per-rank bodies of the distributed Megatron tests (run through ``megatron_harness.run_distributed``)."""

from __future__ import annotations

import os

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_harness import VOCAB, hf_student, hf_teacher
from megatron_student.megatron import ParallelConfig, build_student, build_teacher, initialize_parallel, load_hf_weights


def batch(seed: int, batch_size: int = 2, length: int = 32):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch_size, length + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def packed(seed: int, lengths=(13, 19)):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    return docs, torch.cat(docs)[None], params


def build(which: str, plan, tp: int, ep: int, seed: int, experts: str = "auto", dispatcher: str = "auto"):
    """Process groups for (tp, ep) and a Megatron model (``experts``, ``dispatcher``: ParallelConfig's) holding the
    seed's random HF weights."""
    parallel = ParallelConfig(tensor_parallel=tp, expert_parallel=ep, experts=experts, dispatcher=dispatcher)
    initialize_parallel(parallel)
    hf = hf_student(plan, seed=seed) if which == "student" else hf_teacher(seed=seed)
    model = build_student(hf.config, parallel) if which == "student" else build_teacher(hf.config, parallel)
    load_hf_weights(model, hf.state_dict())
    return model


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """[b, s, V/TP] vocab shards → [b, s, VOCAB] (padding dropped)."""
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(group.size())]
    torch.distributed.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :VOCAB].detach()


def gather_params(model: torch.nn.Module, attr: str) -> dict[str, torch.Tensor]:
    """Global tensors (``attr`` of every parameter: "data" or "main_grad") in Megatron's global layout: TP shards
    concatenated on their partition axis, local experts renamed to their global index."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    ep_group = parallel_state.get_expert_model_parallel_group()
    out = {}
    for name, p in model.named_parameters():
        value = getattr(p, attr).detach().clone()  # main_grad is a view of DDP's buffer
        if ".local_experts." in name:
            head, tail = name.split(".local_experts.")
            local, rest = tail.split(".", 1)
            parts = [None] * ep_group.size()
            torch.distributed.all_gather_object(parts, {int(local): value}, group=ep_group)
            n_local = len(model.get_submodule(f"{head}.local_experts"))
            for ep_rank, part in enumerate(parts):
                for j, tensor in part.items():
                    out[f"{head}.experts.{ep_rank * n_local + j}.{rest}"] = tensor
        elif getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(value) for _ in range(tp_group.size())]
            torch.distributed.all_gather(parts, value.contiguous(), group=tp_group)
            out[name] = torch.cat(parts, dim=p.partition_dim)
        else:
            out[name] = value
    return out


def train_worker(rank: int, world: int, which: str, plan, tp: int, ep: int, seed: int, steps: int,
                 experts: str = "auto"):
    """Forward with labels, backward through Megatron DDP + finalize_model_grads, then ``steps`` AdamW steps on the
    reduced gradients (torch's AdamW: Megatron's FP32Optimizer allocates on 'cuda' by name). Returns logits,
    packed-input logits, mean loss and gathered gradients of step 0, and after the steps every copy of each
    replicated parameter (TP group for dense, expert-data-parallel group for experts)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    model = build(which, plan, tp, ep, seed, experts)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    tokens, labels = batch(seed + 100)
    _, sequence, params = packed(seed + 200)
    result = {}
    for step in range(max(steps, 1)):
        ddp.zero_grad_buffer()
        ddp.train()
        losses = ddp(tokens, None, None, labels=labels)
        loss = losses.float().mean()
        loss.backward()
        finalize_model_grads([ddp])
        if step == 0:
            ddp.eval()
            with torch.no_grad():
                result["logits"] = gather_logits(ddp(tokens, None, None))
                if sequence.shape[1] % tp == 0:
                    result["packed"] = gather_logits(ddp(sequence, None, None, packed_seq_params=params))
            result["loss"] = loss.detach()
            result["grads"] = gather_params(model, "main_grad")
        if steps:
            for p in model.parameters():
                p.grad = p.main_grad
            optimizer.step()
    if steps:  # TP-replicated parameters across the TP group; experts across their expert-data-parallel group
        tp_group = parallel_state.get_tensor_model_parallel_group()
        edp_group = parallel_state.get_expert_data_parallel_group()
        replicated = {}
        for name, p in model.named_parameters():
            expert = ".local_experts." in name
            if expert or not getattr(p, "tensor_model_parallel", False):
                group = edp_group if expert else tp_group
                parts = [torch.empty_like(p.data) for _ in range(group.size())]
                torch.distributed.all_gather(parts, p.data.contiguous(), group=group)
                replicated[name] = parts
        result["replicated_after_steps"] = replicated
    return result if rank == 0 else {"replicated_after_steps": result.get("replicated_after_steps")}


def packed_worker(rank: int, world: int, which: str, plan, seed: int):
    """TP = 1: logits of two packed documents and of each document alone."""
    model = build(which, plan, 1, 1, seed)
    model.eval()
    docs, sequence, params = packed(seed + 200)
    with torch.no_grad():
        together = gather_logits(model(sequence, None, None, packed_seq_params=params))
        alone = [gather_logits(model(doc[None], None, None)) for doc in docs]
    return {"together": together, "alone": alone}


def checkpoint_worker(rank: int, world: int, which: str, plan, seed: int, directory: str, layouts):
    """Save a torch_dist checkpoint at layouts[0], then for each next layout: rebuild from a different random seed,
    load the previous checkpoint, record logits and save again. A layout is (tp, ep), (tp, ep, experts) or
    (tp, ep, experts, dispatcher).
    Returns the logits of every layout."""
    from megatron.core import dist_checkpointing

    tokens, _ = batch(seed + 300)
    logits = []
    for index, (tp, ep, *experts) in enumerate(layouts):
        model = build(which, plan, tp, ep, seed if index == 0 else seed + 1 + index, *experts)
        if index > 0:
            state = dist_checkpointing.load(model.sharded_state_dict(), f"{directory}/ckpt{index - 1}")
            model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            logits.append(gather_logits(model(tokens, None, None)))
        path = f"{directory}/ckpt{index}"
        if rank == 0:
            os.makedirs(path)
        torch.distributed.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), path)
        torch.distributed.barrier()
    return logits


def parity_worker(rank: int, world: int, plans: dict, seed: int):
    """TP = EP = 1, fp32: (Megatron, HF) logits for the teacher and each student plan on the same weights."""
    tokens, _ = batch(seed + 400, length=40)  # 40 positions: five times the window of 8
    pairs = {}
    for name, plan in [("teacher", None), *plans.items()]:
        which = "teacher" if name == "teacher" else "student"
        model = build(which, plan, 1, 1, seed)
        model.eval()
        hf = hf_teacher(seed=seed) if which == "teacher" else hf_student(plan, seed=seed)
        with torch.no_grad():
            pairs[name] = (gather_logits(model(tokens, None, None)), hf(tokens).logits)
    return pairs


def activation_worker(rank: int, world: int, seed: int):
    """One expert MLP built twice on the same weights: with our ClampedSwiGLU spec activation, and with Megatron's
    own GLU path (quick_gelu, clamp 7, linear offset 1). Returns both outputs and input gradients."""
    import dataclasses

    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.fusions.fused_bias_geglu import quick_gelu

    from megatron_student.megatron.layers import ClampedSwiGLU
    from megatron_student.megatron.model import transformer_config

    from megatron_harness import teacher_config

    initialize_parallel(ParallelConfig())
    ours_config = transformer_config(teacher_config(), ParallelConfig())
    megatron_config = dataclasses.replace(
        ours_config, use_te_activation_func=False, activation_func=quick_gelu, glu_linear_offset=1.0,
        activation_func_clamp_value=7.0)
    outputs = []
    x = torch.randn(50, ours_config.hidden_size, generator=torch.Generator().manual_seed(seed)) * 3
    scale = torch.rand(50, generator=torch.Generator().manual_seed(seed + 1))
    state = None
    for config, activation in ((ours_config, ModuleSpec(ClampedSwiGLU, params={"limit": 7.0})), (megatron_config, None)):
        mlp = MLP(config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear,
                                        activation_func=activation),
                  is_expert=True, ffn_hidden_size=config.moe_ffn_hidden_size)
        if state is None:
            torch.manual_seed(seed)
            with torch.no_grad():
                for p in mlp.parameters():
                    p.normal_(0, 1.0)
            state = mlp.state_dict()
        mlp.load_state_dict(state)
        xi = x.clone().requires_grad_(True)
        out, _ = mlp(xi, scale)
        out.sum().backward()
        outputs.append((out.detach(), xi.grad))
    return outputs


def compat_worker(rank: int, world: int):
    """compat.apply() twice (idempotent), then Megatron's own router gating on CPU (NameError without the fix)."""
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer.moe import moe_utils

    from megatron_student.megatron import compat

    compat.apply()
    patched = layers.reduce_from_tensor_model_parallel_region
    compat.apply()
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    logits = moe_utils.router_gating_linear(x, w, None, torch.float32)
    logits.sum().backward()
    return logits.detach(), (x @ w.t()).detach(), w.grad is not None, layers.reduce_from_tensor_model_parallel_region is patched


def grouped_experts_worker(rank: int, world: int, seed: int):
    """TP = EP = 1: the teacher built with SequentialMLP and with GroupedExperts on the same weights. Returns, per
    implementation: logits and parameter gradients of a random-weighted logit sum; for the layer-0 experts called
    directly on expert-sorted rows with an expert that gets no rows, in fp32 and bf16: the output, the gradients of
    rows, probabilities and parameters, and (grouped only) the no-grad output and whether it read the weights through
a view of the packed buffer (fp32: as built) instead of a stacked copy (bf16: ``to`` gave new storage)."""
    tokens, _ = batch(seed + 500)
    out = {}
    for experts in ("sequential", "grouped"):
        model = build("teacher", None, 1, 1, seed, experts)
        logits = model(tokens, None, None)
        weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
        (logits * weight).sum().backward()
        result = {"logits": logits.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}}
        module = model.decoder.layers[0].mlp.experts
        g = torch.Generator().manual_seed(seed + 1)
        counts = torch.tensor([7, 0, 12, 5])
        rows = torch.randn(int(counts.sum()), model.config.hidden_size, generator=g)
        probs = torch.rand(int(counts.sum()), generator=g)
        grad_out = torch.randn(rows.shape, generator=g)
        for dtype in (torch.float32, torch.bfloat16):
            module.zero_grad()
            module.to(dtype)
            x, p = rows.to(dtype, copy=True).requires_grad_(True), probs.clone().requires_grad_(True)
            y, bias = module(x, counts, p)
            assert bias is None
            y.backward(grad_out.to(dtype))
            result[dtype] = {"out": y.detach(), "rows": x.grad, "probs": p.grad,
                             "params": {n: q.grad.clone() for n, q in module.named_parameters()}}
            if experts == "grouped":
                with torch.no_grad():
                    result[dtype]["no_grad"] = module(x, counts, p)[0]
                    stacked = module._stacked("linear_fc1.weight")  # a view of the packed buffer, not a copy?
                    result[dtype]["view"] = stacked.data_ptr() == module.local_experts[0].linear_fc1.weight.data_ptr()
        out[experts] = result
    return out


def dispatch_worker(rank: int, world: int, which: str, plan, tp: int, seed: int, experts: str):
    """EP = 1, TP = ``tp``, fp32: the model built with Megatron's allgather dispatcher and with the sorted one on the
    same weights. Per dispatcher (every rank): logits of a packed two-document batch, the gradients of a random-weighted
    logit sum (gathered to the global layout), the router statistics of that forward (``RouterStats`` counts), and
    for layer 0's MoE layer called directly: its output and the gradients of its input and router probabilities."""
    from megatron_student.megatron.dispatch import SortedTokenDispatcher
    from megatron_student.train.metrics import RouterStats

    _, sequence, params = packed(seed + 200, lengths=(21, 43))
    out = {}
    for dispatcher in ("allgather", "sorted"):
        model = build(which, plan, tp, 1, seed, experts, dispatcher)
        layer = model.decoder.layers[0].mlp
        assert isinstance(layer.token_dispatcher, SortedTokenDispatcher) == (dispatcher == "sorted")
        stats = RouterStats(model, min_entropy=0.0)
        logits = model(sequence, None, None, packed_seq_params=params)
        weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed + tp))
        (logits * weight).sum().backward()
        counts = {name: c.clone() for name, c in stats.counts.items()}
        stats.remove()
        for p in model.parameters():
            p.main_grad = p.grad
        result = {"logits": gather_logits(logits), "grads": gather_params(model, "main_grad"), "router": counts}
        g = torch.Generator().manual_seed(seed + 7)
        x = torch.randn(24, 1, model.config.hidden_size, generator=g, requires_grad=True)
        probs = []
        handle = layer.router.register_forward_hook(lambda m, a, o: o[0].retain_grad() or probs.append(o[0]))
        y, bias = layer(x)
        handle.remove()
        y.backward(torch.randn(y.shape, generator=g))
        result["layer"] = {"out": y.detach(), "bias": bias, "x": x.grad, "probs": probs[0].grad}
        out[dispatcher] = result
    return out


def packed_documents_worker(rank: int, world: int, which: str, plan, seed: int):
    """TP = 1: logits and gradients of two packed documents given as Megatron's ``PackedSeqParams`` and as
    ``PackedDocuments`` (boundaries also on the host), on the same model."""
    from megatron_student.megatron.attention import PackedDocuments

    model = build(which, plan, 1, 1, seed)
    _, sequence, params = packed(seed + 200, lengths=(21, 43))
    out = []
    for packed_seq_params in (params, PackedDocuments.of(params.cu_seqlens_q, sequence.device)):
        model.zero_grad()
        logits = model(sequence, None, None, packed_seq_params=packed_seq_params)
        logits.square().mean().backward()
        out.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    return out


def grad_accumulation_worker(rank: int, world: int, seed: int):
    """Two micro-batches through Megatron's DDP and through ``AccumulatingDDP`` (its kernel taken for every tensor of
    at least 256 elements; Triton's interpreter on the CPU) on two copies of one student: the reduced main grads of
    both. Also one bf16 gradient added by the kernel and by ``add_``."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_student.megatron.grad_accumulation import AccumulatingDDP, accumulate_, fast_accumulation_applies

    class SmallTensorsToo(AccumulatingDDP):
        min_elements = 256

    grads, taken = {}, 0
    for name, wrapper in (("megatron", DistributedDataParallel), ("accumulating", SmallTensorsToo)):
        model = build("student", None, 1, 1, seed)
        ddp = wrapper(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        ddp.zero_grad_buffer()
        for micro in range(2):
            tokens, labels = batch(seed + 100 + micro)
            ddp(tokens, None, None, labels=labels).float().mean().backward()
        finalize_model_grads([ddp])
        grads[name] = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
        if name == "accumulating":
            taken = sum(fast_accumulation_applies(p.main_grad, p.main_grad, SmallTensorsToo.min_elements)
                        for p in model.parameters())
            flags = {n: p.grad_added_to_main_grad for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    main = torch.randn(5000, generator=g)
    grad = torch.randn(5000, generator=g).to(torch.bfloat16)
    by_kernel, by_add = main.clone(), main.clone()
    accumulate_(by_kernel, grad, min_elements=1)
    by_add.add_(grad)
    return {"grads": grads, "taken": taken, "flags": flags, "bf16": (by_kernel, by_add)}
