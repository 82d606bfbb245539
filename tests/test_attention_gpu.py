"""GPU: FlexAttention sink attention and the student's attention layers vs the exact reference (bf16)."""

import pytest
import torch

from megatron_student.ops.attention import sink_attention

pytestmark = pytest.mark.gpu


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("window,packed", [(128, False), (None, False), (128, True), (None, True)])
def test_flex_matches_reference_forward_and_backward(window, packed):
    torch.manual_seed(window or 7)
    B, T, Hq, Hkv, D = (1, 4096, 64, 8, 64)
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    sinks = (torch.randn(Hq, device="cuda") * 2).requires_grad_()
    cu = torch.tensor([0, 1000, 1111, 3000, T], device="cuda") if packed else None
    grad_out = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16)

    def run(backend, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)] + [sinks.detach().clone().requires_grad_()]
        out = sink_attention(*leaves, window=window, cu_seqlens=cu, backend=backend)
        out.backward(grad_out.to(cast))
        return out, [t.grad for t in leaves]

    fast, fast_grads = run("flex", torch.bfloat16)
    ref, ref_grads = run("reference", torch.float32)
    assert torch.isfinite(fast).all()
    assert rel(fast, ref) < 1e-2
    for name, a, b in zip("qkvs", fast_grads, ref_grads):
        assert rel(a, b) < 2e-2, name


def test_flex_serves_many_prompt_lengths_then_a_long_one():
    """Evaluation prefills prompts of every length: more than dynamo's recompile limit of distinct lengths must not
    push FlexAttention onto its eager path, which materialises the [T, T] scores (the long prompt would not fit)."""
    torch.manual_seed(3)
    Hq, Hkv, D = 64, 8, 64
    for T in [130 + 37 * i for i in range(12)] + [65536]:
        q = torch.randn(1, T, Hq, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, T, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        sinks = torch.randn(Hq, device="cuda")
        sink_attention(q, k, v, sinks, window=128, backend="flex")  # builds (and caches) the length's block mask
        torch.cuda.reset_peak_memory_stats()
        out = sink_attention(q, k, v, sinks, window=128, backend="flex")
        assert torch.cuda.max_memory_allocated() < 4 * 2**30, T  # eager scores at 64k: 64 heads x 64k x 64k
        if T < 1000:
            assert rel(out, sink_attention(q, k, v, sinks, window=128, backend="reference")) < 1e-2, T


def test_student_layers_on_gpu_match_cpu_reference(tmp_path):
    """SWA+TPA and KDA student layers: bf16 GPU fast paths vs the fp32 CPU reference on the same weights."""
    from transformers import GptOssConfig

    from megatron_student.student.config import StudentConfig
    from megatron_student.ops.rope import YarnRope
    from megatron_student.student.modeling import KdaAttention, SwaTpaAttention, make_positions
    from megatron_student.student.spec import layer_specs

    teacher = GptOssConfig(hidden_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                           num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)
    config = StudentConfig.from_teacher(teacher)
    specs = layer_specs(config)  # the default plan: SWA+TPA on the sliding layer 0, KDA on the full layer 1
    torch.manual_seed(0)
    for layer_cls, spec in ((SwaTpaAttention, specs[0]), (KdaAttention, specs[1])):
        layer = layer_cls(spec, 0)
        yarn = YarnRope.from_hf_config(config)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.02)
            if layer_cls is SwaTpaAttention:
                layer.k_a0.normal_(0, 1)
                layer.v_a0.normal_(0, 1)
                layer.sinks.normal_(0, 1)
            else:
                layer.A_log.uniform_(0, 1)
                layer.dt_bias.normal_(-4, 1)
                layer.o_norm_weight.fill_(1)
        x = torch.randn(1, 2048, 2880)
        ref = layer(x, make_positions(yarn, 1, 2048, "cpu"))
        gpu = layer.to("cuda", torch.bfloat16)
        if hasattr(gpu, "A_log"):
            gpu.A_log.data = gpu.A_log.data.float()
            gpu.dt_bias.data = gpu.dt_bias.data.float()
        out = gpu(x.to("cuda", torch.bfloat16), make_positions(yarn, 1, 2048, "cuda"))
        out.float().sum().backward()
        assert torch.isfinite(out).all()
        assert rel(out.float().cpu(), ref) < 2e-2, layer_cls.__name__
