"""Per-rank bodies of the converter tests (run through ``megatron_harness.run_distributed``); no tests here."""

from __future__ import annotations

import copy
import os

import torch
from megatron.core import dist_checkpointing, parallel_state

from megatron_student.checkpoint import METADATA_KEY, TRACKER_NAME, resolve_megatron_dir
from megatron_student.megatron import (ParallelConfig, build_student, build_teacher, initialize_parallel,
                                       load_hf_weights, restore_fp32_parameters)
from megatron_student.teacher import TeacherCheckpoint


def _load(model, directory):
    state = dist_checkpointing.load(model.sharded_state_dict(), str(resolve_megatron_dir(directory)))
    assert state.pop(METADATA_KEY)["role"] in ("teacher", "student")  # common state comes back with the tensors
    model.load_state_dict(state)


def teacher_logits_worker(rank: int, world: int, hf_dir: str, megatron_dir: str, tokens: torch.Tensor):
    """TP = EP = 1, fp32: logits of the teacher loaded from the converted checkpoint and of one loaded directly from
    the HF weights (``load_hf_weights``), vocabulary padding dropped."""
    ckpt = TeacherCheckpoint(hf_dir)
    config = copy.deepcopy(ckpt.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    initialize_parallel(ParallelConfig())
    out = []
    for source in ("megatron", "hf"):
        model = build_teacher(config, ParallelConfig())
        if source == "megatron":
            _load(model, megatron_dir)
        else:
            load_hf_weights(model, ckpt.state_dict())
        model.eval()
        with torch.no_grad():
            out.append(model(tokens, None, None)[..., : config.vocab_size])
    return out


def student_resave_worker(rank: int, world: int, hf_config: dict, megatron_dir: str, save_root: str, iteration: int):
    """Load a student checkpoint at TP = 2, EP = 2 (bf16 parameters, fp32 router/decays as in training) and save
    it again as a training checkpoint ``<save_root>/iter_<iteration>`` with the converter's metadata record."""
    from megatron_student.student.config import StudentConfig

    parallel = ParallelConfig(tensor_parallel=2, expert_parallel=2, params_dtype=torch.bfloat16)
    initialize_parallel(parallel)
    model = build_student(StudentConfig.from_dict(hf_config), parallel)
    restore_fp32_parameters(model)
    _load(model, megatron_dir)
    common = dist_checkpointing.load_common_state_dict(str(resolve_megatron_dir(megatron_dir)))
    sharded = model.sharded_state_dict()
    sharded[METADATA_KEY] = {**common[METADATA_KEY], "stage": "resaved at TP=2/EP=2", "tokens_seen": 12345}
    path = os.path.join(save_root, f"iter_{iteration:07d}")
    if rank == 0:
        os.makedirs(path)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded, path)
    torch.distributed.barrier()
    if rank == 0:
        with open(os.path.join(save_root, TRACKER_NAME), "w") as f:
            f.write(f"{iteration}\n")
    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_expert_model_parallel_world_size()
