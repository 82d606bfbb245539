"""gpt-oss teacher config: load a checkpoint's config.json and refuse anything that is not gpt-oss-shaped.

The student (TPA on sliding layers, KDA on full layers, copied MoE) relies on the gpt-oss architecture:
sliding/full alternation, GQA, biased attention, yarn RoPE, untied embeddings, top-k MoE. A config that
silently differs would produce a wrong student, so each of those is checked and an error names the
field and the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import transformers

from ..harmony_vocab import GPT_OSS_VOCAB_SIZE, HARMONY_MAX_TOKEN_ID

CONFIG_NAME = "config.json"
SUPPORTED_QUANT_METHODS = ("mxfp4",)
YARN_KEYS = ("factor", "beta_fast", "beta_slow", "original_max_position_embeddings")
# gpt-oss's SwiGLU clamp. Released config.json files carry it as `swiglu_limit`, and so does transformers 5.24's
# GptOssConfig; transformers 5.17's has no such field (its experts use a fixed 7.0), so a config built there
# without the key falls back to the released value.
GPT_OSS_SWIGLU_LIMIT = 7.0


def swiglu_limit(config) -> float:
    """The SwiGLU clamp of a gpt-oss-shaped config object or dict."""
    value = config.get("swiglu_limit") if isinstance(config, dict) else getattr(config, "swiglu_limit", None)
    return float(GPT_OSS_SWIGLU_LIMIT if value is None else value)


class TeacherConfigError(ValueError):
    """A config.json that does not describe a gpt-oss model."""


def _expected_layer_type(index: int) -> str:
    return "sliding_attention" if index % 2 == 0 else "full_attention"


def _positive_int(cfg: dict, field: str, source: str) -> int:
    if field not in cfg or cfg[field] is None:
        raise TeacherConfigError(f"{source}: required field '{field}' is missing")
    value = cfg[field]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TeacherConfigError(f"{source}: field '{field}' must be a positive integer, got {value!r}")
    return value


def _rope_settings(cfg: dict, source: str) -> tuple[str, dict, Any]:
    """(field name, yarn dict, rope_theta) from transformers 5's rope_parameters or the older rope_scaling/rope_theta."""
    if cfg.get("rope_parameters") is not None:
        field, rope = "rope_parameters", cfg["rope_parameters"]
        theta = rope.get("rope_theta", cfg.get("rope_theta")) if isinstance(rope, dict) else None
    elif cfg.get("rope_scaling") is not None:
        field, rope, theta = "rope_scaling", cfg["rope_scaling"], cfg.get("rope_theta")
    else:
        raise TeacherConfigError(
            f"{source}: no RoPE settings: gpt-oss needs yarn parameters in 'rope_parameters' "
            "(or the older 'rope_scaling' with 'rope_theta')"
        )
    if not isinstance(rope, dict):
        raise TeacherConfigError(f"{source}: field '{field}' must be a mapping, got {rope!r}")
    return field, rope, theta


def validate_gpt_oss_config(config_dict: dict, source: str | os.PathLike = CONFIG_NAME) -> None:
    """Raise TeacherConfigError naming the field and ``source`` if ``config_dict`` is not gpt-oss-shaped."""
    cfg, src = config_dict, str(source)
    if cfg.get("model_type") != "gpt_oss":
        raise TeacherConfigError(f"{src}: field 'model_type' is {cfg.get('model_type')!r}, expected 'gpt_oss'")

    layers = _positive_int(cfg, "num_hidden_layers", src)
    for field in ("hidden_size", "intermediate_size", "num_local_experts", "vocab_size", "sliding_window"):
        _positive_int(cfg, field, src)
    heads = _positive_int(cfg, "num_attention_heads", src)
    kv_heads = _positive_int(cfg, "num_key_value_heads", src)
    if heads % kv_heads:
        raise TeacherConfigError(
            f"{src}: field 'num_attention_heads' ({heads}) is not divisible by 'num_key_value_heads' ({kv_heads})"
        )
    head_dim = _positive_int(cfg, "head_dim", src)  # gpt-oss's head_dim is not hidden_size / heads: it must be explicit
    if head_dim % 2:
        raise TeacherConfigError(f"{src}: field 'head_dim' ({head_dim}) must be even for the half-split RoPE")
    if cfg.get("attention_bias") is not True:
        raise TeacherConfigError(
            f"{src}: field 'attention_bias' is {cfg.get('attention_bias')!r}; gpt-oss has q/k/v/o biases (true)"
        )
    if cfg.get("tie_word_embeddings", False):
        raise TeacherConfigError(f"{src}: field 'tie_word_embeddings' is true; gpt-oss has an untied lm_head")

    experts = cfg["num_local_experts"]
    top_k = cfg.get("num_experts_per_tok", transformers.GptOssConfig.num_experts_per_tok)
    if "experts_per_token" in cfg and cfg["experts_per_token"] != top_k:
        raise TeacherConfigError(
            f"{src}: field 'experts_per_token' ({cfg['experts_per_token']}) disagrees with 'num_experts_per_tok' "
            f"({top_k}, the value transformers uses)"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise TeacherConfigError(
            f"{src}: field 'num_experts_per_tok' ({top_k!r}) must be between 1 and num_local_experts ({experts})"
        )

    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != layers:
            raise TeacherConfigError(
                f"{src}: field 'layer_types' must list one type per layer ({layers}), got {layer_types!r}"
            )
        for index, kind in enumerate(layer_types):
            if kind != _expected_layer_type(index):
                raise TeacherConfigError(
                    f"{src}: field 'layer_types'[{index}] is {kind!r}, expected {_expected_layer_type(index)!r}: "
                    "gpt-oss alternates sliding_attention (even layers) and full_attention (odd layers)"
                )

    field, rope, theta = _rope_settings(cfg, src)
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type != "yarn":
        raise TeacherConfigError(f"{src}: field '{field}.rope_type' is {rope_type!r}, gpt-oss uses 'yarn'")
    for key in YARN_KEYS:
        value = rope.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise TeacherConfigError(f"{src}: field '{field}.{key}' must be a positive number, got {value!r}")
    if rope["beta_fast"] <= rope["beta_slow"]:
        raise TeacherConfigError(
            f"{src}: field '{field}.beta_fast' ({rope['beta_fast']}) must exceed 'beta_slow' ({rope['beta_slow']})"
        )
    if not isinstance(rope.get("truncate"), bool):
        # transformers defaults a missing 'truncate' to true, gpt-oss uses false: the choice must be explicit.
        raise TeacherConfigError(
            f"{src}: field '{field}.truncate' must be given as true or false (gpt-oss: false), got {rope.get('truncate')!r}"
        )
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise TeacherConfigError(f"{src}: RoPE base 'rope_theta' must be a positive number, got {theta!r}")

    vocab = cfg["vocab_size"]
    if vocab <= HARMONY_MAX_TOKEN_ID:
        raise TeacherConfigError(
            f"{src}: field 'vocab_size' ({vocab}) does not cover the Harmony special tokens (ids up to "
            f"{HARMONY_MAX_TOKEN_ID}); gpt-oss uses {GPT_OSS_VOCAB_SIZE}"
        )
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = cfg.get(field)
        for token in ids if isinstance(ids, list) else [ids]:
            if token is not None and not 0 <= token < vocab:
                raise TeacherConfigError(f"{src}: field '{field}' ({token}) is outside the vocabulary (0..{vocab - 1})")

    quant = cfg.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        if method not in SUPPORTED_QUANT_METHODS:
            raise TeacherConfigError(
                f"{src}: field 'quantization_config.quant_method' is {method!r}; only {SUPPORTED_QUANT_METHODS} is supported"
            )


def read_config_dict(path: str | os.PathLike) -> tuple[dict, Path]:
    """The raw config.json of a checkpoint dir (or of a config file path), validated; returns (dict, file)."""
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no gpt-oss config.json")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise TeacherConfigError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise TeacherConfigError(f"{file}: expected a JSON object")
    validate_gpt_oss_config(cfg, file)
    return cfg, file


def load_teacher_config(path: str | os.PathLike) -> transformers.GptOssConfig:
    """A validated ``GptOssConfig`` from a checkpoint dir (or its config.json)."""
    cfg, _ = read_config_dict(path)
    return transformers.GptOssConfig.from_dict(cfg)
