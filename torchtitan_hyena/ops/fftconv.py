"""Gated causal FFT convolution for Hyena-LI, in fp32, chunked over channels.

``y = q * (h * s + skip * s)`` with ``s = k * v``; q, k, v are (B, L, D) and ``h * s`` is the causal
depthwise convolution with the impulse response ``h[d, t]`` (``h[:, 0]`` = lag 0), computed as
``irfft(rfft(s, 2L) * rfft(h, 2L), 2L)[:L]``: with n = 2L the circular product is the exact linear
convolution (savanna ``fftconv``, vortex ``engine.fftconv_func``). Two filters:

* ``gated_fft_conv(q, k, v, h, skip)``: an explicit (D, >=L) filter, e.g. Hyena's implicit MLP filter.
* ``gated_modal_fft_conv(q, k, v, log_poles, residues, skip)``: the Evo 2 ``implicit_modal`` filter
  ``h[d, t] = sum_n residues[d, n] * exp(log_poles[d, n] * t)`` (t = 0..L-1), built inside the op.

Memory is why these are custom ops rather than a few lines of autograd. The reference builds the modal
filter as a (D, 16, L) tensor (34 GB for 7B at 131k) and autograd would keep every FFT. Here the work
runs over blocks of channels: each block builds its slice of the filter one mode at a time, convolves
and writes its slice of the output, so the temporaries are a few block-sized tensors. Forward saves only
q, k, v and the filter parameters; backward recomputes the block FFTs (cheap next to the projections)
and reduces the filter gradient straight to ``residues``/``log_poles`` gradients. All arithmetic is
fp32 whatever the input dtype; outputs and input gradients come back in the inputs' dtypes.

Being opaque ``torch.library`` ops, they run unchanged under torch.compile (fullgraph), FSDP and
activation checkpointing; under tensor parallelism callers pass each rank's local channel slice.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Elements (batch x channels x length) per channel block: ~4 MiB per fp32 (B, c, L) temporary.
BLOCK_ELEMENTS = 1 << 20


def channel_block(batch: int, length: int, channels: int, budget: int | None = None) -> int:
    """Channels per block so that one (B, c, L) fp32 temporary holds about ``budget`` (BLOCK_ELEMENTS) values."""
    return max(1, min(channels, (budget or BLOCK_ELEMENTS) // max(1, batch * length)))


def modal_basis(log_pole: Tensor, length: int) -> Tensor:
    """``exp(log_pole[:, None] * t)``, t = 0..length-1, fp32, as an outer product of two short exp tables:
    exp(a (jT + i)) = exp(a jT) exp(a i). One multiply per element instead of one exp (the CPU hot spot)."""
    a = log_pole.float()[:, None]
    tile = 1 << max(0, math.ceil(math.log2(length)) // 2)
    steps = -(-length // tile)
    fine = torch.exp(a * torch.arange(tile, device=a.device, dtype=torch.float32))
    coarse = torch.exp(a * (torch.arange(steps, device=a.device, dtype=torch.float32) * tile))
    return (coarse[:, :, None] * fine[:, None, :]).reshape(a.shape[0], steps * tile)[:, :length]


def modal_filter_block(log_poles: Tensor, residues: Tensor, length: int) -> Tensor:
    """``sum_n residues[:, n] * exp(log_poles[:, n] * t)`` for a block of channels, one mode at a time."""
    h = torch.zeros(log_poles.shape[0], length, device=log_poles.device, dtype=torch.float32)
    for n in range(log_poles.shape[1]):
        h.add_(modal_basis(log_poles[:, n], length) * residues[:, n, None].float())
    return h


def _block_inputs(q: Tensor, k: Tensor, v: Tensor, sl: slice) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 (B, c, L) views of one channel block: q, k, v."""
    qb, kb, vb = (x[..., sl].float().transpose(1, 2) for x in (q, k, v))
    return qb, kb, vb


def _forward_block(qb: Tensor, s: Tensor, h: Tensor, skip: Tensor) -> Tensor:
    n = 2 * s.shape[-1]
    conv = torch.fft.irfft(torch.fft.rfft(s, n=n) * torch.fft.rfft(h, n=n), n=n)[..., : s.shape[-1]]
    return qb * (conv + skip[:, None] * s)


def _run_forward(q: Tensor, k: Tensor, v: Tensor, skip: Tensor, filter_block) -> Tensor:
    batch, length, channels = q.shape
    out = torch.empty_like(q)
    step = channel_block(batch, length, channels)
    for start in range(0, channels, step):
        sl = slice(start, min(start + step, channels))
        qb, kb, vb = _block_inputs(q, k, v, sl)
        y = _forward_block(qb, kb * vb, filter_block(sl), skip[sl].float())
        out[..., sl] = y.transpose(1, 2).to(out.dtype)
    return out


def _run_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, skip: Tensor, filter_block, filter_grad_block):
    """Input gradients (dq, dk, dv, dskip); ``filter_grad_block(sl, dh)`` consumes each block's filter gradient."""
    batch, length, channels = q.shape
    n = 2 * length
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dskip = torch.empty(channels, device=q.device, dtype=torch.float32)
    step = channel_block(batch, length, channels)
    for start in range(0, channels, step):
        sl = slice(start, min(start + step, channels))
        qb, kb, vb = _block_inputs(q, k, v, sl)
        g = grad[..., sl].float().transpose(1, 2)
        h, d = filter_block(sl), skip[sl].float()[:, None]
        s = kb * vb
        S, H = torch.fft.rfft(s, n=n), torch.fft.rfft(h, n=n)
        conv = torch.fft.irfft(S * H, n=n)[..., :length]
        dq[..., sl] = (g * (conv + d * s)).transpose(1, 2).to(dq.dtype)
        del conv
        gp = g * qb  # gradient of the pre-gate sum
        dskip[sl] = (gp * s).sum(dim=(0, 2))
        # Correlations: ds[j] = sum_t gp[t] h[t-j], dh[j] = sum_b sum_t gp[t] s[t-j].
        GP = torch.fft.rfft(gp, n=n)
        ds = torch.fft.irfft(GP * H.conj(), n=n)[..., :length] + d * gp
        dk[..., sl] = (ds * vb).transpose(1, 2).to(dk.dtype)
        dv[..., sl] = (ds * kb).transpose(1, 2).to(dv.dtype)
        del ds, H
        dh = torch.fft.irfft((GP * S.conj()).sum(0), n=n)[..., :length]
        filter_grad_block(sl, dh)
    return dq, dk, dv, dskip.to(skip.dtype)


# ---------------------------------------------------------------------------------------- explicit filter
@torch.library.custom_op("torchtitan_hyena::gated_fft_conv", mutates_args=())
def _gated_fft_conv(q: Tensor, k: Tensor, v: Tensor, h: Tensor, skip: Tensor) -> Tensor:
    length = q.shape[1]
    return _run_forward(q, k, v, skip, lambda sl: h[sl, :length].float())


@_gated_fft_conv.register_fake
def _(q, k, v, h, skip):
    return torch.empty_like(q)


@torch.library.custom_op("torchtitan_hyena::gated_fft_conv_backward", mutates_args=())
def _gated_fft_conv_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, h: Tensor, skip: Tensor) -> list[Tensor]:
    length = q.shape[1]
    dh = torch.zeros(h.shape, device=h.device, dtype=torch.float32)

    def take(sl, dh_block):
        dh[sl, :length] = dh_block

    dq, dk, dv, dskip = _run_backward(grad, q, k, v, skip, lambda sl: h[sl, :length].float(), take)
    return [dq, dk, dv, dh.to(h.dtype), dskip]


@_gated_fft_conv_backward.register_fake
def _(grad, q, k, v, h, skip):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(h), torch.empty_like(skip)]


def _setup_explicit(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_explicit(ctx, grad):
    return tuple(_gated_fft_conv_backward(grad.contiguous(), *ctx.saved_tensors))


_gated_fft_conv.register_autograd(_backward_explicit, setup_context=_setup_explicit)


def gated_fft_conv(q: Tensor, k: Tensor, v: Tensor, h: Tensor, skip: Tensor) -> Tensor:
    """``q * (h * (k*v) + skip * (k*v))`` with an explicit (D, >=L) impulse response ``h`` (h[:, 0] = lag 0)."""
    _check(q, k, v, skip, h.shape[0])
    if h.shape[1] < q.shape[1]:
        raise ValueError(f"filter length {h.shape[1]} is shorter than the sequence ({q.shape[1]})")
    return _gated_fft_conv(q, k, v, h, skip)


# ---------------------------------------------------------------------------------------- modal filter
@torch.library.custom_op("torchtitan_hyena::gated_modal_fft_conv", mutates_args=())
def _gated_modal_fft_conv(q: Tensor, k: Tensor, v: Tensor, log_poles: Tensor, residues: Tensor, skip: Tensor) -> Tensor:
    length = q.shape[1]
    return _run_forward(q, k, v, skip, lambda sl: modal_filter_block(log_poles[sl], residues[sl], length))


@_gated_modal_fft_conv.register_fake
def _(q, k, v, log_poles, residues, skip):
    return torch.empty_like(q)


@torch.library.custom_op("torchtitan_hyena::gated_modal_fft_conv_backward", mutates_args=())
def _gated_modal_fft_conv_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, log_poles: Tensor, residues: Tensor, skip: Tensor
) -> list[Tensor]:
    length = q.shape[1]
    t = torch.arange(length, device=q.device, dtype=torch.float32)
    d_log_poles = torch.empty(log_poles.shape, device=q.device, dtype=torch.float32)
    d_residues = torch.empty(residues.shape, device=q.device, dtype=torch.float32)

    def take(sl, dh):
        # h = sum_n R_n exp(a_n t): dR_n = sum_t dh e_n(t), da_n = R_n sum_t dh t e_n(t).
        lp, res = log_poles[sl].float(), residues[sl].float()
        for n in range(lp.shape[1]):
            w = dh * modal_basis(lp[:, n], length)
            d_residues[sl, n] = w.sum(-1)
            d_log_poles[sl, n] = res[:, n] * (w * t).sum(-1)

    filter_block = lambda sl: modal_filter_block(log_poles[sl], residues[sl], length)
    dq, dk, dv, dskip = _run_backward(grad, q, k, v, skip, filter_block, take)
    return [dq, dk, dv, d_log_poles.to(log_poles.dtype), d_residues.to(residues.dtype), dskip]


@_gated_modal_fft_conv_backward.register_fake
def _(grad, q, k, v, log_poles, residues, skip):
    return [torch.empty_like(x) for x in (q, k, v, log_poles, residues, skip)]


def _backward_modal(ctx, grad):
    return tuple(_gated_modal_fft_conv_backward(grad.contiguous(), *ctx.saved_tensors))


_gated_modal_fft_conv.register_autograd(_backward_modal, setup_context=_setup_explicit)


def gated_modal_fft_conv(q: Tensor, k: Tensor, v: Tensor, log_poles: Tensor, residues: Tensor, skip: Tensor) -> Tensor:
    """``q * (h * (k*v) + skip * (k*v))`` with the modal filter of (D, N) ``log_poles`` (< 0) and ``residues``."""
    check_inputs(q, k, v, skip, log_poles, residues)
    return _gated_modal_fft_conv(q, k, v, log_poles, residues, skip)


def _check(q: Tensor, k: Tensor, v: Tensor, skip: Tensor, filter_channels: int) -> None:
    if not (q.shape == k.shape == v.shape) or q.dim() != 3:
        raise ValueError(f"q, k, v must share one (B, L, D) shape, got {q.shape}, {k.shape}, {v.shape}")
    if filter_channels != q.shape[-1] or skip.shape != (q.shape[-1],):
        raise ValueError(f"{q.shape[-1]} channels but filter rows {filter_channels} and skip {tuple(skip.shape)}")


def check_inputs(q: Tensor, k: Tensor, v: Tensor, skip: Tensor, log_poles: Tensor, residues: Tensor) -> None:
    """Shapes of a modal convolution's inputs: (B, L, D) activations, (D, N) filter parameters, (D,) skip."""
    _check(q, k, v, skip, log_poles.shape[0])
    if log_poles.shape != residues.shape or log_poles.dim() != 2:
        raise ValueError(f"log_poles {tuple(log_poles.shape)} and residues {tuple(residues.shape)} must be (D, N)")


# ---------------------------------------------------------------------------------------- references
def modal_filter_reference(log_poles: Tensor, residues: Tensor, length: int) -> Tensor:
    """vortex ``compute_filter``: materialises (D, N, L); the ground truth for tests and the memory bench."""
    t = torch.arange(length, device=log_poles.device, dtype=torch.float32)
    return (residues.float()[..., None] * torch.exp(log_poles.float()[..., None] * t)).sum(1)


def gated_fft_conv_reference(q: Tensor, k: Tensor, v: Tensor, h: Tensor, skip: Tensor) -> Tensor:
    """savanna/vortex FFT conv in one piece (autograd keeps everything): ``K = rfft(h, 2L)/2L``,
    ``y = irfft(rfft(s, 2L) * K, norm="forward")[:L]``, then the skip and the post-gate."""
    length = q.shape[1]
    n = 2 * length
    s = (k.float() * v.float()).transpose(1, 2)
    kernel = torch.fft.rfft(h[:, :length].float(), n=n) / n
    y = torch.fft.irfft(torch.fft.rfft(s, n=n) * kernel, n=n, norm="forward")[..., :length]
    y = y + skip.float()[:, None] * s
    return (q.float() * y.transpose(1, 2)).to(q.dtype)
