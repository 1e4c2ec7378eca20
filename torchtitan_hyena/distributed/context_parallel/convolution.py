"""Causal convolutions over a context-parallel (load-balanced) sequence, as Hyena operators run them
(docs/stripedhyena2.md §12).

* FIR convolutions (the K=3 featurizer, Hyena-SE K=7, Hyena-MR K=128 by default) need the K-1 positions before
  each local chunk: :func:`fir_with_halo` fetches them point-to-point (``halo_exchange``), runs both chunks as a
  batch of two with their halos prepended, and drops the halo outputs. Backward sends halo gradients back.
* Long convolutions (Hyena-LI; Hyena-MR with ``mr_method = alltoall``) see the whole sequence: the pre-gated
  signal ``k*v`` goes from sequence shards to channel shards (one all-to-all, then the chunks in sequence
  order), each rank convolves all L positions of its D/N channels with its slice of the filters, and the result
  comes back the same way before the post-gate ``q*``. Only ``k*v`` and the result cross ranks (not q, k, v).

A model's convolution modules call :func:`conv_with_halo`, :func:`gated_conv_with_halo` or
:func:`gated_conv_on_channels` with their own local convolution once their family's parallelize plan has handed
them the context-parallel group; the gated convolution is ``conv(q, k, v, skip, channels=None)`` computing
``q * (h * (k*v) + skip * (k*v))``, where ``channels`` (a :class:`ChannelSlice`) says which channels it holds.
These regions run eagerly (graph breaks under torch.compile).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from torchtitan_hyena.distributed.context_parallel.collectives import all_to_all, halo_exchange
from torchtitan_hyena.distributed.context_parallel.layout import ChannelSlice, ContextParallel, chunk_ids, natural_order

GatedConv = Callable[..., Tensor]  # (q, k, v, skip, channels=None) -> q * (h * (k*v) + skip * (k*v))


def fir_with_halo(
    conv: Callable[..., Tensor], inputs: Sequence[Tensor], exchanged: Sequence[bool], taps: int, cp: ContextParallel
) -> Tensor:
    """``conv(*inputs)`` for a causal FIR of ``taps`` taps on this rank's (B, 2c, C) inputs, as if it ran on the
    whole sequence. ``exchanged[i]``: input i feeds the convolution and gets the real halo; the others (a
    post-gate) get zeros, as the halo outputs are dropped."""
    width = taps - 1
    if width == 0:
        return conv(*inputs)
    batch, length, _ = inputs[0].shape
    sent = [x for x, e in zip(inputs, exchanged) if e]
    halo = halo_exchange(torch.cat(sent, dim=-1), width, cp.rank, cp.degree, cp.group)  # one message per peer
    halos = iter(halo.split([x.shape[-1] for x in sent], dim=-1))
    extended = []
    for x, e in zip(inputs, exchanged):
        halo = next(halos) if e else x.new_zeros(batch, 2, width, x.shape[-1])
        extended.append(torch.cat([halo, x.unflatten(1, (2, length // 2))], dim=2).flatten(0, 1))
    y = conv(*extended)  # (2B, width + c, C): both chunks as one batch
    return y.unflatten(0, (batch, 2))[:, :, width:].flatten(1, 2)


def sequence_to_channels(x: Tensor, cp: ContextParallel) -> Tensor:
    """(B, 2c, C) sequence shard -> (B, L, C/N): every position, in order, of this rank's C/N channels."""
    n, c = cp.degree, x.shape[1] // 2
    send = x.unflatten(-1, (n, -1)).movedim(2, 0)  # (N, B, 2c, C/N): block i holds rank i's channels
    recv = all_to_all(send, cp.group).unflatten(2, (2, c)).movedim(2, 1).flatten(0, 1)  # (2N, B, c, C/N)
    return torch.cat([recv[i] for i in natural_order(n)], dim=1)


def channels_to_sequence(y: Tensor, cp: ContextParallel) -> Tensor:
    """Inverse of :func:`sequence_to_channels`: (B, L, C/N) -> (B, 2c, C)."""
    n = cp.degree
    chunks = y.unflatten(1, (2 * n, -1))  # (B, 2N, c, C/N), sequence order
    send = torch.stack([torch.cat([chunks[:, g] for g in chunk_ids(r, n)], dim=1) for r in range(n)])
    return all_to_all(send, cp.group).movedim(0, 2).flatten(2, 3)  # (B, 2c, N, C/N) -> (B, 2c, C)


@torch.compiler.disable
def conv_with_halo(conv: Callable[[Tensor], Tensor], x: Tensor, taps: int, cp: ContextParallel) -> Tensor:
    """An ungated causal FIR (e.g. the featurizer) on this rank's shards, as on the whole sequence."""
    return fir_with_halo(conv, [x], [True], taps, cp)


@torch.compiler.disable
def gated_conv_with_halo(
    conv: GatedConv, q: Tensor, k: Tensor, v: Tensor, skip: Tensor | None, taps: int, cp: ContextParallel
) -> Tensor:
    """A gated FIR (SE, MR): k and v get halos, q (the post-gate) zeros, since halo outputs are dropped."""

    def extended(qh: Tensor, kh: Tensor, vh: Tensor) -> Tensor:
        return conv(qh, kh, vh, skip)

    return fir_with_halo(extended, [q, k, v], [False, True, True], taps, cp)


@torch.compiler.disable
def gated_conv_on_channels(
    conv: GatedConv, q: Tensor, k: Tensor, v: Tensor, skip: Tensor | None, cp: ContextParallel
) -> Tensor:
    """A long gated convolution (LI, or MR by all-to-all) on all positions of this rank's slice of the channels."""
    channels = q.shape[-1]
    per_rank = channels // cp.degree
    part = ChannelSlice(cp.rank * per_rank, (cp.rank + 1) * per_rank, channels)
    s = sequence_to_channels(k * v, cp)
    ones = s.new_ones(()).expand_as(s)  # the gates run outside: only k*v and the result cross ranks
    y = conv(ones, s, ones, None if skip is None else skip[part.start : part.stop], part)
    return q * channels_to_sequence(y, cp)
