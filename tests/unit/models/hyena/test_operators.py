"""Hyena convolutions: orientation, grouping and triple order pinned with hand-computable cases, and the
chunked FFT ops against straightforward references (direct conv, vortex FFT, the LI recurrence)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from torchtitan_hyena.models.hyena.args import HyenaArgs
from torchtitan_hyena.models.hyena.filters import mr_decay
from torchtitan_hyena.models.hyena.operators import HyenaOperator, ShortConv
from torchtitan_hyena.ops import fftconv


def operator(kind: str, dim: int = 4, groups: int = 2) -> HyenaOperator:
    """A Hyena operator whose projection routes input channel 0 -> every q, 1 -> every k, 2 -> every v,
    with an identity featurizer (current-token tap only) and an identity output projection."""
    args = HyenaArgs(dim=dim, layout=kind, n_heads=1, ffn_hidden_dim=8, filter_groups=groups, conv_impl="torch")
    op = HyenaOperator(args, kind)
    with torch.no_grad():
        w = torch.zeros(3 * dim, dim)
        w[0::3, 0], w[1::3, 1], w[2::3, 2] = 1.0, 1.0, 1.0
        op.projections.weight.copy_(w)
        op.featurizer.weight.copy_(torch.tensor([0.0, 0.0, 1.0]).repeat(3 * dim, 1))
        op.out_proj.weight.copy_(torch.eye(dim))
        op.out_proj.bias.zero_()
        for p in op.filter.parameters():
            p.copy_(torch.randn_like(p))
        if op.D is not None:
            op.D.copy_(torch.arange(1.0, dim + 1))
    return op


def impulse_input(length: int, dim: int = 4) -> torch.Tensor:
    """q = 1, k = impulse at t = 0, v = 1: the operator output is then its filter (+ D at t = 0)."""
    x = torch.zeros(1, length, dim)
    x[..., 0], x[0, 0, 1], x[..., 2] = 1.0, 1.0, 1.0
    return x


def test_featurizer_is_conv1d_order_last_tap_current_token():
    conv = ShortConv(2, 3, "torch")
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    x = torch.zeros(1, 5, 2)
    x[0, 0] = 1.0
    y = conv(x)[0]
    assert y[:, 0].tolist() == [3.0, 2.0, 1.0, 0.0, 0.0]  # w[:, 2] multiplies the current token
    assert y[:, 1].tolist() == [6.0, 5.0, 4.0, 0.0, 0.0]


def test_se_filter_conv1d_order_grouped_by_consecutive_channels_no_d_term():
    op = operator("S")
    y = op(impulse_input(9))[0].detach()
    h = op.filter.h.detach()  # (2 groups, 7 taps); channels 0,1 -> group 0; 2,3 -> group 1
    for c in range(4):
        g = c // 2
        assert torch.allclose(y[:7, c], h[g].flip(0)), c  # y[t] = h[g, 6 - t]
        assert torch.all(y[7:, c] == 0)
    assert op.D is None


def test_mr_filter_impulse_order_times_decay_plus_d():
    op = operator("D")
    y = op(impulse_input(130))[0].detach()
    h = op.filter.h_hat.detach().double() * mr_decay(2, 128, 8192, "weak")
    for c in range(4):
        want = h[c // 2].clone()
        want[0] += c + 1  # D term at lag 0
        assert torch.allclose(y[:128, c].double(), want, atol=1e-5), c  # y[t] = h[g, t]: h[0] is lag 0
        assert torch.all(y[128:, c] == 0)


def test_mr_decay_is_savanna_weak_preset():
    d = mr_decay(3, 4, 11, "weak")
    rates = [0.01, 1.0, 100.0]  # logspace(-2, 2, 3)
    for g, r in enumerate(rates):
        for n in range(4):
            assert math.isclose(d[g, n].item(), math.exp(-r * n / 10), rel_tol=1e-12)
    assert torch.equal(mr_decay(3, 4, 11, "weak", rows=(1, 3)), d[1:])  # TP slice keeps global rates


def test_li_modal_filter_sum_of_exponentials_plus_d():
    op = operator("H")
    length = 50
    y = op(impulse_input(length))[0].detach()
    p, gamma, R = (t.detach().double() for t in (op.filter.p, op.filter.gamma, op.filter.R))
    log_poles = -torch.exp(p) * torch.exp(gamma)
    t = torch.arange(length, dtype=torch.float64)
    for c in range(4):
        want = (R[c, :, None] * torch.exp(log_poles[c, :, None] * t)).sum(0)  # h[t] = sum_n R e^{log_pole t}
        want[0] += c + 1
        assert torch.allclose(y[:, c].double(), want, rtol=1e-4, atol=1e-5), c


def test_post_gate_is_channel_3i():
    """Swap roles: q = impulse, k = 1. The output must then vanish after t = 0 (q gates the conv output)."""
    op = operator("S")
    x = torch.zeros(1, 9, 4)
    x[0, 0, 0], x[..., 1], x[..., 2] = 1.0, 1.0, 1.0
    y = op(x)[0].detach()
    assert torch.all(y[1:] == 0) and torch.any(y[0] != 0)


def direct_conv(s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Causal conv with impulse response h (C, L) by F.conv1d: s (B, L, C)."""
    length = s.shape[1]
    xt = F.pad(s.transpose(1, 2).double(), (length - 1, 0))
    return F.conv1d(xt, h[:, :length].double().flip(-1).unsqueeze(1), groups=h.shape[0]).transpose(1, 2)


def qkv(b=2, length=37, c=6, dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(b, length, c, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("block", [10**9, 2 * 37])  # one block; then two channels per block
def test_explicit_fft_conv_matches_direct_conv_fwd_bwd(monkeypatch, block):
    monkeypatch.setattr(fftconv, "BLOCK_ELEMENTS", block)
    q, k, v = qkv()
    h = torch.randn(6, 40, requires_grad=True)
    skip = torch.randn(6, requires_grad=True)
    y = fftconv.gated_fft_conv(q, k, v, h, skip)
    s = k.double() * v.double()
    ref = q.double() * (direct_conv(s, h) + skip.double() * s)
    assert torch.allclose(y.double(), ref, atol=1e-4)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [q, k, v, h, skip], g)
    want = torch.autograd.grad(ref, [q, k, v, h, skip], g.double())
    for a, b in zip(got, want):
        assert torch.allclose(a.double(), b.double(), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("block", [10**9, 2 * 37])
def test_modal_fft_conv_matches_vortex_reference_fwd_bwd(monkeypatch, block):
    monkeypatch.setattr(fftconv, "BLOCK_ELEMENTS", block)
    q, k, v = qkv()
    log_poles = (-torch.rand(6, 4) * 0.5 - 0.01).requires_grad_()
    residues = torch.randn(6, 4, requires_grad=True)
    skip = torch.randn(6, requires_grad=True)
    y = fftconv.gated_modal_fft_conv(q, k, v, log_poles, residues, skip)
    h = fftconv.modal_filter_reference(log_poles, residues, 37)  # materialises (D, N, L)
    ref = fftconv.gated_fft_conv_reference(q, k, v, h, skip)
    assert torch.allclose(y, ref, atol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [q, k, v, log_poles, residues, skip], g)
    want = torch.autograd.grad(ref, [q, k, v, log_poles, residues, skip], g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_modal_fft_conv_equals_recurrent_form():
    """vortex step_iir: state_n <- lambda_n state_n + s_t; y_t = q_t (sum_n R_n state_n + D s_t)."""
    q, k, v = (t.detach().double() for t in qkv(b=1, length=20, c=3))
    log_poles, residues, skip = -torch.rand(3, 16).double() * 0.3, torch.randn(3, 16).double(), torch.randn(3).double()
    y = fftconv.gated_modal_fft_conv(q.float(), k.float(), v.float(), log_poles.float(), residues.float(), skip.float())
    state = torch.zeros(3, 16, dtype=torch.float64)
    for t in range(20):
        s = k[0, t] * v[0, t]
        state = torch.exp(log_poles) * state + s[:, None]
        want = q[0, t] * ((residues * state).sum(-1) + skip * s)
        assert torch.allclose(y[0, t].double(), want, atol=1e-5), t


def test_modal_basis_matches_direct_exponentials_at_long_length():
    a = -torch.logspace(-6, 0, 9, dtype=torch.float64)
    got = fftconv.modal_basis(a.float(), 100_003).double()
    want = torch.exp(a[:, None] * torch.arange(100_003, dtype=torch.float64))
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=2e-5, atol=1e-30)


def test_fft_conv_keeps_dtype_and_computes_in_fp32():
    q, k, v = (t.detach() for t in qkv())
    log_poles, residues, skip = -torch.rand(6, 16) * 0.1, torch.randn(6, 16), torch.randn(6)
    ref = fftconv.gated_modal_fft_conv(q, k, v, log_poles, residues, skip)
    y = fftconv.gated_modal_fft_conv(q.bfloat16(), k.bfloat16(), v.bfloat16(), log_poles, residues, skip)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), ref, atol=0.05 * ref.abs().max().item())


def test_fft_ops_trace_under_compile():
    q, k, v = (t.detach() for t in qkv())
    log_poles, residues, skip = -torch.rand(6, 16) * 0.1, torch.randn(6, 16), torch.randn(6)
    eager = fftconv.gated_modal_fft_conv(q, k, v, log_poles, residues, skip)
    compiled = torch.compile(fftconv.gated_modal_fft_conv, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(q, k, v, log_poles, residues, skip), eager)


def test_fft_conv_shape_errors():
    q, k, v = (t.detach() for t in qkv())
    with pytest.raises(ValueError, match="shorter than the sequence"):
        fftconv.gated_fft_conv(q, k, v, torch.zeros(6, 10), torch.zeros(6))
    with pytest.raises(ValueError, match="channels"):
        fftconv.gated_modal_fft_conv(q, k, v, -torch.ones(5, 16), torch.ones(5, 16), torch.zeros(5))
