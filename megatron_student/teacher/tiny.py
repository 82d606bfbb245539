"""`megatron-student make-tiny-teacher`: a random gpt-oss-shaped HF checkpoint for tests and the demo.

Everything but the sizes is gpt-oss's: the real 201088-token vocabulary, sliding/full layer alternation,
sliding window 128, attention sinks, q/k/v/o, router and expert biases, the yarn RoPE settings, the
clamped SwiGLU limit and the Harmony bos/eos/pad ids. The config.json keeps the key layout of the released
checkpoints (``rope_scaling`` + ``rope_theta``, ``experts_per_token``), and ``--mxfp4`` stores the experts
packed exactly as gpt-oss does.

Weights use fan-in scaling (std 1/sqrt(fan_in)) rather than gpt-oss's init std 0.02 so that the tiny
model's activations, attention scores and logits are O(1): the softmax, sinks, router top-k and SwiGLU
clamps all take effect and the logits are far from uniform.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
import transformers

from ..dtypes import CHECKPOINT_DTYPES, DTYPES, dtype_name
from ..harmony_vocab import CALL, ENDOFTEXT, GPT_OSS_VOCAB_SIZE, RETURN, STARTOFTEXT
from .checkpoint import MXFP4_BLOCKS_SUFFIX, MXFP4_SCALES_SUFFIX, save_hf_checkpoint
from .mxfp4 import BLOCK_SIZE, quantize_mxfp4

GPT_OSS_BOS, GPT_OSS_EOS, GPT_OSS_PAD = STARTOFTEXT, RETURN, ENDOFTEXT
GPT_OSS_GENERATION_EOS = [RETURN, ENDOFTEXT, CALL]  # the released generation_config's order
GPT_OSS_ROPE_THETA = 150000
GPT_OSS_YARN = {
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "factor": 32.0,
    "original_max_position_embeddings": 4096,
    "rope_type": "yarn",
    "truncate": False,
}
MXFP4_MODULES_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]

DEFAULTS = dict(
    layers=4,
    hidden=64,
    heads=8,
    kv_heads=2,
    head_dim=16,
    experts=4,
    experts_per_token=2,
    intermediate=64,
    seed=0,
    dtype="bf16",
    mxfp4=False,
    max_shard_mb=None,
    overwrite=False,
)


def tiny_teacher_config(
    layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, experts: int, experts_per_token: int,
    intermediate: int, dtype: str, mxfp4: bool,
) -> dict:
    """The config.json of a tiny gpt-oss, laid out like the released gpt-oss-20b/120b ones."""
    config = {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "bos_token_id": GPT_OSS_BOS,
        "dtype": dtype_name(DTYPES[dtype]),
        "eos_token_id": GPT_OSS_EOS,
        "experts_per_token": experts_per_token,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "max_position_embeddings": 131072,
        "model_type": "gpt_oss",
        "num_attention_heads": heads,
        "num_experts_per_tok": experts_per_token,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "num_local_experts": experts,
        "output_router_logits": False,
        "pad_token_id": GPT_OSS_PAD,
        "rms_norm_eps": 1e-05,
        "rope_scaling": dict(GPT_OSS_YARN),
        "rope_theta": GPT_OSS_ROPE_THETA,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "transformers_version": transformers.__version__,
        "use_cache": True,
        "vocab_size": GPT_OSS_VOCAB_SIZE,
    }
    if mxfp4:
        config["quantization_config"] = {"modules_to_not_convert": MXFP4_MODULES_NOT_CONVERTED, "quant_method": "mxfp4"}
    return config


def random_teacher_weights(config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """fp32 random weights under HF's in-memory names and layouts (gate_up_proj [E, H, 2I], down_proj [E, I, H])."""
    H, I, E = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    def fan_in(*shape: int, fan: int) -> torch.Tensor:
        return normal(*shape, std=1 / math.sqrt(fan))

    def bias(*shape: int) -> torch.Tensor:
        return normal(*shape, std=0.1)

    def norm() -> torch.Tensor:
        return 1 + normal(H, std=0.1)

    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], H, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": fan_in(q_dim, H, fan=H),
            p + "self_attn.q_proj.bias": bias(q_dim),
            p + "self_attn.k_proj.weight": fan_in(kv_dim, H, fan=H),
            p + "self_attn.k_proj.bias": bias(kv_dim),
            p + "self_attn.v_proj.weight": fan_in(kv_dim, H, fan=H),
            p + "self_attn.v_proj.bias": bias(kv_dim),
            p + "self_attn.o_proj.weight": fan_in(H, q_dim, fan=q_dim),
            p + "self_attn.o_proj.bias": bias(H),
            p + "self_attn.sinks": normal(config["num_attention_heads"], std=1.0),
            p + "post_attention_layernorm.weight": norm(),
            p + "mlp.router.weight": fan_in(E, H, fan=H),
            p + "mlp.router.bias": bias(E),
            p + "mlp.experts.gate_up_proj": fan_in(E, H, 2 * I, fan=H),
            p + "mlp.experts.gate_up_proj_bias": bias(E, 2 * I),
            p + "mlp.experts.down_proj": fan_in(E, I, H, fan=I),
            p + "mlp.experts.down_proj_bias": bias(E, H),
        })
    weights["model.norm.weight"] = norm()
    weights["lm_head.weight"] = fan_in(config["vocab_size"], H, fan=H)
    return weights


def to_stored_tensors(weights: dict[str, torch.Tensor], dtype: torch.dtype, mxfp4: bool) -> dict[str, torch.Tensor]:
    """Cast to ``dtype``; with ``mxfp4`` pack the expert matrices as gpt-oss stores them ([E, out, in/32, 16])."""
    stored = {}
    for name, tensor in weights.items():
        if mxfp4 and name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            blocks, scales = quantize_mxfp4(tensor.transpose(1, 2))
            stored[name + MXFP4_BLOCKS_SUFFIX] = blocks
            stored[name + MXFP4_SCALES_SUFFIX] = scales
        else:
            stored[name] = tensor.to(dtype)
    return stored


def make_tiny_teacher(output_dir: str | os.PathLike, **options) -> Path:
    """Write a random tiny gpt-oss checkpoint to ``output_dir``; options as ``DEFAULTS`` (the CLI flags)."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"make_tiny_teacher: unknown options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    if opts["dtype"] not in CHECKPOINT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(CHECKPOINT_DTYPES)}, got {opts['dtype']!r}")
    if opts["mxfp4"]:
        for key in ("hidden", "intermediate"):
            if opts[key] % BLOCK_SIZE:
                raise ValueError(
                    f"--{key} ({opts[key]}) must be a multiple of {BLOCK_SIZE} with --mxfp4 "
                    "(MXFP4 blocks run along the input dimension of the expert matrices)"
                )
    config = tiny_teacher_config(
        layers=opts["layers"], hidden=opts["hidden"], heads=opts["heads"], kv_heads=opts["kv_heads"],
        head_dim=opts["head_dim"], experts=opts["experts"], experts_per_token=opts["experts_per_token"],
        intermediate=opts["intermediate"], dtype=opts["dtype"], mxfp4=opts["mxfp4"],
    )
    generator = torch.Generator().manual_seed(opts["seed"])
    stored = to_stored_tensors(random_teacher_weights(config, generator), DTYPES[opts["dtype"]], opts["mxfp4"])
    max_shard_bytes = None if opts["max_shard_mb"] is None else int(opts["max_shard_mb"] * 2**20)
    generation_config = {
        "bos_token_id": GPT_OSS_BOS,
        "do_sample": True,
        "eos_token_id": GPT_OSS_GENERATION_EOS,
        "pad_token_id": GPT_OSS_PAD,
        "transformers_version": transformers.__version__,
    }
    return save_hf_checkpoint(
        stored, config, output_dir, max_shard_bytes=max_shard_bytes, generation_config=generation_config,
        overwrite=opts["overwrite"],
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    parser.add_argument("--output", required=True, help="checkpoint directory to create")
    parser.add_argument("--layers", type=int, default=d["layers"], help="decoder layers (even: sliding, odd: full)")
    parser.add_argument("--hidden", type=int, default=d["hidden"], help="hidden size (multiple of 32 with --mxfp4)")
    parser.add_argument("--heads", type=int, default=d["heads"], help="query heads")
    parser.add_argument("--kv-heads", type=int, default=d["kv_heads"], help="key/value heads (GQA)")
    parser.add_argument("--head-dim", type=int, default=d["head_dim"], help="head dimension (even)")
    parser.add_argument("--experts", type=int, default=d["experts"], help="experts per MoE layer")
    parser.add_argument("--experts-per-token", type=int, default=d["experts_per_token"], help="router top-k")
    parser.add_argument("--intermediate", type=int, default=d["intermediate"], help="expert intermediate size")
    parser.add_argument("--seed", type=int, default=d["seed"], help="random seed of the weights")
    parser.add_argument("--dtype", choices=sorted(CHECKPOINT_DTYPES), default=d["dtype"], help="storage dtype (experts too unless --mxfp4)")
    parser.add_argument("--mxfp4", action="store_true", help="store the experts MXFP4-packed like the released gpt-oss")
    parser.add_argument("--max-shard-mb", type=float, default=d["max_shard_mb"], help="shard the safetensors above this size")
    parser.add_argument("--force", "--overwrite", dest="overwrite", action="store_true",
                        help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    path = make_tiny_teacher(
        args.output, layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
        head_dim=args.head_dim, experts=args.experts, experts_per_token=args.experts_per_token,
        intermediate=args.intermediate, seed=args.seed, dtype=args.dtype, mxfp4=args.mxfp4,
        max_shard_mb=args.max_shard_mb, overwrite=args.overwrite,
    )
    files = sorted(p.name for p in path.iterdir())
    print(f"wrote tiny gpt-oss teacher to {path}: {', '.join(files)}")
    return 0
