"""Hyena-LI modal FFT convolution with Triton for the filter and the pointwise stages, ``torch.fft`` between them.

Computes what ``ops.fftconv.gated_modal_fft_conv`` computes, ``y = q * (h * s + skip * s)`` with ``s = k * v`` and
the Evo 2 modal filter ``h[d, t] = sum_n residues[d, n] * exp(log_poles[d, n] * t)``, over the same channel blocks
(``fftconv.channel_block``), but every step that is not an FFT is one Triton kernel (``docs/kernels.md`` §1.5):

* ``_gate_in_kernel``: the pre-gate ``k * v`` read from the (B, L, D) activations (any strides, any float dtype)
  and written transposed, in fp32 and zero-padded to 2L: exactly the buffer ``rfft`` takes, in one pass;
* ``_modal_filter_kernel``: the filter built tile by tile in registers, modes summed in place, written straight into
  its zero-padded buffer; the (D, N, L) tensor of the reference never exists;
* ``_spectral_fwd_kernel``: ``S *= H`` in place, each filter spectrum read once for the whole batch;
* ``_gate_out_kernel``: the D term and the post-gate, transposed back into the (B, L, D) output's dtype.

Backward recomputes ``S`` and ``H`` (nothing but the inputs is saved) and has three more kernels:
``_spectral_bwd_kernel`` forms the three spectra (``S H`` for dq, ``G conj(H)`` for dk/dv, ``sum_b G conj(S)`` for
the filter) in one pass, in place; ``_gate_out_bwd_kernel`` writes dq, dk, dv and fp32 partials of dskip; and
``_modal_grad_kernel`` projects the filter gradient onto the modes tile by tile, ``dR = sum_t dh e^(a t)`` and
``sum_t t dh e^(a t)``, without building the basis. Partial sums are per time split fixed by the shapes and added in
torch: no atomics, one summation order per launch configuration.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchtitan_hyena.ops.fftconv import channel_block, gated_fft_conv_reference, modal_filter_reference
from torchtitan_hyena.ops.triton_backend import TunedKernel
from torchtitan_hyena.ops.triton_direct import load_rows, store_rows

# Elements (batch x channels x length) per channel block. Larger than the torch path's: each block costs about ten
# launches, so GPU blocks must be big; a (B, c, L) fp32 temporary is 128 MiB, the backward holds about six.
BLOCK_ELEMENTS = 1 << 25
# Programs to aim for when a kernel also splits time (partial sums): enough to fill a GPU; few under the interpreter.
_TARGET_PROGRAMS = {True: 2, False: 1024}


@triton.jit
def _load_buf(ptr, b, rows, cols, mask_c, L, C, N):
    """A (rows x channels) tile of the time-contiguous (B, C, N) fp32 buffer; rows >= L read as zero."""
    offs = (b.to(tl.int64) * C + cols[None, :]) * N + rows.to(tl.int64)[:, None]
    return tl.load(ptr + offs, mask=(rows < L)[:, None] & mask_c[None, :], other=0.0)


@triton.jit
def _gate_in_kernel(
    a_ptr, b_ptr, out_ptr, L, N, C, d0, sab, sal, sad, sbb, sbl, sbd,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[b, c, t] = a * b at (b, t, d0 + c) for t < L, and 0 for L <= t < N."""
    pid_t, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_c = cols < C
    x = load_rows(a_ptr, b, rows, d0 + cols, mask_c, L, sab, sal, sad, tl.float32)
    x *= load_rows(b_ptr, b, rows, d0 + cols, mask_c, L, sbb, sbl, sbd, tl.float32)
    offs = (b.to(tl.int64) * C + cols[None, :]) * N + rows.to(tl.int64)[:, None]
    tl.store(out_ptr + offs, x, mask=(rows < N)[:, None] & mask_c[None, :])


@triton.jit
def _modal_filter_kernel(lp_ptr, r_ptr, h_ptr, L, N, C, M, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """h[c, t] = sum_m r[c, m] exp(lp[c, m] t) for t < L, and 0 for L <= t < N; (C, M) parameters, (C, N) h."""
    pid_t, pid_d = tl.program_id(0), tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_c = cols < C
    tf = t.to(tl.float32)[None, :]
    h = tl.zeros((BLOCK_D, BLOCK_T), tl.float32)
    for m in range(M):
        a = tl.load(lp_ptr + cols * M + m, mask=mask_c, other=0.0)
        r = tl.load(r_ptr + cols * M + m, mask=mask_c, other=0.0)
        h += r[:, None] * tl.exp(a[:, None] * tf)
    h = tl.where((t < L)[None, :], h, 0.0)
    tl.store(h_ptr + cols.to(tl.int64)[:, None] * N + t[None, :], h, mask=mask_c[:, None] & (t < N)[None, :])


@triton.jit
def _complex_tile(ptr, idx, mask):
    """(real, imaginary) parts at complex indices ``idx`` of an interleaved complex64 buffer."""
    x = tl.load(ptr + (2 * idx.to(tl.int64))[:, None] + tl.arange(0, 2)[None, :], mask=mask[:, None], other=0.0)
    return tl.split(x)


@triton.jit
def _store_complex(ptr, idx, mask, re, im):
    offs = (2 * idx.to(tl.int64))[:, None] + tl.arange(0, 2)[None, :]
    tl.store(ptr + offs, tl.join(re, im), mask=mask[:, None])


@triton.jit
def _spectral_fwd_kernel(s_ptr, h_ptr, CF, B, BLOCK: tl.constexpr):
    """S[b] *= H for the (B, C, F) spectra S and the (C, F) filter spectra H (complex64, in place)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < CF
    hr, hi = _complex_tile(h_ptr, idx, mask)
    for _ in range(B):  # advancing the pointers keeps 64-bit offsets without int64 arithmetic
        sr, si = _complex_tile(s_ptr, idx, mask)
        _store_complex(s_ptr, idx, mask, sr * hr - si * hi, sr * hi + si * hr)
        s_ptr += 2 * CF


@triton.jit
def _spectral_bwd_kernel(s_ptr, g_ptr, h_ptr, dh_ptr, CF, B, BLOCK: tl.constexpr):
    """In place: S[b] <- S[b] H (the forward again, for dq), G[b] <- G[b] conj(H) (correlation with the filter, for
    dk and dv); and DH = sum_b G[b] conj(S[b]) (the filter gradient's spectrum)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < CF
    hr, hi = _complex_tile(h_ptr, idx, mask)
    acc_r = tl.zeros((BLOCK,), tl.float32)
    acc_i = tl.zeros((BLOCK,), tl.float32)
    for _ in range(B):
        sr, si = _complex_tile(s_ptr, idx, mask)
        gr, gi = _complex_tile(g_ptr, idx, mask)
        acc_r += gr * sr + gi * si
        acc_i += gi * sr - gr * si
        _store_complex(s_ptr, idx, mask, sr * hr - si * hi, sr * hi + si * hr)
        _store_complex(g_ptr, idx, mask, gr * hr + gi * hi, gi * hr - gr * hi)
        s_ptr += 2 * CF
        g_ptr += 2 * CF
    _store_complex(dh_ptr, idx, mask, acc_r, acc_i)


@triton.jit
def _gate_out_kernel(
    y_ptr, q_ptr, k_ptr, v_ptr, skip_ptr, out_ptr, L, N, C, d0,
    sqb, sql, sqd, skb, skl, skd, svb, svl, svd, sob, sol, sod,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out = q * (y + skip * k * v) at channels d0 + c; y is the (B, C, N) convolution buffer."""
    pid_t, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_c = cols < C
    d = d0 + cols
    s = load_rows(k_ptr, b, rows, d, mask_c, L, skb, skl, skd, tl.float32)
    s *= load_rows(v_ptr, b, rows, d, mask_c, L, svb, svl, svd, tl.float32)
    skip = tl.load(skip_ptr + d, mask=mask_c, other=0.0)
    u = _load_buf(y_ptr, b, rows, cols, mask_c, L, C, N) + skip[None, :] * s
    u *= load_rows(q_ptr, b, rows, d, mask_c, L, sqb, sql, sqd, tl.float32)
    store_rows(out_ptr, u, b, rows, d, mask_c, L, sob, sol, sod)


@triton.jit
def _gate_out_bwd_kernel(
    conv_ptr, ds_ptr, dy_ptr, q_ptr, k_ptr, v_ptr, skip_ptr, dq_ptr, dk_ptr, dv_ptr, dskip_part_ptr,
    L, N, C, d0, rows_per_split, n_split,
    syb, syl, syd, sqb, sql, sqd, skb, skl, skd, svb, svl, svd, sob, sol, sod,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """With s = k v and gp = dy q: dq = dy (conv + skip s), ds' = ds + skip gp, dk = ds' v, dv = ds' k over one time
    split; the split's sum_t gp s per channel goes to dskip_part[b, split]."""
    pid_d, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_c = cols < C
    d = d0 + cols
    skip = tl.load(skip_ptr + d, mask=mask_c, other=0.0)[None, :]
    dskip = tl.zeros((BLOCK_D,), tl.float32)
    start = split * rows_per_split
    for t0 in range(0, rows_per_split, BLOCK_T):
        rows = start + t0 + tl.arange(0, BLOCK_T)
        k = load_rows(k_ptr, b, rows, d, mask_c, L, skb, skl, skd, tl.float32)
        v = load_rows(v_ptr, b, rows, d, mask_c, L, svb, svl, svd, tl.float32)
        dy = load_rows(dy_ptr, b, rows, d, mask_c, L, syb, syl, syd, tl.float32)
        gp = dy * load_rows(q_ptr, b, rows, d, mask_c, L, sqb, sql, sqd, tl.float32)
        s = k * v
        dskip += tl.sum(gp * s, axis=0)
        dq = dy * (_load_buf(conv_ptr, b, rows, cols, mask_c, L, C, N) + skip * s)
        store_rows(dq_ptr, dq, b, rows, d, mask_c, L, sob, sol, sod)
        ds = _load_buf(ds_ptr, b, rows, cols, mask_c, L, C, N) + skip * gp
        store_rows(dk_ptr, ds * v, b, rows, d, mask_c, L, sob, sol, sod)
        store_rows(dv_ptr, ds * k, b, rows, d, mask_c, L, sob, sol, sod)
    tl.store(dskip_part_ptr + (b * n_split + split).to(tl.int64) * C + cols, dskip, mask=mask_c)


@triton.jit
def _modal_grad_kernel(
    dh_ptr, lp_ptr, dr_part_ptr, dt_part_ptr, L, N, C, M, rows_per_split,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Over one time split of the (C, N) filter gradient dh: dr[c, m] = sum_t dh e^(a t), dt[c, m] = sum_t t dh e^(a t)
    with a = lp[c, m] (then d residues = dr, d log_poles = residues * dt)."""
    pid_d, split = tl.program_id(0), tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_c = cols < C
    modes = tl.arange(0, BLOCK_M)[None, :]
    acc_r = tl.zeros((BLOCK_D, BLOCK_M), tl.float32)
    acc_t = tl.zeros((BLOCK_D, BLOCK_M), tl.float32)
    start = split * rows_per_split
    for t0 in range(0, rows_per_split, BLOCK_T):
        t = start + t0 + tl.arange(0, BLOCK_T)
        mask = mask_c[:, None] & (t < L)[None, :]
        dh = tl.load(dh_ptr + cols.to(tl.int64)[:, None] * N + t[None, :], mask=mask, other=0.0)
        tf = t.to(tl.float32)[None, :]
        for m in range(M):  # at runtime: only one mode's exponentials are live
            a = tl.load(lp_ptr + cols * M + m, mask=mask_c, other=0.0)
            w = dh * tl.exp(a[:, None] * tf)
            acc_r += tl.where(modes == m, tl.sum(w, axis=1)[:, None], 0.0)
            acc_t += tl.where(modes == m, tl.sum(w * tf, axis=1)[:, None], 0.0)
    offs = (split * C + cols[:, None]).to(tl.int64) * M + modes
    mask = mask_c[:, None] & (modes < M)
    tl.store(dr_part_ptr + offs, acc_r, mask=mask)
    tl.store(dt_part_ptr + offs, acc_t, mask=mask)


_GATE_IN = TunedKernel(_gate_in_kernel, "li_gate", key=["C", "N"])
_GATE_OUT = TunedKernel(_gate_out_kernel, "li_gate", key=["C", "N"])
_GATE_OUT_BWD = TunedKernel(_gate_out_bwd_kernel, "li_gate_bwd", key=["C", "N"])
_MODAL_FILTER = TunedKernel(_modal_filter_kernel, "li_modal", key=["C", "N", "M"])
_MODAL_GRAD = TunedKernel(_modal_grad_kernel, "li_modal", key=["C", "N", "M"])
_SPECTRAL_FWD = TunedKernel(_spectral_fwd_kernel, "li_spectral", key=["CF", "B"])
_SPECTRAL_BWD = TunedKernel(_spectral_bwd_kernel, "li_spectral", key=["CF", "B"])
INTERPRETED = _GATE_IN.interpreted


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _time_splits(length: int, parallel: int, kernel: TunedKernel) -> tuple[int, int]:
    """(rows per split, splits) for ``parallel`` programs per split: a multiple of every configuration's time tile,
    so that the partial sums do not depend on the configuration autotuning picks."""
    want = max(1, triton.cdiv(_TARGET_PROGRAMS[INTERPRETED], parallel))
    tile = max(c.kwargs["BLOCK_T"] for c in kernel.configs(op_bytes=4))
    rows = triton.cdiv(triton.cdiv(length, want), tile) * tile
    return rows, triton.cdiv(length, rows)


def _gate_in(a: Tensor, b: Tensor, d0: int, channels: int, n: int) -> Tensor:
    """(B, channels, n) fp32: a * b of channels [d0, d0 + channels), transposed and zero-padded to n."""
    batch, length, _ = a.shape
    out = torch.empty((batch, channels, n), dtype=torch.float32, device=a.device)

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(n, meta["BLOCK_T"]), triton.cdiv(channels, meta["BLOCK_D"]), batch

    _GATE_IN.launch(grid, a, b, out, length, n, channels, d0, *_strides(a), *_strides(b), op_bytes=4)
    return out


def modal_filter(log_poles: Tensor, residues: Tensor, length: int, n: int) -> Tensor:
    """(C, n) fp32: the modal filter of (C, M) ``log_poles``/``residues`` at t < length, zero-padded to n."""
    channels, modes = log_poles.shape
    h = torch.empty((channels, n), dtype=torch.float32, device=log_poles.device)
    lp, res = log_poles.float().contiguous(), residues.float().contiguous()

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(n, meta["BLOCK_T"]), triton.cdiv(channels, meta["BLOCK_D"])

    _MODAL_FILTER.launch(grid, lp, res, h, length, n, channels, modes, op_bytes=4)
    return h


def _real(*spectra: Tensor) -> list[Tensor]:
    """Interleaved fp32 views of complex64 spectra, as the kernels read them."""
    return [torch.view_as_real(x) for x in spectra]


def _spectral_grid(cf: int):
    return lambda meta: (triton.cdiv(cf, meta["BLOCK"]),)


def _block_filter_spectrum(log_poles: Tensor, residues: Tensor, sl: slice, length: int) -> Tensor:
    return torch.fft.rfft(modal_filter(log_poles[sl], residues[sl], length, 2 * length))


def modal_forward(q: Tensor, k: Tensor, v: Tensor, log_poles: Tensor, residues: Tensor, skip: Tensor) -> Tensor:
    """``q * (h * (k v) + skip * (k v))`` for (B, L, D) activations and (D, M) modal parameters; q's dtype."""
    batch, length, channels = q.shape
    n = 2 * length
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    skip32 = skip.float().contiguous()
    step = channel_block(batch, length, channels, BLOCK_ELEMENTS)
    for d0 in range(0, channels if q.numel() else 0, step):
        c = min(step, channels - d0)
        spectrum = torch.fft.rfft(_gate_in(k, v, d0, c, n))
        h_spectrum = _block_filter_spectrum(log_poles, residues, slice(d0, d0 + c), length)
        _SPECTRAL_FWD.launch(_spectral_grid(h_spectrum.numel()), *_real(spectrum, h_spectrum), h_spectrum.numel(),
                             batch, op_bytes=4)  # fmt: skip
        del h_spectrum
        y = torch.fft.irfft(spectrum, n=n)
        del spectrum

        def grid(meta: dict, c: int = c) -> tuple[int, int, int]:
            return triton.cdiv(length, meta["BLOCK_T"]), triton.cdiv(c, meta["BLOCK_D"]), batch

        _GATE_OUT.launch(
            grid, y, q, k, v, skip32, out, length, n, c, d0,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), op_bytes=4,
        )  # fmt: skip
    return out


def modal_backward(
    dy: Tensor, q: Tensor, k: Tensor, v: Tensor, log_poles: Tensor, residues: Tensor, skip: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d log_poles, d residues, dskip) of :func:`modal_forward`, recomputing its spectra."""
    batch, length, channels = q.shape
    modes = log_poles.shape[1]
    n = 2 * length
    dq, dk, dv = (torch.empty(q.shape, dtype=x.dtype, device=q.device) for x in (q, k, v))
    dskip = torch.zeros(channels, dtype=torch.float32, device=q.device)
    d_res = torch.zeros(log_poles.shape, dtype=torch.float32, device=q.device)
    d_t = torch.zeros(log_poles.shape, dtype=torch.float32, device=q.device)
    skip32 = skip.float().contiguous()
    step = channel_block(batch, length, channels, BLOCK_ELEMENTS)
    for d0 in range(0, channels if q.numel() else 0, step):
        c = min(step, channels - d0)
        sl = slice(d0, d0 + c)
        s_spec = torch.fft.rfft(_gate_in(k, v, d0, c, n))
        g_spec = torch.fft.rfft(_gate_in(dy, q, d0, c, n))
        h_spec = _block_filter_spectrum(log_poles, residues, sl, length)
        dh_spec = torch.empty_like(h_spec)
        _SPECTRAL_BWD.launch(_spectral_grid(h_spec.numel()), *_real(s_spec, g_spec, h_spec, dh_spec), h_spec.numel(),
                             batch, op_bytes=4)  # fmt: skip
        del h_spec
        conv = torch.fft.irfft(s_spec, n=n)
        del s_spec
        ds = torch.fft.irfft(g_spec, n=n)
        del g_spec
        rows, n_split = _time_splits(length, batch * triton.cdiv(c, 64), _GATE_OUT_BWD)
        dskip_part = torch.empty((batch * n_split, c), dtype=torch.float32, device=q.device)

        def grid(meta: dict, c: int = c, n_split: int = n_split) -> tuple[int, int, int]:
            return triton.cdiv(c, meta["BLOCK_D"]), n_split, batch

        _GATE_OUT_BWD.launch(
            grid, conv, ds, dy, q, k, v, skip32, dq, dk, dv, dskip_part, length, n, c, d0, rows, n_split,
            *_strides(dy), *_strides(q), *_strides(k), *_strides(v), *_strides(dq), op_bytes=4,
        )  # fmt: skip
        del conv, ds
        dskip[sl] = dskip_part.sum(0)
        _modal_grad(torch.fft.irfft(dh_spec, n=n), log_poles[sl], d_res[sl], d_t[sl], length, modes)
    d_log_poles = residues.float() * d_t
    return dq, dk, dv, d_log_poles.to(log_poles.dtype), d_res.to(residues.dtype), dskip.to(skip.dtype)


def _modal_grad(dh: Tensor, log_poles: Tensor, d_res: Tensor, d_t: Tensor, length: int, modes: int) -> None:
    """Adds the modal projections of the (C, N) filter gradient ``dh`` into ``d_res`` and ``d_t`` (C, M)."""
    channels, n = dh.shape
    rows, n_split = _time_splits(length, triton.cdiv(channels, 8), _MODAL_GRAD)
    parts = torch.empty((2, n_split, channels, modes), dtype=torch.float32, device=dh.device)
    lp = log_poles.float().contiguous()

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(channels, meta["BLOCK_D"]), n_split

    _MODAL_GRAD.launch(
        grid, dh, lp, parts[0], parts[1], length, n, channels, modes, rows,
        BLOCK_M=triton.next_power_of_2(modes), op_bytes=4,
    )  # fmt: skip
    d_res += parts[0].sum(0)
    d_t += parts[1].sum(0)


def compare_with_reference(
    device: torch.device | str, lengths: tuple[int, ...] = (1000, 4096), batch: int = 2, channels: int = 64,
    modes: int = 16, dtype: torch.dtype = torch.float32, seed: int = 0,
) -> list[dict]:  # fmt: skip
    """Forward and backward of these kernels against the vortex-style reference (``fftconv`` module, autograd through
    the materialised filter) on ``device``: one dict per length with the worst error of the output and of each
    gradient, relative to that tensor's scale when it exceeds 1. For a device self-test; the reference runs in fp32."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        q, k, v, dy = (torch.randn(batch, length, channels, generator=gen).to(device, dtype) for _ in range(4))
        log_poles = (-torch.rand(channels, modes, generator=gen) * 0.1 - 1e-3).to(device)
        residues = (torch.randn(channels, modes, generator=gen) / modes**0.5).to(device)
        skip = torch.randn(channels, generator=gen).to(device)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, log_poles, residues, skip)]
        y = gated_fft_conv_reference(*leaves[:3], modal_filter_reference(*leaves[3:5], length), leaves[5])
        expected = [y, *torch.autograd.grad(y, leaves, dy)]
        actual = [
            modal_forward(q, k, v, log_poles, residues, skip),
            *modal_backward(dy, q, k, v, log_poles, residues, skip),
        ]
        names = ["y", "dq", "dk", "dv", "d_log_poles", "d_residues", "dskip"]
        errors = {}
        for name, a, e in zip(names, actual, expected):
            scale = max(1.0, e.detach().abs().max().item())
            errors[name] = (a.double() - e.detach().double()).abs().max().item() / scale
        rows.append({"length": length, "batch": batch, "channels": channels, "dtype": str(dtype), **errors})
    return rows
