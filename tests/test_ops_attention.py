"""Attention, RoPE and MoE math against transformers' GptOss modules and independent formulas."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GptOssConfig
from transformers.models.gpt_oss import modeling_gpt_oss as hf

from megatron_student.ops.attention import sink_attention
from megatron_student.ops.moe import clamped_swiglu_interleaved, clamped_swiglu_stacked, experts_forward, router_topk_softmax
from megatron_student.ops.rope import YarnRope, apply_grape_m, apply_rotary, orthogonal_from_skew, rope_cos_sin


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sdpa_with_sink_key(q, k, v, sinks, scale, window=None):
    """Independent formulation: the sink is one extra key with zero value whose logit is s_h."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=2)
    v = v.repeat_interleave(Hq // Hkv, dim=2)
    q_pos = torch.arange(Tq)[:, None] + (Tk - Tq)
    k_pos = torch.arange(Tk)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    bias = torch.zeros(B, Hq, Tq, Tk + 1, dtype=q.dtype)
    bias[..., :Tk].masked_fill_(~allowed, float("-inf"))
    bias[..., Tk] = sinks[None, :, None]
    zero = torch.zeros(B, 1, Hq, D, dtype=q.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), torch.cat([k, zero], 1).transpose(1, 2), torch.cat([v, zero], 1).transpose(1, 2),
        attn_mask=bias, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("window", [None, 128, 7])
def test_sink_attention_matches_sink_key_formulation(window):
    g = torch.Generator().manual_seed(window or 1)
    q = torch.randn(2, 300, 8, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 300, 2, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 300, 2, 16, generator=g, dtype=torch.float64)
    sinks = torch.randn(8, generator=g, dtype=torch.float64) * 2
    ours = sink_attention(q, k, v, sinks, scale=0.25, window=window)
    ref = sdpa_with_sink_key(q, k, v, sinks, 0.25, window)
    assert rel(ours, ref) < 1e-12


def test_sink_attention_matches_hf_eager_sliding_and_full():
    torch.manual_seed(0)
    config = GptOssConfig(num_attention_heads=8, num_key_value_heads=2, head_dim=16, hidden_size=64,
                          num_hidden_layers=2, sliding_window=128)
    module = hf.GptOssAttention(config, 0)
    torch.nn.init.normal_(module.sinks, std=1.0)
    B, T = 2, 260
    q = torch.randn(B, 8, T, 16)
    k = torch.randn(B, 2, T, 16)
    v = torch.randn(B, 2, T, 16)
    for window in (128, None):
        pos = torch.arange(T)
        allowed = pos[None, :] <= pos[:, None]
        if window:
            allowed &= pos[:, None] - pos[None, :] < window
        mask = torch.zeros(T, T).masked_fill(~allowed, float("-inf"))[None, None]
        ref, _ = hf.eager_attention_forward(module, q, k, v, mask, scaling=0.25)
        ours = sink_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), module.sinks.detach(),
                              scale=0.25, window=window)
        assert rel(ours, ref) < 1e-5


def test_decode_against_cache_equals_full_attention():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 200, 4, 8, generator=g)
    k = torch.randn(1, 200, 4, 8, generator=g)
    v = torch.randn(1, 200, 4, 8, generator=g)
    sinks = torch.randn(4, generator=g)
    full = sink_attention(q, k, v, sinks, window=16)
    # the last 5 queries against only the keys they can see (15 earlier + themselves)
    tail = sink_attention(q[:, -5:], k[:, -20:], v[:, -20:], sinks, window=16)
    assert rel(tail, full[:, -5:]) < 1e-6


def test_packed_documents_do_not_attend_across():
    g = torch.Generator().manual_seed(4)
    lengths = [37, 150, 13]
    q, k, v = (torch.randn(1, sum(lengths), 4, 8, generator=g) for _ in range(3))
    sinks = torch.randn(4, generator=g)
    cu = torch.tensor([0, 37, 187, 200])
    for window in (None, 32):
        packed = sink_attention(q, k, v, sinks, window=window, cu_seqlens=cu)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone = sink_attention(q[:, s:e], k[:, s:e], v[:, s:e], sinks, window=window)
            assert rel(packed[:, s:e], alone) < 1e-6


def test_bad_shapes_are_named():
    q = torch.randn(1, 4, 6, 8)
    k = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        sink_attention(q, k, k, None)
    with pytest.raises(ValueError, match="sinks"):
        sink_attention(torch.randn(1, 4, 4, 8), k, k, torch.randn(3))
    with pytest.raises(ValueError, match="cu_seqlens"):
        sink_attention(torch.randn(1, 4, 4, 8), k, k, None, cu_seqlens=torch.tensor([0, 3]))


def test_yarn_inv_freq_and_rotation_match_hf():
    config = GptOssConfig()
    rotary = hf.GptOssRotaryEmbedding(config)
    yarn = YarnRope.from_hf_config(config)
    assert torch.equal(yarn.inv_freq(), rotary.inv_freq)
    assert yarn.concentration == pytest.approx(1.3465735902799727)
    assert yarn.correction_range() == pytest.approx((8.0928, 17.3980), abs=1e-3)
    positions = torch.randint(0, 131072, (2, 50))
    x = torch.randn(2, 50, 64)
    cos_hf, sin_hf = rotary(x, positions)
    cos, sin = rope_cos_sin(positions, yarn.inv_freq(), yarn.concentration)
    q = torch.randn(2, 50, 3, 64)
    ours = apply_rotary(q, cos, sin)
    ref = hf._apply_rotary_emb(q.transpose(1, 2), cos_hf[:, None], sin_hf[:, None]).transpose(1, 2)
    assert rel(ours, ref) < 1e-6


def test_grape_m_relative_law_and_identity_basis():
    yarn = YarnRope(head_dim=16)
    freq = yarn.inv_freq() * (1 + 0.1 * torch.rand(8))  # drifted frequencies
    skew = torch.randn(16, 16, dtype=torch.float64) * 0.3
    basis = orthogonal_from_skew(skew)
    assert rel(basis @ basis.T, torch.eye(16, dtype=torch.float64)) < 1e-12
    assert torch.equal(orthogonal_from_skew(torch.zeros(16, 16)), torch.eye(16))
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def encode(x, n):
        cos, sin = rope_cos_sin(torch.tensor([[n]]), freq.double(), 1.0)
        return apply_grape_m(x, cos.double(), sin.double(), basis)

    # G(t)q · G(s)k depends on t − s only
    a = (encode(q, 40) * encode(k, 15)).sum()
    b = (encode(q, 1025) * encode(k, 1000)).sum()
    assert abs(a - b) < 1e-9


def test_router_and_experts_match_hf_mlp():
    torch.manual_seed(0)
    config = GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2)
    mlp = hf.GptOssMLP(config)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.5)  # large enough that the ±7 clamps engage
    x = torch.randn(3, 40, 32) * 3
    ref, _ = mlp(x)
    flat = x.reshape(-1, 32)
    logits = F.linear(flat, mlp.router.weight, mlp.router.bias)
    weights, idx = router_topk_softmax(logits, 2)
    _, ref_scores, ref_idx = mlp.router(flat)
    assert torch.equal(idx, ref_idx) and rel(weights, ref_scores) < 1e-6
    e = mlp.experts
    ours = experts_forward(flat, idx, weights, e.gate_up_proj, e.gate_up_proj_bias, e.down_proj, e.down_proj_bias)
    assert rel(ours.view_as(ref), ref) < 1e-5
    gate_up = torch.randn(10, 48) * 6
    assert torch.equal(clamped_swiglu_interleaved(gate_up), e._apply_gate(gate_up))
    stacked = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=-1)
    assert torch.equal(clamped_swiglu_stacked(stacked), e._apply_gate(gate_up))
