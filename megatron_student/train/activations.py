"""Forward hooks that keep a Megatron model's activations for the alignment losses: decoder layer outputs
(hidden-state alignment) and the inputs/outputs of attention modules (teacher-forced attention alignment)."""

from __future__ import annotations

import torch


class Capture:
    """Forward hooks storing layer outputs (``outputs``) and attention inputs/outputs (``attn_in``/``attn_out``) by
    layer index; each forward overwrites them, ``remove`` releases the hooks."""

    def __init__(self):
        self.outputs: dict[int, torch.Tensor] = {}
        self.attn_in: dict[int, torch.Tensor] = {}
        self.attn_out: dict[int, torch.Tensor] = {}
        self.handles = []

    def layers(self, model, indices):
        for i in indices:
            self.handles.append(model.decoder.layers[i].register_forward_hook(
                lambda m, a, out, i=i: self.outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out)))

    def attention(self, model, indices):
        for i in indices:
            attn = model.decoder.layers[i].self_attention
            self.handles.append(attn.register_forward_pre_hook(
                lambda m, args, kwargs, i=i: self.attn_in.__setitem__(
                    i, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
            self.handles.append(attn.register_forward_hook(
                lambda m, a, out, i=i: self.attn_out.__setitem__(i, with_bias(out))))

    def clear(self):
        self.outputs.clear()
        self.attn_in.clear()
        self.attn_out.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.clear()


def with_bias(out):
    """A Megatron module's output with its separately returned bias (``(output, bias)``) added."""
    if isinstance(out, tuple):
        output, bias = out[0], out[1] if len(out) > 1 else None
        return output if bias is None else output + bias
    return out
