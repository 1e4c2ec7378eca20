"""Collectives with autograd for context parallelism, on any backend (NCCL/RCCL and gloo).

Each is a ``torch.autograd.Function`` over plain ``torch.distributed`` calls, whose backward is the adjoint
collective: all-gather <-> reduce-scatter, all-to-all <-> itself, halo send <-> halo gradient sent back.
They run eagerly (torch.compile treats the context-parallel regions as graph breaks, see
``context_parallel/__init__.py``). :func:`track_communication` counts the bytes each rank sends.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from torchtitan_hyena.distributed.context_parallel.layout import chunk_ids, chunk_owner
from torchtitan_hyena.distributed.utils import all_gather_single, reduce_scatter_single

_trackers: list[Counter] = []


@contextlib.contextmanager
def track_communication() -> Iterator[Counter]:
    """Bytes this rank sends to other ranks inside the block, by collective (for benchmarks and tests)."""
    counter: Counter = Counter()
    _trackers.append(counter)
    try:
        yield counter
    finally:
        _trackers.remove(counter)


def _record(kind: str, nbytes: float) -> None:
    for counter in _trackers:
        counter[kind] += int(nbytes)


# ---------------------------------------------------------------------------------------------- all-gather
class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        n = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((n * x.shape[0], *x.shape[1:]))  # the concatenated form: every backend takes it
        all_gather_single(out, x, group=group)
        _record("all_gather", x.nbytes * (n - 1))
        return out.view(n, *x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        n = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty(grad.shape[1:])
        reduce_scatter_single(out, grad.flatten(0, 1), group=ctx.group)
        _record("reduce_scatter", out.nbytes * (n - 1))
        return out, None


def all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(N, *x.shape): every rank's ``x``, stacked in rank order; gradients are summed back (reduce-scatter)."""
    return _AllGather.apply(x, group)


# ---------------------------------------------------------------------------------------------- all-to-all
class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_to_all(grad, ctx.group), None


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    n = dist.get_world_size(group)
    _record("all_to_all", x.nbytes * (n - 1) / n)
    return out


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``x`` is (N, ...): block i goes to rank i; block j of the result came from rank j. Its own adjoint."""
    return _AllToAll.apply(x, group)


# ---------------------------------------------------------------------------------------------- p2p
Messages = list[tuple[int, torch.Tensor]]  # (group rank of the peer, tensor); same-peer messages match in order


def exchange(sends: Messages, recvs: Messages, group: dist.ProcessGroup) -> None:
    """Send and receive point-to-point messages, all at once (blocking)."""
    for work in exchange_async(sends, recvs, group):
        work.wait()


def exchange_async(sends: Messages, recvs: Messages, group: dist.ProcessGroup) -> list[dist.Work]:
    """Start :func:`exchange`; wait on the returned works before reading the receive buffers."""
    ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(group, p), group) for p, t in sends]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, p), group) for p, t in recvs]
    _record("p2p", sum(t.nbytes for _, t in sends))
    return dist.batch_isend_irecv(ops) if ops else []


# ---------------------------------------------------------------------------------------------- FIR halos
@dataclass(frozen=True)
class Transfer:
    """Positions [src_start, src_start + length) of local chunk ``src_slot`` on ``src_rank`` become positions
    [dst_start, ...) of the halo of local chunk ``dst_slot`` on ``dst_rank``."""

    src_rank: int
    src_slot: int
    src_start: int
    dst_rank: int
    dst_slot: int
    dst_start: int
    length: int


@functools.lru_cache(maxsize=64)
def halo_plan(degree: int, chunk_len: int, width: int) -> tuple[Transfer, ...]:
    """Every transfer that gives each local chunk the ``width`` positions before it in the global sequence.

    The predecessor of chunk g is chunk g-1 wherever the layout put it: the first chunk of rank g-1 (g < N), the
    second chunk of rank 2N-g (g > N), or the same rank's first chunk (g = N, on rank N-1). A halo longer than a
    chunk reaches further back; positions before the sequence start stay zero (causal padding).
    """
    plan = []
    for rank in range(degree):
        for slot, chunk in enumerate(chunk_ids(rank, degree)):
            start = chunk * chunk_len - width  # first global position of the halo
            for prev in range(max(0, start // chunk_len), chunk):
                lo, hi = max(prev * chunk_len, start), (prev + 1) * chunk_len
                src_rank, src_slot = chunk_owner(prev, degree)
                plan.append(Transfer(src_rank, src_slot, lo - prev * chunk_len, rank, slot, lo - start, hi - lo))
    return tuple(plan)


def _move(
    plan: tuple[Transfer, ...],
    rank: int,
    group: dist.ProcessGroup,
    source: torch.Tensor,
    target: torch.Tensor,
    backward: bool,
) -> None:
    """Carry out ``plan``: forward copies chunk tails (``source``, B x 2 x c x C) into halos (``target``,
    B x 2 x width x C); backward adds halo gradients (``source``) back onto the tails (``target``).
    Transfers between the same two ranks travel as one message, in plan order.
    """

    def ends(t: Transfer) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        src, dst = (t.src_rank, t.src_slot, t.src_start), (t.dst_rank, t.dst_slot, t.dst_start)
        return (dst, src) if backward else (src, dst)

    sends: dict[int, list[torch.Tensor]] = {}
    incoming: dict[int, list[Transfer]] = {}
    for t in plan:
        (s_rank, s_slot, s_start), (d_rank, d_slot, d_start) = ends(t)
        if s_rank == rank:
            piece = source[:, s_slot, s_start : s_start + t.length]
            if d_rank == rank:
                _put(target, d_slot, d_start, piece, backward)
            else:
                sends.setdefault(d_rank, []).append(piece)
        elif d_rank == rank:
            incoming.setdefault(s_rank, []).append(t)
    batch, channels = source.shape[0], source.shape[-1]
    send_buffers = [(p, torch.cat(pieces, dim=1).contiguous()) for p, pieces in sends.items()]
    recv_buffers = {p: source.new_empty(batch, sum(t.length for t in ts), channels) for p, ts in incoming.items()}
    exchange(send_buffers, list(recv_buffers.items()), group)
    for p, ts in incoming.items():
        for t, piece in zip(ts, recv_buffers[p].split([t.length for t in ts], dim=1)):
            _, (_, d_slot, d_start) = ends(t)
            _put(target, d_slot, d_start, piece, backward)


def _put(target: torch.Tensor, slot: int, start: int, piece: torch.Tensor, accumulate: bool) -> None:
    view = target[:, slot, start : start + piece.shape[1]]
    if accumulate:
        view.add_(piece)
    else:
        view.copy_(piece)


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, width: int, rank: int, degree: int, group: dist.ProcessGroup) -> torch.Tensor:
        batch, length, channels = x.shape
        plan = halo_plan(degree, length // 2, width)
        ctx.plan, ctx.rank, ctx.group, ctx.shape = plan, rank, group, x.shape
        halo = x.new_zeros(batch, 2, width, channels)
        _move(plan, rank, group, x.unflatten(1, (2, length // 2)), halo, backward=False)
        return halo

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        batch, length, channels = ctx.shape
        out = grad.new_zeros(batch, 2, length // 2, channels)
        _move(ctx.plan, ctx.rank, ctx.group, grad, out, backward=True)
        return out.flatten(1, 2), None, None, None, None


def halo_exchange(x: torch.Tensor, width: int, rank: int, degree: int, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, 2, width, C): for each local chunk of ``x`` (B, 2c, C), the ``width`` positions before it in the
    global sequence (zeros before its start). Gradients go back to the ranks the positions came from."""
    return _HaloExchange.apply(x, width, rank, degree, group)
