"""Direct (tap-by-tap) depthwise causal convolution kernels for short filters: featurizer and Hyena-SE.

Layout (B, L, D), time-major and channel-contiguous; one program computes a (BLOCK_T x BLOCK_D) tile, looping
over the taps with fp32 accumulation. Gated form: ``y = q * (conv(k*v) + skip * k*v)``; ungated: ``y = conv(x)``.
Filters are grouped: channel c uses row ``c // DG`` of ``h`` (G, K); ``LAG_ORDER`` says whether column j holds
lag j (impulse response) or lag K-1-j (``F.conv1d`` order). These short convolutions are memory-bound, so the
gates are fused and nothing but the inputs is read back in backward. The filter gradient is written as fp32
partials per (batch, time split) and summed in torch: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchtitan_hyena.ops.triton_backend import TunedKernel


@triton.jit
def load_rows(ptr, b, rows, offs_d, mask_d, L, stride_b, stride_l, stride_d, ACC: tl.constexpr):
    """A (rows x channels) tile at ``rows`` of sequence ``b``; rows outside [0, L) read as zero."""
    mask = ((rows >= 0) & (rows < L))[:, None] & mask_d[None, :]
    offs = b.to(tl.int64) * stride_b + rows.to(tl.int64)[:, None] * stride_l + offs_d[None, :] * stride_d
    return tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def store_rows(ptr, value, b, rows, offs_d, mask_d, L, stride_b, stride_l, stride_d):
    mask = ((rows >= 0) & (rows < L))[:, None] & mask_d[None, :]
    offs = b.to(tl.int64) * stride_b + rows.to(tl.int64)[:, None] * stride_l + offs_d[None, :] * stride_d
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tap(h_row, j, mask_d, stride_hk, K: tl.constexpr, LAG_ORDER: tl.constexpr, ACC: tl.constexpr):
    """Filter values at lag ``j`` for each channel of the tile."""
    col = j if LAG_ORDER else K - 1 - j
    return tl.load(h_row + col * stride_hk, mask=mask_d, other=0.0).to(ACC)


@triton.jit
def _direct_fwd_kernel(
    q_ptr, k_ptr, v_ptr, h_ptr, skip_ptr, y_ptr,
    L, D, DG,
    sqb, sql, sqd, skb, skl, skd, svb, svl, svd, syb, syl, syd, shg, shk,
    K: tl.constexpr, GATED: tl.constexpr, HAS_SKIP: tl.constexpr, LAG_ORDER: tl.constexpr, ACC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_d, pid_t, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    h_row = h_ptr + (offs_d // DG) * shg

    tap0 = _tap(h_row, 0, mask_d, shk, K, LAG_ORDER, ACC)
    if HAS_SKIP:  # the D term acts like an extra lag-0 tap
        tap0 += tl.load(skip_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    acc = load_rows(v_ptr, b, rows, offs_d, mask_d, L, svb, svl, svd, ACC)
    if GATED:
        acc *= load_rows(k_ptr, b, rows, offs_d, mask_d, L, skb, skl, skd, ACC)
    acc *= tap0[None, :]
    for j in range(1, K):  # a runtime loop: unrolled, every shifted load is hoisted and registers spill
        s = load_rows(v_ptr, b, rows - j, offs_d, mask_d, L, svb, svl, svd, ACC)
        if GATED:
            s *= load_rows(k_ptr, b, rows - j, offs_d, mask_d, L, skb, skl, skd, ACC)
        acc += _tap(h_row, j, mask_d, shk, K, LAG_ORDER, ACC)[None, :] * s
    if GATED:
        acc *= load_rows(q_ptr, b, rows, offs_d, mask_d, L, sqb, sql, sqd, ACC)
    store_rows(y_ptr, acc, b, rows, offs_d, mask_d, L, syb, syl, syd)


@triton.jit
def _direct_bwd_kernel(
    dy_ptr, q_ptr, k_ptr, v_ptr, h_ptr, skip_ptr,
    dq_ptr, dk_ptr, dv_ptr, dh_part_ptr, dskip_part_ptr,
    L, D, DG, rows_per_split, n_split,
    sdyb, sdyl, sdyd, sqb, sql, sqd, skb, skl, skd, svb, svl, svd, sob, sol, sod, shg, shk,
    K: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr, HAS_SKIP: tl.constexpr, LAG_ORDER: tl.constexpr,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Gradients for rows [split * rows_per_split, ...) of one sequence: with g = dy * q (dy when ungated) and
    s = k * v (x), ds[t] = sum_j h[j] g[t+j] + skip * g[t], dq = dy * (conv(s) + skip * s), dk = ds * v,
    dv = ds * k, dh[j] = sum_t g[t] s[t-j], dskip = sum_t g[t] s[t]."""
    pid_d, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    h_row = h_ptr + (offs_d // DG) * shg
    lags = tl.arange(0, BLOCK_K)
    dh_acc = tl.zeros((BLOCK_K, BLOCK_D), ACC)
    dskip_acc = tl.zeros((BLOCK_D,), ACC)
    tap0 = _tap(h_row, 0, mask_d, shk, K, LAG_ORDER, ACC)
    if HAS_SKIP:  # the D term acts like an extra lag-0 tap
        tap0 += tl.load(skip_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)

    start = split * rows_per_split
    for t0 in range(0, rows_per_split, BLOCK_T):  # bounds from arguments only (triton 3.6's interpreter)
        rows = start + t0 + tl.arange(0, BLOCK_T)
        # Only g and the running sums stay live; tiles needed again later are re-read (cache hits) rather than
        # kept in registers, and the tap loops run at runtime: unrolled, the compiler hoists every load and spills.
        g = load_rows(dy_ptr, b, rows, offs_d, mask_d, L, sdyb, sdyl, sdyd, ACC)
        s0 = load_rows(v_ptr, b, rows, offs_d, mask_d, L, svb, svl, svd, ACC)
        if GATED:
            g *= load_rows(q_ptr, b, rows, offs_d, mask_d, L, sqb, sql, sqd, ACC)
            s0 *= load_rows(k_ptr, b, rows, offs_d, mask_d, L, skb, skl, skd, ACC)
        # Phase 1, past rows t - j: u = conv(s) + skip * s for dq, and the filter gradient.
        gs0 = tl.sum(g * s0, axis=0)
        dh_acc += tl.where(lags[:, None] == 0, gs0[None, :], 0.0)
        if HAS_SKIP:
            dskip_acc += gs0
        u = tap0[None, :] * s0
        for j in range(1, K):
            s = load_rows(v_ptr, b, rows - j, offs_d, mask_d, L, svb, svl, svd, ACC)
            if GATED:
                s *= load_rows(k_ptr, b, rows - j, offs_d, mask_d, L, skb, skl, skd, ACC)
            u += _tap(h_row, j, mask_d, shk, K, LAG_ORDER, ACC)[None, :] * s
            dh_acc += tl.where(lags[:, None] == j, tl.sum(g * s, axis=0)[None, :], 0.0)
        if GATED:
            dy = load_rows(dy_ptr, b, rows, offs_d, mask_d, L, sdyb, sdyl, sdyd, ACC)
            store_rows(dq_ptr, dy * u, b, rows, offs_d, mask_d, L, sob, sol, sod)
        # Phase 2, future rows t + j: ds = conv^T(g) + skip * g.
        ds = tap0[None, :] * g
        for j in range(1, K):
            gj = load_rows(dy_ptr, b, rows + j, offs_d, mask_d, L, sdyb, sdyl, sdyd, ACC)
            if GATED:
                gj *= load_rows(q_ptr, b, rows + j, offs_d, mask_d, L, sqb, sql, sqd, ACC)
            ds += _tap(h_row, j, mask_d, shk, K, LAG_ORDER, ACC)[None, :] * gj
        if GATED:
            v0 = load_rows(v_ptr, b, rows, offs_d, mask_d, L, svb, svl, svd, ACC)
            store_rows(dk_ptr, ds * v0, b, rows, offs_d, mask_d, L, sob, sol, sod)
            k0 = load_rows(k_ptr, b, rows, offs_d, mask_d, L, skb, skl, skd, ACC)
            store_rows(dv_ptr, ds * k0, b, rows, offs_d, mask_d, L, sob, sol, sod)
        else:
            store_rows(dv_ptr, ds, b, rows, offs_d, mask_d, L, sob, sol, sod)

    part = b * n_split + split
    cols = lags if LAG_ORDER else K - 1 - lags
    dh_offs = part.to(tl.int64) * D * K + offs_d[None, :] * K + cols[:, None]
    tl.store(dh_part_ptr + dh_offs, dh_acc, mask=(lags < K)[:, None] & mask_d[None, :])
    if HAS_SKIP:
        tl.store(dskip_part_ptr + part.to(tl.int64) * D + offs_d, dskip_acc, mask=mask_d)


_FWD = TunedKernel(_direct_fwd_kernel, "direct", key=["D", "DG", "K"])
INTERPRETED = _FWD.interpreted  # kernels were decorated under TRITON_INTERPRET=1
_BWD = TunedKernel(_direct_bwd_kernel, "direct", key=["D", "DG", "K"])

# Programs to aim for in backward: enough to fill a GPU; few under the interpreter, which runs them one by one.
_TARGET_PROGRAMS = {True: 2, False: 1024}
_MAX_BLOCK_T = 128


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Accumulate in fp32, or fp64 for fp64 inputs (finite-difference checks)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def direct_forward(
    q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor, h: torch.Tensor, skip: torch.Tensor | None,
    lag_order: bool,
) -> torch.Tensor:  # fmt: skip
    """``q * (conv(k*v) + skip*k*v)`` when ``q``/``k`` are given, else ``conv(v)``; (B, L, D) in v's dtype."""
    B, L, D = v.shape
    G, K = h.shape
    gated = q is not None
    q_, k_ = (q, k) if gated else (v, v)
    y = torch.empty((B, L, D), dtype=v.dtype, device=v.device)
    if y.numel() == 0:
        return y

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(D, meta["BLOCK_D"]), triton.cdiv(L, meta["BLOCK_T"]), B

    _FWD.launch(
        grid, q_, k_, v, h, skip if skip is not None else h, y, L, D, D // G,
        *_strides(q_), *_strides(k_), *_strides(v), *_strides(y), h.stride(0), h.stride(1),
        K=K, GATED=gated, HAS_SKIP=skip is not None, LAG_ORDER=lag_order, ACC=acc_dtype(v.dtype),
        op_bytes=v.element_size(),
    )  # fmt: skip
    return y


def _splits(L: int, parallel: int, interpreted: bool) -> tuple[int, int]:
    """(rows per split, number of splits): a time partition chosen from shapes only, so the summation order of
    the filter gradient does not depend on the launch configuration."""
    want = max(1, triton.cdiv(_TARGET_PROGRAMS[interpreted], parallel))
    rows = triton.cdiv(triton.cdiv(L, want), _MAX_BLOCK_T) * _MAX_BLOCK_T
    return rows, triton.cdiv(L, rows)


def direct_backward(
    dy: torch.Tensor, q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor, h: torch.Tensor,
    skip: torch.Tensor | None, lag_order: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(dq, dk, dv, dh, dskip) of ``direct_forward``; dq/dk are None when ungated, dskip when ``skip`` is None."""
    B, L, D = v.shape
    G, K = h.shape
    gated = q is not None
    q_, k_ = (q, k) if gated else (v, v)
    dv = torch.empty((B, L, D), dtype=v.dtype, device=v.device)
    dq, dk = (torch.empty_like(dv), torch.empty_like(dv)) if gated else (dv, dv)
    rows_per_split, n_split = _splits(L, B * triton.cdiv(D, 128), _BWD.interpreted)
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    dh_part = torch.zeros((B * n_split, D, K), dtype=acc, device=v.device)
    dskip_part = torch.zeros((B * n_split, D), dtype=acc, device=v.device) if skip is not None else dh_part
    if dv.numel():

        def grid(meta: dict) -> tuple[int, int, int]:
            return triton.cdiv(D, meta["BLOCK_D"]), n_split, B

        _BWD.launch(
            grid, dy, q_, k_, v, h, skip if skip is not None else h,
            dq, dk, dv, dh_part, dskip_part, L, D, D // G, rows_per_split, n_split,
            *_strides(dy), *_strides(q_), *_strides(k_), *_strides(v), *_strides(dv), h.stride(0), h.stride(1),
            K=K, BLOCK_K=triton.next_power_of_2(K), GATED=gated, HAS_SKIP=skip is not None, LAG_ORDER=lag_order,
            ACC=acc_dtype(v.dtype), op_bytes=v.element_size(),
        )  # fmt: skip
    dh = dh_part.sum(0).view(G, D // G, K).sum(1).to(h.dtype)
    dskip = dskip_part.sum(0).to(skip.dtype) if skip is not None else None
    return (dq if gated else None), (dk if gated else None), dv, dh, dskip
