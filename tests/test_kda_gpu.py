"""GPU tests of megatron_student.ops.kda: fla's Triton kernels (through our dispatch) against our
pure-torch reference; our CUDA conv/norm (fla's kernels through our dispatch) against our torch path on
the CPU; our gate against fla's fused gate kernel.

Every test is marked ``gpu`` (conftest skips them without CUDA). The reference runs on the same
GPU in fp32 on the bf16-rounded inputs, so differences are the kernels' bf16 intermediates.
Error metric as fla's tests: ``ratio = rms(a - b) / rms(b)``; thresholds are a little looser than
fla's own (0.005 forward, 0.008-0.02 gradients) because T and H go up to gpt-oss size here.
"""

import math

import pytest
import torch

from megatron_student.ops.kda import (
    causal_short_conv,
    kda,
    kda_gate,
    kda_recurrent_step,
    kda_reference,
)
from megatron_student.ops.norm import gated_rms_norm

pytestmark = pytest.mark.gpu

FWD_TOL = 1e-2
GRAD_TOL = 2e-2


def ratio(a, b):
    a, b = a.double(), b.double()
    return ((a - b).square().mean().sqrt() / b.square().mean().sqrt().clamp_min(1e-30)).item()


def make_inputs(B, T, H, HV, K, V, n_states=None, seed=0, lower_bound=None, dtype=torch.bfloat16):
    """Raw q/k/v like the layer's (post-conv SiLU scale), gate from kda_gate with the layer's init."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    q, k = rnd(B, T, H, K).to(dtype), rnd(B, T, H, K).to(dtype)
    v = rnd(B, T, HV, V).to(dtype)
    A_log = torch.log(torch.rand(HV, generator=gen, device="cuda") * 15 + 1)
    dt = torch.exp(torch.rand(HV * K, generator=gen, device="cuda") * math.log(100.0) + math.log(1e-3))  # logU(1e-3, 0.1)
    dt_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus, as fla's layer init
    g = kda_gate(rnd(B, T, HV * K), A_log, dt_bias, lower_bound=lower_bound)  # fp32
    beta = torch.sigmoid(rnd(B, T, HV)).to(dtype)
    h0 = rnd(n_states or B, HV, K, V)
    return q, k, v, g, beta, h0


def run_with_grads(fn, inputs, do, dht):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o, ht = fn(*leaves)
    ((o.float() * do).sum() + (ht * dht).sum()).backward()
    return o.detach(), ht.detach(), [x.grad for x in leaves]


def check_chunk_against_reference(B, T, H, HV, K, V, cu_seqlens=None, lower_bound=None, safe_gate=False):
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, n_states=N, lower_bound=lower_bound)
    gen = torch.Generator(device="cuda").manual_seed(1)
    do = torch.randn(B, T, HV, V, generator=gen, device="cuda")
    dht = torch.randn(N, HV, K, V, generator=gen, device="cuda")

    def tri(q, k, v, g, beta, h0):
        return kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens,
                   safe_gate=safe_gate)

    def ref(q, k, v, g, beta, h0):
        return kda_reference(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)

    o, ht, grads = run_with_grads(tri, (q, k, v, g, beta, h0), do, dht)
    o_ref, ht_ref, grads_ref = run_with_grads(ref, [x.float() for x in (q, k, v, g, beta, h0)], do, dht)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    errs = {"o": ratio(o, o_ref), "ht": ratio(ht, ht_ref)}
    errs.update({f"d{n}": ratio(a, b) for n, a, b in zip(("q", "k", "v", "g", "beta", "h0"), grads, grads_ref)})
    print(errs)
    assert errs["o"] < FWD_TOL and errs["ht"] < FWD_TOL, errs
    assert all(e < GRAD_TOL for n, e in errs.items() if n.startswith("d")), errs


@pytest.mark.parametrize("H,HV", [(4, 4), (2, 8)])
def test_chunk_kda_forward_backward_matches_reference(H, HV):
    check_chunk_against_reference(B=2, T=1000, H=H, HV=HV, K=64, V=64)


def test_chunk_kda_varlen_matches_reference():
    cu = torch.tensor([0, 1, 100, 612, 613, 1500, 2048], device="cuda")
    check_chunk_against_reference(B=1, T=2048, H=4, HV=4, K=64, V=64, cu_seqlens=cu)


def test_chunk_kda_safe_gate_matches_reference():
    check_chunk_against_reference(B=1, T=777, H=4, HV=4, K=64, V=64, lower_bound=-5.0, safe_gate=True)


def test_chunk_kda_gpt_oss_width():
    check_chunk_against_reference(B=1, T=4096, H=64, HV=64, K=64, V=64)


@pytest.mark.parametrize("T", [1, 16])
def test_fused_recurrent_decode_matches_reference(T):
    B, H, HV, K, V = 3, 4, 8, 64, 64
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, seed=2)
    with torch.no_grad():
        o, ht = kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        S, outs = h0, []
        for t in range(T):
            o_t, S = kda_recurrent_step(
                q[:, t].float(), k[:, t].float(), v[:, t].float(), g[:, t], beta[:, t].float(), S
            )
            outs.append(o_t)
    o_ref = torch.stack(outs, 1)
    assert ratio(o, o_ref) < FWD_TOL
    assert ratio(ht, S) < FWD_TOL


def test_fused_recurrent_varlen_decode():
    N, H, HV, K, V = 5, 2, 4, 64, 32
    cu = torch.arange(N + 1, device="cuda")  # one new token per sequence
    q, k, v, g, beta, h0 = make_inputs(1, N, H, HV, K, V, n_states=N, seed=3)
    with torch.no_grad():
        o, ht = kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        o_ref, ht_ref = kda_reference(
            *(x.float() for x in (q, k, v, g, beta)), initial_state=h0, output_final_state=True, cu_seqlens=cu
        )
    assert ratio(o, o_ref) < FWD_TOL
    assert ratio(ht, ht_ref) < FWD_TOL


def test_short_conv_cuda_path_matches_cpu_reference():
    """On CUDA causal_short_conv runs fla's Triton kernel; the CPU path is our exact torch conv."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    D, W = 256, 4
    lens = [3, 50, 1, 200]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda")
    x = torch.randn(1, sum(lens), D, generator=gen, device="cuda").bfloat16()
    w = torch.randn(D, W, generator=gen, device="cuda")
    b = torch.randn(D, generator=gen, device="cuda")
    h0 = torch.randn(len(lens), D, W, generator=gen, device="cuda").bfloat16()
    y, ht = causal_short_conv(x, w, b, cu_seqlens=cu, initial_state=h0, output_final_state=True)
    y_ref, ht_ref = causal_short_conv(x.cpu().float(), w.cpu(), b.cpu(), cu_seqlens=cu.cpu(),
                                      initial_state=h0.cpu().float(), output_final_state=True)
    assert ratio(y.cpu(), y_ref) < 1e-2
    torch.testing.assert_close(ht.float().cpu(), ht_ref)
    # batched, no state, with gradients
    xb = torch.randn(2, 33, D, generator=gen, device="cuda").bfloat16().requires_grad_()
    yb, _ = causal_short_conv(xb, w, b)
    yb.float().square().sum().backward()
    xr = xb.detach().cpu().float().requires_grad_()
    yr, _ = causal_short_conv(xr, w.cpu(), b.cpu())
    yr.square().sum().backward()
    assert ratio(yb.detach().cpu(), yr.detach()) < 1e-2
    assert ratio(xb.grad.cpu(), xr.grad) < 2e-2


def test_gated_rms_norm_cuda_path_matches_fla_module_and_cpu():
    from fla.modules import FusedRMSNormGated

    gen = torch.Generator(device="cuda").manual_seed(5)
    norm = FusedRMSNormGated(64, eps=1e-5, activation="sigmoid").cuda()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=gen, device="cuda") + 0.5)
    x = torch.randn(2, 100, 8, 64, generator=gen, device="cuda").bfloat16()
    gate = torch.randn(2, 100, 8, 64, generator=gen, device="cuda").bfloat16()
    y = gated_rms_norm(x, norm.weight, gate, 1e-5)
    assert ratio(y, norm(x, gate)) < 1e-2
    y_cpu = gated_rms_norm(x.cpu().float(), norm.weight.detach().cpu(), gate.cpu().float(), 1e-5)
    assert ratio(y.cpu(), y_cpu) < 1e-2


def test_kda_gate_matches_fla_kernel():
    from fla.ops.kda.gate import fused_kda_gate

    gen = torch.Generator(device="cuda").manual_seed(6)
    HV, K = 8, 64
    f = torch.randn(2, 300, HV * K, generator=gen, device="cuda").bfloat16()
    A_log = torch.randn(HV, generator=gen, device="cuda")
    dt_bias = torch.randn(HV * K, generator=gen, device="cuda")
    for lb in (None, -5.0):
        g = kda_gate(f, A_log, dt_bias, lower_bound=lb)
        g_fla = fused_kda_gate(f.view(2, 300, HV, K), A_log, dt_bias, lower_bound=lb)
        assert ratio(g, g_fla) < 1e-4
