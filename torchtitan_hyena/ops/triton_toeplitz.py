"""Chunked two-pass Toeplitz-GEMM kernels for long grouped filters (Hyena-MR, 128 taps).

Time is cut into chunks of ``CHUNK`` rows. All channels of a filter group share the filter, so each output
chunk is a real GEMM on the matrix units (``docs/kernels.md`` §1.3): ``Y_n = H0 S_n + H1 S_{n-1}`` with H0 the
lower-triangular Toeplitz block (lags 0..CHUNK-1) and H1 the spill-over block (lags CHUNK..2*CHUNK-1). This is
exact only if no tap reaches chunk n-2, i.e. ``K <= CHUNK + 1``, which ``chunk_for`` guarantees and
``check_exact`` enforces.

One pass kernel computes ``out = c * (T(a*b) + skip * a*b)``, optionally in reversed time (where the causal
Toeplitz matrix becomes its transpose). Forward is one pass (a, b, c = k, v, q); backward recomputes instead of
storing intermediates: a pass for dq (k, v, dy), a reversed pass for dk and dv (dy, q; gated by v and k), and a
filter-gradient kernel that accumulates ``G_n S_n^T`` and ``G_n S_{n-1}^T`` per group (deterministic fp32
partials; the lag diagonals are summed in torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchtitan_hyena.ops.triton_backend import MAX_CHUNK, TunedKernel
from torchtitan_hyena.ops.triton_direct import acc_dtype

# Programs to aim for (before the filter gradient's row slices): enough to fill a GPU; few under the interpreter,
# which runs them one by one. The filter gradient's fp32 partials take 128 KB per (group, split).
_TARGET_PROGRAMS = {True: 2, False: 1024}
_TARGET_FILTER_GRAD_PROGRAMS = {True: 2, False: 256}


def chunk_for(taps: int) -> int:
    """The smallest power-of-two chunk (>= 16, the portable minimum dot size) that is exact for ``taps``."""
    return max(16, triton.next_power_of_2(taps - 1))


def check_exact(taps: int, chunk: int) -> None:
    """Two passes reach back one chunk only: exact for ``taps <= chunk + 1`` (``docs/kernels.md`` §1.3)."""
    if taps > chunk + 1:
        raise ValueError(f"two-pass Toeplitz conv needs filter_len <= chunk + 1; got {taps} taps with chunk {chunk}")


@triton.jit
def _rows_tile(ptr, b, rows, offs_d, mask_d, L, stride_b, stride_l, stride_d, ACC: tl.constexpr):
    mask = ((rows >= 0) & (rows < L))[:, None] & mask_d[None, :]
    offs = b.to(tl.int64) * stride_b + rows.to(tl.int64)[:, None] * stride_l + offs_d[None, :] * stride_d
    return tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _rows_tile_t(ptr, b, rows, offs_d, mask_d, L, stride_b, stride_l, stride_d, ACC: tl.constexpr):
    """The transposed (channels x rows) tile."""
    mask = mask_d[:, None] & ((rows >= 0) & (rows < L))[None, :]
    offs = b.to(tl.int64) * stride_b + rows.to(tl.int64)[None, :] * stride_l + offs_d[:, None] * stride_d
    return tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _toeplitz_block(h_ptr, lag, K: tl.constexpr, LAG_ORDER: tl.constexpr, stride_hk, DOT: tl.constexpr):
    col = lag if LAG_ORDER else K - 1 - lag
    return tl.load(h_ptr + col * stride_hk, mask=(lag >= 0) & (lag < K), other=0.0).to(DOT)


@triton.jit
def _pass_kernel(
    a_ptr, b_ptr, c1_ptr, c2_ptr, h_ptr, skip_ptr, o1_ptr, o2_ptr, dskip_part_ptr,
    L, D, DG, chunks_per_split, n_split,
    sab, sal, sad, sbb, sbl, sbd, s1b, s1l, s1d, s2b, s2l, s2d, sob, sol, sod, shg, shk,
    K: tl.constexpr, CHUNK: tl.constexpr, REVERSE: tl.constexpr, TWO_OUT: tl.constexpr, HAS_SKIP: tl.constexpr,
    SKIP_GRAD: tl.constexpr, LAG_ORDER: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out1 = c1 * u (and out2 = c2 * u) with u = T(a*b) + skip * a*b over the chunks of one time split;
    in REVERSE, row t' of the pass is sequence row L-1-t'. SKIP_GRAD stores sum_t a*b*c1*c2 per channel."""
    pid_gd, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tiles_per_group = tl.cdiv(DG, BLOCK_D)
    group = pid_gd // tiles_per_group
    offs_g = (pid_gd % tiles_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_g < DG
    offs_d = group * DG + offs_g

    i = tl.arange(0, CHUNK)[:, None]
    j = tl.arange(0, CHUNK)[None, :]
    h_row = h_ptr + group * shg
    h0 = _toeplitz_block(h_row, i - j, K, LAG_ORDER, shk, DOT)
    h1 = _toeplitz_block(h_row, i - j + CHUNK, K, LAG_ORDER, shk, DOT)
    if HAS_SKIP:
        skip = tl.load(skip_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    dskip_acc = tl.zeros((BLOCK_D,), ACC)

    n0 = split * chunks_per_split
    t = n0 * CHUNK - CHUNK + tl.arange(0, CHUNK)
    rows = L - 1 - t if REVERSE else t
    prev = _rows_tile(a_ptr, b, rows, offs_d, mask_d, L, sab, sal, sad, ACC)
    prev *= _rows_tile(b_ptr, b, rows, offs_d, mask_d, L, sbb, sbl, sbd, ACC)
    for n in range(n0, n0 + chunks_per_split):  # chunks past the end are masked out
        t = n * CHUNK + tl.arange(0, CHUNK)
        rows = L - 1 - t if REVERSE else t
        cur = _rows_tile(a_ptr, b, rows, offs_d, mask_d, L, sab, sal, sad, ACC)
        cur *= _rows_tile(b_ptr, b, rows, offs_d, mask_d, L, sbb, sbl, sbd, ACC)
        u = tl.dot(h0, cur.to(DOT), input_precision="ieee", out_dtype=ACC)
        u = tl.dot(h1, prev.to(DOT), acc=u, input_precision="ieee", out_dtype=ACC)
        if HAS_SKIP:
            u += skip[None, :] * cur
        c1 = _rows_tile(c1_ptr, b, rows, offs_d, mask_d, L, s1b, s1l, s1d, ACC)
        out_mask = ((rows >= 0) & (rows < L))[:, None] & mask_d[None, :]
        out_offs = b.to(tl.int64) * sob + rows.to(tl.int64)[:, None] * sol + offs_d[None, :] * sod
        tl.store(o1_ptr + out_offs, (c1 * u).to(o1_ptr.dtype.element_ty), mask=out_mask)
        if TWO_OUT:
            c2 = _rows_tile(c2_ptr, b, rows, offs_d, mask_d, L, s2b, s2l, s2d, ACC)
            tl.store(o2_ptr + out_offs, (c2 * u).to(o2_ptr.dtype.element_ty), mask=out_mask)
            if SKIP_GRAD:
                dskip_acc += tl.sum(cur * c1 * c2, axis=0)
        prev = cur
    if SKIP_GRAD:
        tl.store(dskip_part_ptr + (b * n_split + split).to(tl.int64) * D + offs_d, dskip_acc, mask=mask_d)


@triton.jit
def _filter_grad_kernel(
    q_ptr, dy_ptr, k_ptr, v_ptr, part_ptr,
    L, DG, G, chunks_per_split, n_split,
    sqb, sql, sqd, syb, syl, syd, skb, skl, skd, svb, svl, svd,
    CHUNK: tl.constexpr, ROWS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """For rows [r*ROWS, (r+1)*ROWS) of every chunk in one time split: P0 += G_n S_n^T, P1 += G_n S_{n-1}^T,
    with G = dy*q and S = k*v summed over the channels of one group. Lag of P0[i, j] is i - j, of P1[i, j]
    CHUNK + i - j."""
    pid_r, group, pid_bs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = pid_bs // n_split
    split = pid_bs % n_split
    n0 = split * chunks_per_split
    p0 = tl.zeros((ROWS, CHUNK), ACC)
    p1 = tl.zeros((ROWS, CHUNK), ACC)
    for d0 in range(0, DG, BLOCK_D):
        offs_g = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_g < DG
        offs_d = group * DG + offs_g
        cols = n0 * CHUNK - CHUNK + tl.arange(0, CHUNK)
        prev = _rows_tile_t(k_ptr, b, cols, offs_d, mask_d, L, skb, skl, skd, ACC)
        prev *= _rows_tile_t(v_ptr, b, cols, offs_d, mask_d, L, svb, svl, svd, ACC)
        for n in range(n0, n0 + chunks_per_split):  # chunks past the end read as zeros
            rows = n * CHUNK + pid_r * ROWS + tl.arange(0, ROWS)
            g = _rows_tile(q_ptr, b, rows, offs_d, mask_d, L, sqb, sql, sqd, ACC)
            g *= _rows_tile(dy_ptr, b, rows, offs_d, mask_d, L, syb, syl, syd, ACC)
            cols = n * CHUNK + tl.arange(0, CHUNK)
            cur = _rows_tile_t(k_ptr, b, cols, offs_d, mask_d, L, skb, skl, skd, ACC)
            cur *= _rows_tile_t(v_ptr, b, cols, offs_d, mask_d, L, svb, svl, svd, ACC)
            g = g.to(DOT)
            p0 = tl.dot(g, cur.to(DOT), acc=p0, input_precision="ieee", out_dtype=ACC)
            p1 = tl.dot(g, prev.to(DOT), acc=p1, input_precision="ieee", out_dtype=ACC)
            prev = cur
    i = pid_r * ROWS + tl.arange(0, ROWS)[:, None]
    j = tl.arange(0, CHUNK)[None, :]
    base = part_ptr + (pid_bs.to(tl.int64) * G + group) * 2 * CHUNK * CHUNK
    tl.store(base + i * CHUNK + j, p0)
    tl.store(base + CHUNK * CHUNK + i * CHUNK + j, p1)


_PASS = TunedKernel(_pass_kernel, "toeplitz", key=["D", "DG", "K"])
_FILTER_GRAD = TunedKernel(_filter_grad_kernel, "filter_grad", key=["DG", "G", "CHUNK"])


def dot_dtype(dtype: torch.dtype, interpreted: bool) -> tl.dtype:
    """Matrix-unit operand type: the 16-bit input type on GPUs; fp32 (ieee) for fp32 inputs and under the
    interpreter, whose bf16 dot is wrong (``docs/kernels.md`` §4)."""
    if dtype == torch.float64:
        return tl.float64
    if interpreted or dtype == torch.float32:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def operand_bytes(dtype: torch.dtype, interpreted: bool) -> int:
    return dot_dtype(dtype, interpreted).primitive_bitwidth // 8


def toeplitz_supported(dtype: torch.dtype, taps: int) -> bool:
    """Whether launch configurations fit this device for ``dtype`` inputs and ``taps`` (fp32 MR on AMD does not:
    its 128 x 128 fp32 Toeplitz block alone fills the 64 KB LDS)."""
    if taps > MAX_CHUNK + 1:
        return False
    op_bytes, chunk = operand_bytes(dtype, _PASS.interpreted), chunk_for(taps)
    return bool(_PASS.configs(op_bytes, 128, chunk)) and bool(_FILTER_GRAD.configs(op_bytes, 128, chunk))


def _splits(n_chunks: int, parallel: int, target: int) -> tuple[int, int]:
    """(chunks per split, number of splits) so that ``parallel`` programs per split reach ``target``; from shapes
    only, so the filter gradient's summation order does not depend on the launch configuration."""
    want = max(1, triton.cdiv(target, parallel))
    per_split = triton.cdiv(n_chunks, min(want, max(n_chunks, 1)))
    return per_split, max(1, triton.cdiv(n_chunks, per_split))


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _run_pass(
    a: torch.Tensor, b: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor | None, h: torch.Tensor,
    skip: torch.Tensor | None, lag_order: bool, reverse: bool, skip_grad: bool, chunk: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    B, L, D = a.shape
    G, K = h.shape
    check_exact(K, chunk)
    interpreted = _PASS.interpreted
    o1 = torch.empty((B, L, D), dtype=a.dtype, device=a.device)
    o2 = torch.empty_like(o1) if c2 is not None else None
    per_split, n_split = _splits(triton.cdiv(L, chunk), B * D // 16, _TARGET_PROGRAMS[interpreted])
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    dskip_part = torch.zeros((B * n_split, D), dtype=acc, device=a.device) if skip_grad else None
    if o1.numel():
        dg = D // G

        def grid(meta: dict) -> tuple[int, int, int]:
            return G * triton.cdiv(dg, meta["BLOCK_D"]), n_split, B

        c2_ = c2 if c2 is not None else c1
        _PASS.launch(
            grid, a, b, c1, c2_, h, skip if skip is not None else h, o1, o2 if o2 is not None else o1,
            dskip_part if skip_grad else o1, L, D, dg, per_split, n_split,
            *_strides(a), *_strides(b), *_strides(c1), *_strides(c2_), *_strides(o1), h.stride(0), h.stride(1),
            K=K, CHUNK=chunk, REVERSE=reverse, TWO_OUT=c2 is not None, HAS_SKIP=skip is not None,
            SKIP_GRAD=skip_grad, LAG_ORDER=lag_order, ACC=acc_dtype(a.dtype), DOT=dot_dtype(a.dtype, interpreted),
            op_bytes=operand_bytes(a.dtype, interpreted), max_block_d=triton.next_power_of_2(dg), chunk=chunk,
        )  # fmt: skip
    return o1, o2, (dskip_part.sum(0) if skip_grad else None)


def toeplitz_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, skip: torch.Tensor | None,
    lag_order: bool, chunk: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """``q * (T_h(k*v) + skip * k*v)`` with the grouped filter ``h`` (G, K)."""
    chunk = chunk or chunk_for(h.shape[1])
    return _run_pass(k, v, q, None, h, skip, lag_order, reverse=False, skip_grad=False, chunk=chunk)[0]


def _filter_grad(
    dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, lag_order: bool, chunk: int
) -> torch.Tensor:
    B, L, D = q.shape
    G, K = h.shape
    dg = D // G
    interpreted = _FILTER_GRAD.interpreted
    n_chunks = triton.cdiv(L, chunk)
    per_split, n_split = _splits(n_chunks, B * G, _TARGET_FILTER_GRAD_PROGRAMS[interpreted])
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    part = torch.zeros((B * n_split, G, 2, chunk, chunk), dtype=acc, device=q.device)
    if q.numel():

        def grid(meta: dict) -> tuple[int, int, int]:
            return chunk // meta["ROWS"], G, B * n_split

        _FILTER_GRAD.launch(
            grid, q, dy, k, v, part, L, dg, G, per_split, n_split,
            *_strides(q), *_strides(dy), *_strides(k), *_strides(v),
            CHUNK=chunk, ACC=acc_dtype(q.dtype), DOT=dot_dtype(q.dtype, interpreted),
            op_bytes=operand_bytes(q.dtype, interpreted), max_block_d=triton.next_power_of_2(dg), chunk=chunk,
        )  # fmt: skip
    p = part.sum(0)  # (G, 2, chunk, chunk)
    # dh[m] = sum_i P0[i, i - m] + sum_i P1[i, chunk + i - m]: gather the lag diagonals.
    i = torch.arange(chunk, device=q.device)[:, None]
    lag = torch.arange(K, device=q.device)[None, :]
    j0, j1 = i - lag, i - lag + chunk
    ok0, ok1 = (j0 >= 0).to(acc), (j1 < chunk).to(acc)
    d0 = torch.gather(p[:, 0], 2, j0.clamp(min=0).expand(G, chunk, K)) * ok0
    d1 = torch.gather(p[:, 1], 2, j1.clamp(max=chunk - 1).expand(G, chunk, K)) * ok1
    dh = (d0 + d1).sum(1)  # (G, K), lag order
    return (dh if lag_order else dh.flip(-1)).to(h.dtype)


def toeplitz_backward(
    dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
    skip: torch.Tensor | None, lag_order: bool, chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(dq, dk, dv, dh, dskip) of ``toeplitz_forward``, recomputing k*v and the convolution."""
    chunk = chunk or chunk_for(h.shape[1])
    dq = _run_pass(k, v, dy, None, h, skip, lag_order, reverse=False, skip_grad=False, chunk=chunk)[0]
    has_skip = skip is not None
    dk, dv, dskip = _run_pass(dy, q, v, k, h, skip, lag_order, reverse=True, skip_grad=has_skip, chunk=chunk)
    dh = _filter_grad(dy, q, k, v, h, lag_order, chunk)
    return dq, dk, dv, dh, (dskip.to(skip.dtype) if has_skip else None)
