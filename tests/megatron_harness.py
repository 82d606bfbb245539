"""CPU-distributed harness for the Megatron tests: tiny gpt-oss/student configs with fully random weights, and
``run_distributed`` which runs a function on ``world_size`` gloo processes (spawned, free port) and returns each
rank's result to the parent (through ``torch.save`` files, so tensors come back intact)."""

from __future__ import annotations

import math
import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp
from transformers import GptOssConfig, GptOssForCausalLM

from megatron_student.student.config import StudentConfig
from megatron_student.student.modeling import StudentForCausalLM

VOCAB = 512
MIXED_PLAN = {  # every attention kind, TPA on q too, GRAPE-M with a learned basis, GVA KDA
    "kinds": ["swa_tpa", "kda", "softmax_sliding", "softmax_full"],
    "tpa": {"q_rank": 3, "k_rank": 2, "v_rank": 2, "contextual": True},
    "position_encoding": "grape_m",
    "grape": {"learned_basis": True},
    "kda": {"head_mapping": "B", "conv_size": 4, "lower_bound": -5.0},
}


def teacher_config(layers: int = 4, window: int = 8) -> GptOssConfig:
    config = GptOssConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=window,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        attention_bias=True, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    return config


def student_config(plan: dict | None = None, layers: int = 4, window: int = 8) -> StudentConfig:
    return StudentConfig.from_teacher(teacher_config(layers, window), plan=plan)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random and O(1)-scaled (fan-in for matrices), so biases, sinks, norms, gates and router
    biases all matter; KDA decays stay in a sane range."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            value = -1.0 + 0.5 * noise
        elif leaf == "dt_bias":
            value = -2.0 + 0.5 * noise
        elif leaf in ("rope_freq",):
            value = p.double() * (1 + 0.05 * noise)
        elif leaf == "plane_skew":
            value = 0.1 * noise
        elif "norm" in name:
            value = 1.0 + 0.2 * noise
        elif name.endswith("_a0"):
            value = noise
        elif leaf in ("gate_up_proj", "down_proj"):  # experts [E, in, out]
            value = noise / math.sqrt(p.shape[1])
        elif p.dim() >= 2:
            value = noise / math.sqrt(p.shape[-1])
        else:
            value = 0.3 * noise
        p.copy_(value.to(p.dtype))
    return model


def hf_teacher(seed: int = 0, **kw) -> GptOssForCausalLM:
    return randomize_(GptOssForCausalLM(teacher_config(**kw)), seed).eval()


def hf_student(plan: dict | None = None, seed: int = 0, **kw) -> StudentForCausalLM:
    return randomize_(StudentForCausalLM(student_config(plan, **kw)), seed).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, backend: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    path = Path(out_dir) / f"rank{rank}.pt"
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        torch.distributed.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # noqa: BLE001 - the parent re-raises with the rank's traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
    finally:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0, backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes (``backend="nccl"``: one GPU each);
    return the per-rank results. ``fn`` must be importable (module level) and its results picklable."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, out_dir, backend, fn, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                raise TimeoutError(f"distributed run of {fn.__name__} timed out after {timeout}s")
        results = []
        for r in range(world_size):
            path = Path(out_dir) / f"rank{r}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {r} of {fn.__name__} died without a result (exit code {procs[r].exitcode})")
            record = torch.load(path, weights_only=False)
            if not record["ok"]:
                raise RuntimeError(f"rank {r} of {fn.__name__} failed:\n{record['error']}")
            results.append(record["result"])
        return results
