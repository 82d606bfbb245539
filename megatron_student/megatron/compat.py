"""Every megatron-core 0.16.1 workaround this project needs, in one place, applied once by :func:`apply`.

Nothing else in the project patches Megatron. Each entry names the bug and its upstream status; when the pinned
megatron-core moves past a fix, delete the entry. ``apply()`` is idempotent and is called by the builders in
``megatron_student.megatron`` before any Megatron module is built.
"""

from __future__ import annotations

import torch

_APPLIED = False


def _te_general_gemm_name_error() -> None:
    """moe_utils imports ``te_general_gemm`` only inside ``try: import transformer_engine`` with no fallback, so
    ``RouterGatingLinearFunction`` raises NameError without TE. Fixed upstream by Megatron-LM PR #3763
    (commit 9ed8b0c4ac, "Fix incorrect HAVE_TE detection in multiple modules"), released in core_v0.17.0.
    Our router (``layers.GptOssRouter``) does not use that function; this keeps Megatron's own TopKRouter usable."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _expert_bias_inplace_on_view() -> None:
    """With expert biases at ETP = 1 and EP = 1, the expert RowParallelLinear output passes through
    ``reduce_from_tensor_model_parallel_region`` (or ``reduce_scatter_to_sequence_parallel_region`` under sequence
    parallelism), which returns its input as-is for the expert-TP group of size 1; ``MLP.forward`` then does
    ``output += output_bias * per_token_scale`` in place: "Output 0 of _ReduceFromModelParallelRegion is a view and
    is being modified inplace". Not fixed upstream (present on Megatron-LM main as of core_v0.19.0). Workaround:
    the two reductions, as tensor_parallel/layers.py binds them, clone their output for groups of size 1."""
    from megatron.core.tensor_parallel import layers

    for name in ("reduce_from_tensor_model_parallel_region", "reduce_scatter_to_sequence_parallel_region"):
        original = getattr(layers, name)
        if getattr(original, "_megatron_student_compat", False):
            continue

        def cloning(input_, *args, _original=original, **kwargs):
            output = _original(input_, *args, **kwargs)
            group = kwargs.get("group", args[0] if args else None)
            if group is not None and group.size() == 1:
                output = output.clone()
            return output

        cloning._megatron_student_compat = True
        setattr(layers, name, cloning)


def _expert_grads_at_ep1() -> None:
    """Expert linears mark their parameters ``allreduce = not (is_expert and EP > 1)`` (tensor_parallel/layers.py),
    so at EP = 1 DDP reduces expert gradients over the dense data-parallel group. With expert TP = 1 < TP (forced
    by the expert biases) and sequence parallelism, each TP rank routes only its own sequence shard, so its expert
    gradients are partial and must be summed over the expert-data-parallel group, which includes the TP ranks;
    the dense group does not, and the TP ranks' expert weights silently diverge. Not fixed upstream as of
    core_v0.16.1 (the attribute still follows ``expert_model_parallel_size`` only). Workaround: every parameter
    built by ``SequentialMLP`` is flagged ``allreduce = False`` so DDP puts it in the expert buffers
    (reduced over the expert-data-parallel group, scaled 1/DP like dense gradients), and ``sequence_parallel =
    False``: RowParallelLinear flags its bias ``sequence_parallel``, which made ``finalize_model_grads`` sum the
    expert fc2 bias over TP a second time."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    original = SequentialMLP.__init__
    if getattr(original, "_megatron_student_compat", False):
        return

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for p in self.parameters():
            p.allreduce = False
            p.sequence_parallel = False

    __init__._megatron_student_compat = True
    SequentialMLP.__init__ = __init__


def _cuda_only_device_calls() -> None:
    """megatron-core allocates communication buffers and router/rotary state with
    ``device=torch.cuda.current_device()`` (tensor_parallel/mappings.py gathers, tensor_parallel/layers.py
    sequence-parallel gathers, utils.GlobalMemoryBuffer, moe/router.py buffers). Not fixed upstream (Megatron
    targets CUDA); dist_checkpointing's filesystem writer calls ``torch.cuda.synchronize()`` unconditionally
    (strategies/filesystem_async.py). On a machine without CUDA (CPU tests, gloo) ``torch.cuda.current_device``
    is pointed at "cpu" and ``torch.cuda.synchronize`` becomes a no-op; with CUDA nothing changes."""
    if torch.cuda.is_available():
        return
    if getattr(torch.cuda.current_device, "_megatron_student_compat", False):
        return

    def current_device():
        return "cpu"

    def synchronize(device=None):
        return None

    current_device._megatron_student_compat = True
    torch.cuda.current_device = current_device
    torch.cuda.synchronize = synchronize


def _cuda_rng_tracker_fork() -> None:
    """``CudaRNGStatesTracker.fork`` (tensor_parallel/random.py) swaps CUDA generator states around dropout under
    tensor/sequence parallelism and fails without CUDA ("cuda rng state model-parallel-rng is not added"). Not
    fixed upstream. Without CUDA the fork becomes a no-op context (the models have no dropout; CPU runs use the
    default generator). With CUDA, call ``tensor_parallel.model_parallel_cuda_manual_seed`` as usual."""
    if torch.cuda.is_available():
        return
    import contextlib

    from megatron.core.tensor_parallel import random as tp_random

    if getattr(tp_random.CudaRNGStatesTracker.fork, "_megatron_student_compat", False):
        return

    @contextlib.contextmanager
    def fork(self, name=None):
        yield

    fork._megatron_student_compat = True
    tp_random.CudaRNGStatesTracker.fork = fork


def _cuda_rng_state_in_recompute() -> None:
    """Activation recompute (``tensor_parallel.checkpoint``, used by ``recompute_granularity='full'``) saves and
    restores ``_get_cuda_rng_state``/``_set_cuda_rng_state`` (tensor_parallel/random.py) around the recomputed
    forward, which calls ``torch.cuda.random.get_rng_state`` unconditionally and fails without CUDA. Not fixed
    upstream as of core_v0.16.1. Without CUDA there is no CUDA generator to keep in step: the getter returns None
    and the setter ignores it (the CPU generator state is still saved and restored by Megatron)."""
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as tp_random

    if getattr(tp_random._get_cuda_rng_state, "_megatron_student_compat", False):
        return

    def get_state(*args, **kwargs):
        return None

    def set_state(*args, **kwargs):
        return None

    get_state._megatron_student_compat = True
    tp_random._get_cuda_rng_state = get_state
    tp_random._set_cuda_rng_state = set_state


def _grad_norm_without_host_reads() -> None:
    """Without Transformer Engine or apex, ``optimizer/clip_grads.py`` falls back to ``utils.
    local_multi_tensor_l2_norm`` for the gradient norm, which builds ``torch.tensor(list of CUDA norms)``: one host
    read per gradient tensor (hundreds per step, each a stream sync), then a blocking copy back to the GPU. Not
    fixed upstream as of core_v0.16.1. Workaround: the same norm (fp32, [1] tensor, as the fallback returns) from
    torch's multi-tensor ``_foreach_norm`` on the device; ``get_grad_norm_fp32`` then reads the total once."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    if clip_grads.l2_norm_impl is not local_multi_tensor_l2_norm:
        return  # TE or apex: their fused kernel, no host read

    def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        norms = [torch.stack(torch._foreach_norm([t.float() for t in tensors])) for tensors in tensor_lists]
        return torch.linalg.vector_norm(torch.cat(norms)).reshape(1), None

    l2_norm._megatron_student_compat = True
    clip_grads.l2_norm_impl = l2_norm


def apply() -> None:
    """Apply every workaround once (safe to call repeatedly)."""
    global _APPLIED
    if _APPLIED:
        return
    _te_general_gemm_name_error()
    _expert_bias_inplace_on_view()
    _expert_grads_at_ep1()
    _cuda_only_device_calls()
    _cuda_rng_tracker_fork()
    _cuda_rng_state_in_recompute()
    _grad_norm_without_host_reads()
    _APPLIED = True
