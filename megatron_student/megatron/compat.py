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
    ``reduce_from_tensor_model_parallel_region``, which returns its input (a view) for a group of size 1, and
    ``MLP.forward`` then does ``output += output_bias * per_token_scale`` in place: "Output 0 of
    _ReduceFromModelParallelRegion is a view and is being modified inplace". Not fixed upstream (present on
    Megatron-LM main as of core_v0.19.0). Workaround: clone the reduced output for groups of size 1."""
    from megatron.core.tensor_parallel import layers

    original = layers.reduce_from_tensor_model_parallel_region
    if getattr(original, "_megatron_student_compat", False):
        return

    def reduce_from_tensor_model_parallel_region(input_, group=None):
        output = original(input_, group=group)
        if group is not None and group.size() == 1:
            output = output.clone()
        return output

    reduce_from_tensor_model_parallel_region._megatron_student_compat = True
    layers.reduce_from_tensor_model_parallel_region = reduce_from_tensor_model_parallel_region


def _cuda_only_device_calls() -> None:
    """megatron-core allocates communication buffers and router/rotary state with
    ``device=torch.cuda.current_device()`` (tensor_parallel/mappings.py gathers, tensor_parallel/layers.py
    sequence-parallel gathers, utils.GlobalMemoryBuffer, moe/router.py buffers). Not fixed upstream (Megatron
    targets CUDA). On a machine without CUDA (CPU tests, gloo) ``torch.cuda.current_device`` is pointed at
    "cpu"; with CUDA nothing changes."""
    if torch.cuda.is_available():
        return
    if getattr(torch.cuda.current_device, "_megatron_student_compat", False):
        return

    def current_device():
        return "cpu"

    current_device._megatron_student_compat = True
    torch.cuda.current_device = current_device


def apply() -> None:
    """Apply every workaround once (safe to call repeatedly)."""
    global _APPLIED
    if _APPLIED:
        return
    _te_general_gemm_name_error()
    _expert_bias_inplace_on_view()
    _cuda_only_device_calls()
    _APPLIED = True
