"""The teacher's attention through ``ops.attention.sink_attention`` (FlexAttention on the GPU, the exact reference on
CPU) instead of transformers' eager gpt-oss attention, which materialises the [heads, T, T] scores: 256 GiB for a
32k-token prompt of a 20b-width teacher, so evaluation's long needles could not run on the teacher. Same math (causal,
sliding window, per-head sinks); registered with transformers as an attention implementation."""

from __future__ import annotations

import torch

SINK_ATTENTION = "megatron_student_sink"


def _sink_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, sliding_window=None,
                            s_aux=None, **kwargs):
    """transformers' attention-interface signature: query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D] →
    ([B, Tq, Hq, D], None). ``attention_mask`` is None unless the batch is padded (``_padding_only_mask``);
    a padded batch runs transformers' eager gpt-oss attention."""
    if attention_mask is not None:
        from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

        additive = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
        return eager_attention_forward(module, query, key, value, additive, scaling, dropout=dropout, **kwargs)
    from ..ops.attention import sink_attention

    out = sink_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), s_aux, scale=scaling,
                         window=sliding_window)
    return out, None


def _padding_only_mask(*args, **kwargs):
    """No mask without padding (the attention applies causality and the window itself); transformers' boolean sdpa
    mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    padding = kwargs.get("attention_mask")
    if padding is None or bool(padding.all()):
        return None
    return sdpa_mask(*args, **kwargs)


def use_sink_attention(model) -> None:
    """Switch a loaded ``GptOssForCausalLM`` to :data:`SINK_ATTENTION`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SINK_ATTENTION, _sink_attention_forward)
    AttentionMaskInterface.register(SINK_ATTENTION, _padding_only_mask)
    model.set_attn_implementation(SINK_ATTENTION)
