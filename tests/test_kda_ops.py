"""CPU tests of the KDA math in megatron_student.ops.kda.

Independent references: fla 0.6.0's ``naive_recurrent_kda`` / ``naive_chunk_kda`` (they compute in
fp32 internally whatever the input dtype, so comparisons with them use fp32-level tolerances), fla's
torch gate references, and float64 formulas written out here.

Error metric (as fla's own tests): ``ratio = rms(a - b) / rms(b)``.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fla warns that Triton has no GPU here
    from fla.ops.kda.gate import naive_kda_gate, naive_kda_lowerbound_gate
    from fla.ops.kda.naive import naive_chunk_kda, naive_recurrent_kda

from megatron_student.ops.kda import (
    causal_short_conv,
    kda,
    kda_gate,
    kda_recurrent_step,
    kda_reference,
    l2_normalize,
)
from megatron_student.ops.norm import gated_rms_norm

F64 = torch.float64


def ratio(a, b):
    a, b = a.double(), b.double()
    return ((a - b).square().mean().sqrt() / b.square().mean().sqrt()).item()


def make_inputs(B, T, H, HV, K, V, dtype=F64, seed=0, decay="moderate", n_states=None):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    q, k = rnd(B, T, H, K), rnd(B, T, H, K)
    v = rnd(B, T, HV, V)
    if decay == "moderate":
        g = F.logsigmoid(rnd(B, T, HV, K))
    else:  # strong: per-step log-decay down to about -40; a chunk of 64 sums to -1000s
        g = -torch.exp(rnd(B, T, HV, K) * 1.5) * 4.0
    beta = torch.sigmoid(rnd(B, T, HV))
    h0 = rnd(n_states or B, HV, K, V)
    cast = lambda x: x.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(g), cast(beta), h0.float() if dtype != F64 else h0


def l2n_f64(x):
    """fla's l2norm written out in float64: x / sqrt(sum x^2 + 1e-6)."""
    x = x.double()
    return x / torch.sqrt(x.square().sum(-1, keepdim=True) + 1e-6)


def recurrent_loop(q, k, v, g, beta, h0, **kw):
    """Token-by-token decode with kda_recurrent_step."""
    S, outs = h0, []
    for t in range(q.shape[1]):
        o, S = kda_recurrent_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S, **kw)
        outs.append(o)
    return torch.stack(outs, 1), S


# ---------------------------------------------------------------------------------------------
# KDA reference vs fla's naive references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("H,HV", [(2, 2), (2, 6)])
def test_reference_matches_fla_naive_recurrent(dtype, H, HV):
    B, T, K, V = 2, 150, 32, 24  # 150: three chunks, the last one partial
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, dtype=dtype, seed=1)
    o, ht = kda_reference(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_ref, ht_ref = naive_recurrent_kda(
        l2n_f64(q).float(), l2n_f64(k).float(), v.float(), g.float(), beta.float(),
        initial_state=h0.float(), output_final_state=True,
    )
    assert o.dtype == dtype and ht.dtype == (F64 if dtype == F64 else torch.float32)
    assert o.shape == (B, T, HV, V) and ht.shape == (B, HV, K, V)
    # naive_recurrent_kda runs in fp32 over 150 steps: fp32-level agreement
    assert ratio(o, o_ref) < 1e-5
    assert ratio(ht, ht_ref) < 1e-5


def test_reference_matches_fla_naive_chunk_without_l2norm():
    B, T, H, HV, K, V = 1, 128, 2, 4, 16, 16
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, seed=2)
    qn, kn = l2n_f64(q), l2n_f64(k)
    scale = 0.3
    o, ht = kda_reference(
        qn, kn, v, g, beta, scale=scale, initial_state=h0, output_final_state=True, use_qk_l2norm=False
    )
    o_ref, ht_ref = naive_chunk_kda(qn, kn, v, g, beta, scale=scale, initial_state=h0, output_final_state=True)
    assert ratio(o, o_ref) < 1e-5
    assert ratio(ht, ht_ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# chunked reference vs token-by-token recurrence (float64: exact agreement)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("decay", ["moderate", "strong"])
def test_chunked_matches_recurrent_steps(chunk_size, decay):
    B, T, H, HV, K, V = 2, 75, 2, 4, 16, 8
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, seed=3, decay=decay)
    o, ht = kda_reference(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk_size)
    o_rec, ht_rec = recurrent_loop(q, k, v, g, beta, h0)
    assert ratio(o, o_rec) < 1e-10
    assert ratio(ht, ht_rec) < 1e-10


def test_recurrent_step_matches_naive_and_zero_state():
    B, T, H, HV, K, V = 3, 20, 1, 2, 8, 8
    q, k, v, g, beta, _ = make_inputs(B, T, H, HV, K, V, seed=4)
    o_rec, ht_rec = recurrent_loop(q, k, v, g, beta, None)
    o_ref, ht_ref = naive_recurrent_kda(l2n_f64(q), l2n_f64(k), v, g, beta, output_final_state=True)
    assert ratio(o_rec, o_ref) < 1e-5
    assert ratio(ht_rec, ht_ref) < 1e-5


def test_strong_decay_stays_finite_and_exact_in_fp32():
    """Chunk-summed log-decays of -1000s must not overflow/underflow the fp32 reference."""
    B, T, H, HV, K, V = 1, 192, 2, 2, 32, 32
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, seed=5, decay="strong")
    assert g.sum(1).min() < -1000
    o32, ht32 = kda_reference(
        q.float(), k.float(), v.float(), g.float(), beta.float(), initial_state=h0.float(), output_final_state=True
    )
    o64, ht64 = kda_reference(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert torch.isfinite(o32).all() and torch.isfinite(ht32).all()
    assert ratio(o32, o64) < 1e-5
    assert ratio(ht32, ht64) < 1e-5


def test_bf16_inputs_compute_in_fp32():
    B, T, H, HV, K, V = 1, 70, 2, 2, 16, 16
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, seed=6)
    bf = [x.to(torch.bfloat16) for x in (q, k, v, beta)]
    o, ht = kda(bf[0], bf[1], bf[2], g.float(), bf[3], initial_state=h0.float(), output_final_state=True)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    o_ref, ht_ref = kda_reference(
        *(x.double() for x in bf[:3]), g, bf[3].double(), initial_state=h0.float().double(), output_final_state=True
    )
    assert ratio(o, o_ref) < 8e-3  # bf16 rounding of the output only
    assert ratio(ht, ht_ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# varlen and state chaining
# ---------------------------------------------------------------------------------------------


def test_kda_varlen_equals_separate_runs():
    H, HV, K, V = 2, 4, 16, 8
    lens = [5, 0, 70, 1, 64, 30]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    T, N = sum(lens), len(lens)
    q, k, v, g, beta, h0 = make_inputs(1, T, H, HV, K, V, seed=7, n_states=N)
    o, ht = kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert o.shape == (1, T, HV, V) and ht.shape == (N, HV, K, V)
    for n in range(N):
        a, b = cu[n].item(), cu[n + 1].item()
        if a == b:  # an empty document keeps its initial state
            torch.testing.assert_close(ht[n], h0[n], rtol=0, atol=0)
            continue
        sl = slice(a, b)
        o_n, ht_n = kda_reference(
            q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=h0[n : n + 1], output_final_state=True
        )
        assert ratio(o[:, sl], o_n) < 1e-10
        assert ratio(ht[n : n + 1], ht_n) < 1e-10


@pytest.mark.parametrize("split", [1, 37, 64, 100])
def test_kda_state_chaining(split):
    B, T, H, HV, K, V = 2, 130, 2, 2, 16, 16
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, seed=8)
    o, ht = kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    a, b = slice(0, split), slice(split, T)
    o1, h1 = kda(q[:, a], k[:, a], v[:, a], g[:, a], beta[:, a], initial_state=h0, output_final_state=True)
    o2, h2 = kda(q[:, b], k[:, b], v[:, b], g[:, b], beta[:, b], initial_state=h1, output_final_state=True)
    assert ratio(torch.cat([o1, o2], 1), o) < 1e-10
    assert ratio(h2, ht) < 1e-10


def test_kda_decode_one_token_at_a_time_with_dispatch():
    B, T, H, HV, K, V = 2, 12, 1, 2, 8, 8
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, seed=9)
    o, ht = kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    S, outs = h0, []
    for t in range(T):
        s = slice(t, t + 1)
        o_t, S = kda(q[:, s], k[:, s], v[:, s], g[:, s], beta[:, s], initial_state=S, output_final_state=True)
        outs.append(o_t)
    assert ratio(torch.cat(outs, 1), o) < 1e-10
    assert ratio(S, ht) < 1e-10


# ---------------------------------------------------------------------------------------------
# gate, norm, l2norm
# ---------------------------------------------------------------------------------------------


def test_kda_gate_matches_fla_reference():
    gen = torch.Generator().manual_seed(10)
    B, T, HV, K = 2, 9, 3, 16
    f = torch.randn(B, T, HV * K, generator=gen) * 4  # reaches softplus' linear (> 20) regime
    A_log = torch.log(torch.empty(HV).uniform_(1, 16, generator=gen))
    dt_bias = torch.randn(HV * K, generator=gen)
    g = kda_gate(f, A_log, dt_bias)
    assert g.shape == (B, T, HV, K) and g.dtype == torch.float32
    torch.testing.assert_close(g, naive_kda_gate(f.view(B, T, HV, K), A_log, dt_bias), rtol=1e-6, atol=1e-6)
    assert (g <= 0).all()
    g_lb = kda_gate(f.bfloat16(), A_log, dt_bias, lower_bound=-5.0)
    assert g_lb.dtype == torch.float32
    ref_lb = naive_kda_lowerbound_gate(f.bfloat16().view(B, T, HV, K), A_log, dt_bias, lower_bound=-5.0)
    torch.testing.assert_close(g_lb, ref_lb, rtol=1e-6, atol=1e-6)
    assert (g_lb >= -5).all() and (g_lb <= 0).all()
    # without dt_bias, independent float64 formula
    g0 = kda_gate(f.double(), A_log.double())
    exp = -A_log.double().exp()[:, None] * torch.log1p(torch.exp(f.double().view(B, T, HV, K)))
    torch.testing.assert_close(g0, exp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["sigmoid", "swish"])
def test_gated_rms_norm_matches_float64_formula(activation):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 3, 32, generator=gen) * 3
    gate = torch.randn(2, 5, 3, 32, generator=gen)
    w = torch.randn(32, generator=gen)
    eps = 1e-5
    xd, gd = x.double(), gate.double()
    act = torch.sigmoid(gd) if activation == "sigmoid" else gd / (1 + torch.exp(-gd))
    ref = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps) * w.double() * act
    y = gated_rms_norm(x, w, gate, eps, activation=activation)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    yb = gated_rms_norm(x.bfloat16(), w, gate.bfloat16(), eps, activation=activation)
    assert yb.dtype == torch.bfloat16
    assert ratio(yb, ref) < 1e-2
    y_nw = gated_rms_norm(x, None, gate, eps, activation=activation)
    torch.testing.assert_close(y_nw.double(), ref / w.double(), rtol=1e-5, atol=1e-6)


def test_l2_normalize_uses_eps_inside_sqrt():
    x = torch.tensor([[3.0, 4.0], [1e-4, 0.0]], dtype=F64)
    y = l2_normalize(x)
    torch.testing.assert_close(y, x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6), rtol=1e-14, atol=0)
    assert y[1, 0] < 0.1  # F.normalize would give 1.0 here


# ---------------------------------------------------------------------------------------------
# short convolution
# ---------------------------------------------------------------------------------------------


def conv_ref(x, w, b, h0, act=True):
    """float64 formula per sequence: prepend the W-entry state, weight[:, -1] on the current token."""
    x, w = x.double(), w.double()
    B, T, D = x.shape
    W = w.shape[1]
    full = torch.cat([h0.double().transpose(1, 2) if h0 is not None else x.new_zeros(B, W, D), x], 1)
    y = sum(w[:, j] * full[:, 1 + j : 1 + j + T] for j in range(W))
    if b is not None:
        y = y + b.double()
    return (F.silu(y) if act else y), full[:, -W:].transpose(1, 2)


def conv_inputs(B, T, D, W=4, seed=12, n_states=None):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, T, D, generator=gen),
        torch.randn(D, W, generator=gen),
        torch.randn(D, generator=gen),
        torch.randn(n_states or B, D, W, generator=gen),
    )


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_short_conv_matches_formula(with_state, with_bias):
    x, w, b, h0 = conv_inputs(2, 11, 6)
    b = b if with_bias else None
    h0 = h0 if with_state else None
    y, ht = causal_short_conv(x, w, b, initial_state=h0, output_final_state=True)
    y_ref, ht_ref = conv_ref(x, w, b, h0)
    assert y.dtype == x.dtype and ht.shape == (2, 6, 4)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ht.double(), ht_ref, rtol=0, atol=0)
    y_lin, _ = causal_short_conv(x, w, b, activation=None, initial_state=h0)
    torch.testing.assert_close(y_lin.double(), conv_ref(x, w, b, h0, act=False)[0], rtol=1e-5, atol=1e-6)


def test_short_conv_varlen_equals_separate_runs():
    lens = [3, 0, 17, 1, 9]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    x, w, b, h0 = conv_inputs(1, sum(lens), 5, seed=13, n_states=len(lens))
    y, ht = causal_short_conv(x, w, b, cu_seqlens=cu, initial_state=h0, output_final_state=True)
    for n in range(len(lens)):
        sl = slice(cu[n].item(), cu[n + 1].item())
        y_n, ht_n = causal_short_conv(x[:, sl], w, b, initial_state=h0[n : n + 1], output_final_state=True)
        torch.testing.assert_close(y[:, sl], y_n, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ht[n : n + 1], ht_n, rtol=0, atol=0)
    torch.testing.assert_close(ht[1], h0[1], rtol=0, atol=0)  # empty document
    # without initial states the documents start from zeros, not from their predecessor's inputs
    y0, _ = causal_short_conv(x, w, b, cu_seqlens=cu)
    sl = slice(cu[2].item(), cu[3].item())
    torch.testing.assert_close(y0[:, sl].double(), conv_ref(x[:, sl], w, b, None)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("split", [1, 2, 6])
def test_short_conv_state_chaining_and_decode(split):
    x, w, b, h0 = conv_inputs(2, 9, 4, seed=14)
    y, ht = causal_short_conv(x, w, b, initial_state=h0, output_final_state=True)
    y1, h1 = causal_short_conv(x[:, :split], w, b, initial_state=h0, output_final_state=True)
    y2, h2 = causal_short_conv(x[:, split:], w, b, initial_state=h1, output_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h2, ht, rtol=0, atol=0)
    S, outs = h0, []
    for t in range(x.shape[1]):
        y_t, S = causal_short_conv(x[:, t : t + 1], w, b, initial_state=S, output_final_state=True)
        outs.append(y_t)
    torch.testing.assert_close(torch.cat(outs, 1), y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(S, ht, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# gradients (float64 gradcheck of the differentiable CPU path)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("varlen", [False, True])
def test_kda_reference_gradcheck(varlen):
    # chunk_size 16 with T = 21 exercises two chunks, two sub-blocks per chunk and padding
    B, T, H, HV, K, V = 1, 21, 1, 2, 4, 3
    cu = torch.tensor([0, 6, 21]) if varlen else None
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, seed=15, n_states=2 if varlen else 1)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]

    def fn(q, k, v, g, beta, h0):
        o, ht = kda_reference(
            q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu, chunk_size=16
        )
        return o, ht

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_recurrent_step_gradcheck():
    q, k, v, g, beta, h0 = make_inputs(2, 1, 1, 2, 4, 3, seed=16)
    inputs = [x[:, 0].clone().requires_grad_() for x in (q, k, v, g, beta)] + [h0.clone().requires_grad_()]
    assert torch.autograd.gradcheck(lambda *a: kda_recurrent_step(*a), inputs, eps=1e-6, atol=1e-7)


def test_conv_gate_norm_gradcheck():
    cu = torch.tensor([0, 2, 7])
    x, w, b, h0 = (t.double().requires_grad_() for t in conv_inputs(1, 7, 3, seed=17, n_states=2))
    assert torch.autograd.gradcheck(
        lambda *a: causal_short_conv(a[0], a[1], a[2], cu_seqlens=cu, initial_state=a[3], output_final_state=True),
        (x, w, b, h0),
    )
    gen = torch.Generator().manual_seed(18)
    f = torch.randn(2, 3, 8, generator=gen, dtype=F64, requires_grad=True)
    A_log = torch.rand(2, generator=gen, dtype=F64, requires_grad=True)
    dt = torch.randn(8, generator=gen, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: kda_gate(*a), (f, A_log, dt))
    assert torch.autograd.gradcheck(lambda *a: kda_gate(*a, lower_bound=-5.0), (f, A_log, dt))
    xn = torch.randn(3, 8, generator=gen, dtype=F64, requires_grad=True)
    gn = torch.randn(3, 8, generator=gen, dtype=F64, requires_grad=True)
    wn = torch.randn(8, generator=gen, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: gated_rms_norm(a[0], a[1], a[2], 1e-5), (xn, wn, gn))


# ---------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------


def test_kda_rejects_bad_shapes():
    q, k, v, g, beta, h0 = make_inputs(2, 5, 2, 4, 8, 8, seed=19)
    with pytest.raises(ValueError, match="K=300 exceeds 256"):
        z = torch.zeros(1, 2, 1, 300)
        kda(z, z, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 300), torch.zeros(1, 2, 1))
    with pytest.raises(ValueError, match="HV=3 .* multiple of q/k heads H=2"):
        kda(q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3])
    with pytest.raises(ValueError, match="batch size must be 1"):
        kda(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="initial_state must be"):
        kda(q, k, v, g, beta, initial_state=h0.transpose(-1, -2)[:, :, :, :4])
    with pytest.raises(ValueError, match="initial_state must be \\[N, HV, K, V\\]=\\[1,"):
        kda(q[:1], k[:1], v[:1], g[:1], beta[:1], initial_state=h0, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="initial_state must be float32"):
        kda(q, k, v, g, beta, initial_state=h0.half())
    with pytest.raises(ValueError, match="g must be"):
        kda(q, k, v, g[..., :4], beta)
    with pytest.raises(ValueError, match="beta must be"):
        kda(q, k, v, g, beta[:, :, :2])
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at T=5"):
        kda(q[:1], k[:1], v[:1], g[:1], beta[:1], cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="k shape"):
        kda(q, k[:, :, :1], v, g, beta)


def test_conv_and_gate_reject_bad_shapes():
    x, w, b, h0 = conv_inputs(2, 5, 6)
    with pytest.raises(ValueError, match="weight must be \\[D, W\\]"):
        causal_short_conv(x, w[:, None])
    with pytest.raises(ValueError, match="initial_state must be \\[N, D, W\\]"):
        causal_short_conv(x, w, initial_state=h0.transpose(1, 2))
    with pytest.raises(ValueError, match="batch size must be 1"):
        causal_short_conv(x, w, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="not a multiple of HV=4"):
        kda_gate(torch.zeros(1, 2, 6), torch.zeros(4), None)
    with pytest.raises(ValueError, match="dt_bias must have shape"):
        kda_gate(torch.zeros(1, 2, 8), torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="gate shape"):
        gated_rms_norm(torch.zeros(2, 4), torch.ones(4), torch.zeros(2, 3))
