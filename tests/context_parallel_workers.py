"""Per-rank bodies of the context-parallel layer tests (run through ``megatron_harness.run_distributed``), and the
layer problems they share with the single-process reference: parameters and inputs drawn from a seed (float64 on the
CPU), the whole packed sequence on every rank, each rank computing its contiguous chunk."""

from __future__ import annotations

import torch

from megatron_student.ops.context_parallel import context_parallel_split, sliding_window_halo
from megatron_student.ops.layers import kda_layer, swa_tpa_layer
from megatron_student.ops.rope import rope_cos_sin, token_positions
from megatron_student.ops.tpa import TpaProjection

HIDDEN, HEADS, HEAD_DIM = 16, 4, 8
KDA_QK_HEADS, KDA_V_HEADS, CONV = 2, 4, 4  # GVA: two value heads per q/k head
TPA_RANK, SINKS_HEADS, WINDOW = 2, HEADS, 8
DTYPE = torch.float64


def _linear(g: torch.Generator, out: int, inp: int, bias: bool = True) -> torch.nn.Linear:
    layer = torch.nn.Linear(inp, out, bias=bias, dtype=DTYPE)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out, inp, generator=g, dtype=DTYPE) / inp**0.5)
        if bias:
            layer.bias.copy_(0.3 * torch.randn(out, generator=g, dtype=DTYPE))
    return layer


def _param(value: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(value.to(DTYPE))


def kda_problem(seed: int, hidden: int = HIDDEN, head_dim: int = HEAD_DIM):
    """A KDA layer's parameters (modules and tensors, float64) and its call ``layer(x, cp) -> out``. The default
    gate with slow decays (≈ 0.03 a token), so states carried over several chunks still matter."""
    g = torch.Generator().manual_seed(seed)
    qk, vd = KDA_QK_HEADS * head_dim, KDA_V_HEADS * head_dim
    mods = torch.nn.ModuleDict({
        "q": _linear(g, qk, hidden), "k": _linear(g, qk, hidden), "v": _linear(g, vd, hidden),
        "f_a": _linear(g, head_dim, hidden, bias=False), "f_b": _linear(g, KDA_V_HEADS * head_dim, head_dim),
        "beta": _linear(g, KDA_V_HEADS, hidden), "gate": _linear(g, vd, hidden), "o": _linear(g, hidden, vd)})
    params = torch.nn.ParameterDict({
        "q_conv": _param(torch.randn(qk, CONV, generator=g, dtype=DTYPE) / CONV**0.5),
        "k_conv": _param(torch.randn(qk, CONV, generator=g, dtype=DTYPE) / CONV**0.5),
        "v_conv": _param(torch.randn(vd, CONV, generator=g, dtype=DTYPE) / CONV**0.5),
        "A_log": _param(-1.5 + 0.5 * torch.randn(KDA_V_HEADS, generator=g, dtype=DTYPE)),
        "dt_bias": _param(-2.0 + 0.5 * torch.randn(KDA_V_HEADS * head_dim, generator=g, dtype=DTYPE)),
        "o_norm": _param(1.0 + 0.2 * torch.randn(head_dim, generator=g, dtype=DTYPE))})

    def layer(x, cp=None, cu_seqlens=None):
        out, _ = kda_layer(
            x, mods["q"], mods["k"], mods["v"], (params["q_conv"], params["k_conv"], params["v_conv"]),
            lambda h: mods["f_b"](mods["f_a"](h)), mods["beta"], params["A_log"], params["dt_bias"], mods["gate"],
            params["o_norm"], mods["o"], head_dim=head_dim, lower_bound=None, eps=1e-6, cu_seqlens=cu_seqlens, cp=cp)
        return out

    return layer, [*mods.parameters(), *params.parameters()]


def swa_tpa_problem(seed: int, hidden: int = HIDDEN, head_dim: int = HEAD_DIM):
    """An SWA + TPA layer (contextual TPA on q, k, v; RoPE on the B factors with a learned plane basis; sinks)."""
    g = torch.Generator().manual_seed(seed)
    mods = torch.nn.ModuleDict({
        f"{n}_{part}": _linear(g, TPA_RANK * (HEADS if part == "a" else head_dim), hidden)
        for n in "qkv" for part in "ab"})
    mods["o"] = _linear(g, hidden, HEADS * head_dim)
    params = torch.nn.ParameterDict({f"{n}_a0": _param(torch.randn(TPA_RANK, HEADS, generator=g, dtype=DTYPE))
                                     for n in "qkv"})
    params["sinks"] = _param(torch.randn(SINKS_HEADS, generator=g, dtype=DTYPE))
    params["plane_skew"] = _param(0.1 * torch.randn(head_dim, head_dim, generator=g, dtype=DTYPE))
    inv_freq = 1.0 / 100.0 ** (torch.arange(0, head_dim, 2, dtype=DTYPE) / head_dim)

    def layer(x, cp=None, cu_seqlens=None):
        if cp is not None:
            positions = cp.local_positions(x.device)
        else:
            positions = token_positions(x.shape[1], x.device, cu_seqlens)
        cos, sin = rope_cos_sin(positions, inv_freq.to(x.device), 1.0)
        tpa = {n: TpaProjection(params[f"{n}_a0"], mods[f"{n}_a"], mods[f"{n}_b"]) for n in "qkv"}
        return swa_tpa_layer(x, tpa["q"], tpa["k"], tpa["v"], mods["o"], params["sinks"], cos, sin,
                             head_dim=head_dim, window=WINDOW, plane_skew=params["plane_skew"],
                             cu_seqlens=cu_seqlens, cp=cp,
                             backend="reference" if x.dtype == torch.float64 else "auto")

    return layer, [*mods.parameters(), *params.parameters()]


PROBLEMS = {"kda": kda_problem, "swa_tpa": swa_tpa_problem}


def sequence(seed: int, total: int, hidden: int = HIDDEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Input x [1, total, hidden] and the upstream gradient of the layer's output, fresh per seed."""
    g = torch.Generator().manual_seed(seed + 1000)
    return (torch.randn(1, total, hidden, generator=g, dtype=DTYPE),
            torch.randn(1, total, hidden, generator=g, dtype=DTYPE))


def run_layer(kind: str, seed: int, bounds: list[int] | None, total: int, group=None, *, hidden: int = HIDDEN,
              head_dim: int = HEAD_DIM, device: str = "cpu", dtype: torch.dtype = DTYPE) -> dict:
    """Forward and backward of one layer on the whole sequence (``group`` None) or on this rank's chunk of a
    context-parallel split over ``group``; parameter gradients summed over the group (as data-parallel
    reduction over CP ranks does). Results on the CPU."""
    layer, params = PROBLEMS[kind](seed, hidden, head_dim)
    for p in params:
        p.data = p.data.to(device, dtype)
    x, upstream = (t.to(device, dtype) for t in sequence(seed, total, hidden))
    cu = None if bounds is None else torch.tensor(bounds, dtype=torch.int32, device=device)
    if group is None:
        x = x.requires_grad_()
        out = layer(x, cu_seqlens=cu)
    else:
        cp = context_parallel_split(cu, total, group)
        x = cp.local_chunk(x).clone().requires_grad_()
        upstream = cp.local_chunk(upstream)
        out = layer(x, cp=cp)
    (out * upstream).sum().backward()
    grads = [p.grad.clone() for p in params]
    if group is not None:
        for grad in grads:
            torch.distributed.all_reduce(grad, group=group)
    return {"out": out.detach().cpu(), "x_grad": x.grad.cpu(), "param_grads": [g.cpu() for g in grads]}


def layers_worker(rank: int, world: int, cases: list[tuple[str, int, list[int] | None]], total: int) -> dict:
    """:func:`run_layer` on this rank's chunk for each (kind, seed, bounds) case, in one process group, and the
    messages of the errors that bad splits raise."""
    group = torch.distributed.group.WORLD
    return {"results": [run_layer(kind, seed, bounds, total, group=group) for kind, seed, bounds in cases],
            "errors": split_errors(group, total)}


def split_errors(group, total: int) -> list[str]:
    """Messages of: a length that does not divide over the group; a window longer than a chunk; cu_seqlens that
    do not end at the sequence length; documents passed both in cp and as cu_seqlens."""
    chunk = total // group.size()
    x = torch.zeros(1, chunk, HIDDEN, dtype=DTYPE)
    attempts = [
        lambda: context_parallel_split(None, total + 1, group),
        lambda: sliding_window_halo({"k_b": x[:, :2]}, context_parallel_split(None, 2 * group.size(), group), WINDOW),
        lambda: context_parallel_split(torch.tensor([0, 5, total - 1]), total, group),
        lambda: kda_problem(0)[0](x, cp=context_parallel_split(None, total, group),
                                  cu_seqlens=torch.tensor([0, chunk], dtype=torch.int32)),
    ]
    messages = []
    for attempt in attempts:
        try:
            attempt()
        except ValueError as error:
            messages.append(str(error))
        else:
            messages.append("no error")
    return messages


def gpu_layers_worker(rank: int, world: int, cases: list[tuple[str, int, list[int] | None]], total: int,
                      hidden: int, head_dim: int) -> list[dict]:
    """On GPU ``rank`` (NCCL), each case: in float32 through fla's CP kernels (KDA, short convolutions) and
    FlexAttention (SWA) ("fp32"); in float64 through the pure-torch CP algorithm over the same NCCL group ("fp64");
    rank 0 also runs the whole sequence in float32 on its GPU without CP ("fp32_one_gpu")."""
    group = torch.distributed.group.WORLD
    results = []
    for kind, seed, bounds in cases:
        dims = {"hidden": hidden, "head_dim": head_dim, "device": "cuda"}
        result = {"fp32": run_layer(kind, seed, bounds, total, group, dtype=torch.float32, **dims),
                  "fp64": run_layer(kind, seed, bounds, total, group, dtype=torch.float64, **dims)}
        if rank == 0:
            result["fp32_one_gpu"] = run_layer(kind, seed, bounds, total, dtype=torch.float32, **dims)
        results.append(result)
    return results


def _megatron_chunk(which: str, plan: dict | None, seed: int, bounds: list[int] | None, total: int, tp: int, cp: int):
    """Process groups for (TP, CP), the Megatron model on the seed's random HF weights, and this CP rank's chunk of
    the token sequence, its upstream gradient [1, L, VOCAB] and the packed-sequence parameters."""
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_harness import VOCAB, hf_student, hf_teacher
    from megatron_student.megatron import (ParallelConfig, build_student, build_teacher, initialize_parallel,
                                           load_hf_weights)

    parallel = ParallelConfig(tensor_parallel=tp, context_parallel=cp)
    initialize_parallel(parallel)
    hf = hf_student(plan, seed=seed) if which == "student" else hf_teacher(seed=seed)
    model = build_student(hf.config, parallel) if which == "student" else build_teacher(hf.config, parallel)
    load_hf_weights(model, hf.state_dict())
    g = torch.Generator().manual_seed(seed + 500)
    tokens = torch.randint(0, VOCAB, (1, total), generator=g)
    upstream = torch.randn(1, total, VOCAB, generator=g)
    params = None
    if bounds is not None:
        cu = torch.tensor(bounds, dtype=torch.int32)
        longest = int(cu.diff().max())
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                                 max_seqlen_kv=longest)
    chunk, cp_rank = total // cp, parallel_state.get_context_parallel_rank()
    local = slice(cp_rank * chunk, (cp_rank + 1) * chunk)
    return model, tokens[:, local], upstream[:, local], params


def _gather_over_cp(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    group = parallel_state.get_context_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(group.size())]
    torch.distributed.all_gather(parts, logits.detach().contiguous(), group=group)
    return torch.cat(parts, dim=1)


def megatron_worker(rank: int, world: int, which: str, plan: dict | None, seed: int, bounds: list[int] | None,
                    total: int) -> dict:
    """The Megatron student or teacher (``which``; TP = EP = 1) with context parallelism over all ``world`` ranks
    (1: none): logits of this rank's chunk of a packed token sequence, gathered over CP, and the parameter gradients
    of Σ logits · upstream (summed over CP ranks)."""
    from megatron.core import parallel_state

    from megatron_harness import VOCAB

    model, tokens, upstream, params = _megatron_chunk(which, plan, seed, bounds, total, 1, world)
    logits = model(tokens, None, None, packed_seq_params=params)[..., :VOCAB]
    (logits * upstream).sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        torch.distributed.all_reduce(grad, group=parallel_state.get_context_parallel_group())
        grads[name] = grad
    gathered = _gather_over_cp(logits)  # a collective: every rank takes part
    return {"logits": gathered, "grads": grads} if rank == 0 else {}


def megatron_tp_cp_worker(rank: int, world: int, which: str, plan: dict | None, seed: int, bounds: list[int] | None,
                          total: int) -> dict:
    """TP = 2 × CP = world / 2 (sequence parallel inside each CP chunk): logits gathered over TP and CP."""
    from megatron_harness_workers import gather_logits

    model, tokens, _, params = _megatron_chunk(which, plan, seed, bounds, total, 2, world // 2)
    with torch.no_grad():
        logits = gather_logits(model(tokens, None, None, packed_seq_params=params))
    gathered = _gather_over_cp(logits)  # a collective: every rank takes part
    return {"logits": gathered} if rank == 0 else {}


def megatron_cases_worker(rank: int, world: int, cases: list[tuple[str, dict | None, int, list[int] | None, int]],
                          tensor_parallel: bool = False) -> list[dict]:
    """:func:`megatron_worker` (or :func:`megatron_tp_cp_worker`) for each (which, plan, seed, bounds, total) case,
    in one process group."""
    worker = megatron_tp_cp_worker if tensor_parallel else megatron_worker
    return [worker(rank, world, *case) for case in cases]
