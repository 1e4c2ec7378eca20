"""Causal attention over a context-parallel (load-balanced) sequence: all-gather K/V, or pass K/V around a ring.

Both replace the model's parameter-free attention module (``models/common/attention.py``'s ``InnerAttention``:
``scale``, ``dropout`` and its backend behind ``inner(q, k, v)``) and take this rank's q, k, v as (B, H, 2c, d) with
K/V carrying their own (GQA) heads, so only KV heads cross ranks.

* ``allgather``: one all-gather of K/V; each local query chunk then attends the gathered keys up to the end of
  its own chunk, through the model's attention backend (SDPA, flash-attn) with a bottom-right aligned causal
  mask (on CPU, where SDPA would build that mask, as two fused blocks merged by log-sum-exp). Backward
  reduce-scatters the K/V gradients. Peak memory: the whole sequence's K/V per rank.
* ``ring``: N steps; at each, this rank's query chunks attend the K/V block it holds, and the block moves on to
  the next rank while the step computes. Partial attentions merge by their log-sum-exp (online softmax);
  backward recomputes each block with the final output and log-sum-exp, passing K/V with their gradient
  accumulators around the ring. Peak memory: two K/V blocks. Blocks run on the CPU flash kernel, or elsewhere as
  fp32 matmul + logsumexp over bounded row chunks (no fused GPU block kernel is wired yet).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from torchtitan_hyena.distributed.context_parallel.collectives import all_gather, exchange, exchange_async
from torchtitan_hyena.distributed.context_parallel.layout import (
    ContextParallel,
    block_kind,
    chunk_ids,
    key_extent,
    natural_order,
)
from torchtitan_hyena.tools.logging import logger

# Score elements per row chunk of the matmul block kernel: 256 MiB of fp32 scores.
SCORE_ELEMENTS = 1 << 26


class AllGatherAttention(nn.Module):
    """K/V all-gathered once; per local chunk, attention to the keys before its end via the model's backend."""

    def __init__(self, inner: nn.Module, cp: ContextParallel) -> None:
        super().__init__()
        self.inner = inner
        self.cp = cp

    @torch.compiler.disable
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = q.shape[2] // 2
        kv = all_gather(torch.stack([k, v]), self.cp.group)  # (N, 2, B, Hkv, 2c, d)
        kv = kv.unflatten(4, (2, c)).movedim(4, 1).flatten(0, 1)  # (2N, 2, B, Hkv, c, d), index 2 * rank + slot
        keys, values = torch.cat([kv[i] for i in natural_order(self.cp.degree)], dim=3)  # (B, Hkv, L, d) each
        blockwise = self.blockwise(q)
        outs = []
        for i, chunk in enumerate(self.cp.chunks()):
            end = key_extent(chunk, c)
            args = (q[:, :, i * c : (i + 1) * c], keys[:, :, :end], values[:, :, :end])
            outs.append(_PrefixAttention.apply(*args, self.inner.scale) if blockwise else self.inner(*args))
        return torch.cat(outs, dim=2)

    def blockwise(self, q: torch.Tensor) -> bool:
        """On CPU, SDPA has no fused kernel for a bottom-right causal mask and would build a (c, end) float mask;
        two fused blocks merged by log-sum-exp compute the same attention without it (no dropout there)."""
        return q.device.type == "cpu" and not (self.inner.dropout > 0 and self.training)


class _PrefixAttention(torch.autograd.Function):
    """A query chunk against the key prefix ending with its own chunk, as two blocks: the earlier keys (no mask)
    and its own chunk (causal), merged by log-sum-exp; backward from the final output and log-sum-exp."""

    @staticmethod
    def _blocks(q: torch.Tensor, k: torch.Tensor) -> list[tuple[slice, bool]]:
        split = k.shape[2] - q.shape[2]
        return [(slice(0, split), False), (slice(split, None), True)] if split else [(slice(None), True)]

    @staticmethod
    def forward(ctx, q, k, v, scale: float | None) -> torch.Tensor:
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        for cols, causal in _PrefixAttention._blocks(q, k):
            _merge(out, lse, *block_forward(q, k[:, :, cols], v[:, :, cols], scale, causal))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for cols, causal in _PrefixAttention._blocks(q, k):
            bq, bk, bv = block_backward(grad, q, k[:, :, cols], v[:, :, cols], out, lse, ctx.scale, causal)
            dq += bq
            dk[:, :, cols] += bk
            dv[:, :, cols] += bv
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


class RingAttention(nn.Module):
    """Ring (pass-KV) attention with log-sum-exp merging; see the module docstring."""

    def __init__(self, inner: nn.Module, cp: ContextParallel) -> None:
        super().__init__()
        self.scale = inner.scale
        self.cp = cp

    @torch.compiler.disable
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _RingAttention.apply(q, k, v, self.scale, self.cp)


def apply_cp_attention(model: nn.Module, cp: ContextParallel, attention_cls: type[nn.Module]) -> None:
    """Replace every ``attention_cls`` module of ``model`` (the family's parameter-free inner attention) by its
    context-parallel version; the state dict is unchanged."""
    cls = RingAttention if cp.rotate_method == "ring" else AllGatherAttention
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, attention_cls):
                setattr(module, name, cls(child, cp))


# ---------------------------------------------------------------------------------------------- ring
def _pairs(rank: int, src: int, degree: int):
    """(query slot, key slot, causal) of the blocks this rank computes against the K/V of rank ``src``."""
    for i, q_chunk in enumerate(chunk_ids(rank, degree)):
        for j, k_chunk in enumerate(chunk_ids(src, degree)):
            kind = block_kind(q_chunk, k_chunk)
            if kind is not None:
                yield i, j, kind == "causal"


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float | None, cp: ContextParallel) -> torch.Tensor:
        rank, degree = cp.rank, cp.degree
        nxt, prv = (rank + 1) % degree, (rank - 1) % degree
        c = q.shape[2] // 2
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        for step in range(degree):
            works, incoming = [], None
            if step < degree - 1:  # the next block travels while this one is computed
                incoming = torch.empty_like(kv)
                works = exchange_async([(nxt, kv)], [(prv, incoming)], cp.group)
            for i, j, causal in _pairs(rank, (rank - step) % degree, degree):
                rows, cols = slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c)
                o, block_lse = block_forward(q[:, :, rows], kv[0, :, :, cols], kv[1, :, :, cols], scale, causal)
                _merge(out[:, :, rows], lse[:, :, rows], o, block_lse)
            for work in works:
                work.wait()
            kv = incoming if incoming is not None else kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.cp = scale, cp
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        cp, scale = ctx.cp, ctx.scale
        rank, degree = cp.rank, cp.degree
        nxt, prv = (rank + 1) % degree, (rank - 1) % degree
        c = q.shape[2] // 2
        grad = grad.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # travels with its K/V block
        for step in range(degree):
            works, incoming = [], None
            if step < degree - 1:
                incoming = torch.empty_like(kv)
                works = exchange_async([(nxt, kv)], [(prv, incoming)], cp.group)
            for i, j, causal in _pairs(rank, (rank - step) % degree, degree):
                rows, cols = slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c)
                dq_b, dk_b, dv_b = block_backward(
                    grad[:, :, rows], q[:, :, rows], kv[0, :, :, cols], kv[1, :, :, cols], out[:, :, rows],
                    lse[:, :, rows], scale, causal,
                )  # fmt: skip
                dq[:, :, rows] += dq_b
                dkv[0, :, :, cols] += dk_b
                dkv[1, :, :, cols] += dv_b
            # The accumulator follows its block; after the last step it reaches the block's owner.
            received = torch.empty_like(dkv)
            exchange([(nxt, dkv)], [(prv, received)], cp.group)
            dkv = received
            for work in works:
                work.wait()
            kv = incoming if incoming is not None else kv
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold a partial attention (normalised over its own keys) into the running (out, lse), in place."""
    new = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - new)[..., None]).add_(block_out.float() * torch.exp(block_lse - new)[..., None])
    lse.copy_(new)


# ---------------------------------------------------------------------------------------------- block kernels
def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q k^T) v, fp32 log-sum-exp (B, H, Lq)) of one block; ``causal``: square block, diagonal mask.
    K/V heads are repeated for GQA here, one block at a time."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if q.device.type == "cpu":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse.float()
    _note_matmul_kernel(q.device.type)
    return _matmul_forward(q, k, v, scale, causal)


@functools.cache
def _note_matmul_kernel(device_type: str) -> None:
    logger.warning(
        f"ring attention on {device_type} computes its blocks as fp32 matmuls (no fused block kernel yet): lowest "
        "memory, slower than context_parallel_rotate_method = allgather, which uses the fused attention backend"
    )


def block_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float | None,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *final* output and log-sum-exp of the rows (the block's share of the
    softmax is exp(s - lse)); K/V gradients are summed back over the GQA groups."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if q.device.type == "cpu":
        args = [t.contiguous() for t in (grad, q, k, v, out, lse)]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *args, 0.0, causal, scale=scale
        )
    else:
        dq, dk, dv = _matmul_backward(grad, q, k, v, out, lse, scale, causal)
    if groups > 1:
        dk, dv = (t.unflatten(1, (-1, groups)).sum(2) for t in (dk, dv))
    return dq, dk, dv


def _row_chunks(q: torch.Tensor, keys: int):
    rows = max(1, SCORE_ELEMENTS // (q.shape[0] * q.shape[1] * keys))
    for start in range(0, q.shape[2], rows):
        yield start, min(start + rows, q.shape[2])


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, start: int, stop: int) -> torch.Tensor:
    s = (q[:, :, start:stop].float() @ k.float().transpose(-1, -2)) * scale
    if causal:  # key j is later than query start + i
        mask = torch.ones(stop - start, k.shape[2], dtype=torch.bool, device=q.device).triu(start + 1)
        s.masked_fill_(mask, float("-inf"))
    return s


def _matmul_forward(q, k, v, scale, causal):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for start, stop in _row_chunks(q, k.shape[2]):
        s = _scores(q, k, scale, causal, start, stop)
        lse[:, :, start:stop] = s.logsumexp(-1)
        out[:, :, start:stop] = (torch.exp(s - lse[:, :, start:stop, None]) @ v.float()).to(q.dtype)
    return out, lse


def _matmul_backward(grad, q, k, v, out, lse, scale, causal):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for start, stop in _row_chunks(q, k.shape[2]):
        p = torch.exp(_scores(q, k, scale, causal, start, stop) - lse[:, :, start:stop, None])
        g = grad[:, :, start:stop].float()
        dv += p.transpose(-1, -2) @ g
        ds = p * (g @ v.float().transpose(-1, -2) - (g * out[:, :, start:stop].float()).sum(-1, keepdim=True))
        dq[:, :, start:stop] = (ds @ k.float()) * scale
        dk += (ds.transpose(-1, -2) @ q[:, :, start:stop].float()) * scale
    return dq, dk, dv
