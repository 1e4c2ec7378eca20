"""The load-balanced ("head-tail", zigzag) sequence layout of context parallelism.

A sequence of L tokens is cut into 2N chunks of c = L / 2N tokens for N context-parallel ranks; rank r holds
chunks r and 2N-1-r, concatenated. Under a causal mask the early chunks are cheap and the late ones
expensive, so pairing them gives every rank the same attention work (TorchTitan's "headtail" balancer,
savanna's zigzag). Everything that crosses ranks (K/V exchange, FIR halos, the sequence <-> channel
all-to-all) is written in terms of the helpers below, so there is one definition of the layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist


def chunk_ids(rank: int, degree: int) -> tuple[int, int]:
    """Global chunk indices held by ``rank``, in local order."""
    return rank, 2 * degree - 1 - rank


def chunk_owner(chunk: int, degree: int) -> tuple[int, int]:
    """(rank, local slot 0/1) holding global chunk ``chunk``."""
    return (chunk, 0) if chunk < degree else (2 * degree - 1 - chunk, 1)


def natural_order(degree: int) -> list[int]:
    """For each global chunk g, the index ``2 * rank + slot`` of the (rank, slot) holding it: indexing a
    rank-major stack of local chunks with this list puts the chunks back in sequence order."""
    return [2 * r + s for r, s in (chunk_owner(g, degree) for g in range(2 * degree))]


def block_kind(q_chunk: int, k_chunk: int) -> str | None:
    """How a query chunk attends a key chunk under the causal mask: ``"full"`` (every key is earlier),
    ``"causal"`` (the diagonal chunk: lower-triangular), or None (every key is later: skipped)."""
    if k_chunk < q_chunk:
        return "full"
    return "causal" if k_chunk == q_chunk else None


def key_extent(q_chunk: int, chunk_len: int) -> int:
    """Keys (of the sequence in natural order) a query chunk attends: the prefix ending with its own chunk.
    Attention over that prefix with a bottom-right aligned causal mask is the global causal mask."""
    return (q_chunk + 1) * chunk_len


def shard_sequence(x: torch.Tensor, rank: int, degree: int, dim: int = 1) -> torch.Tensor:
    """This rank's two chunks of ``x`` along ``dim`` (a copy)."""
    chunks = x.chunk(2 * degree, dim=dim)
    return torch.cat([chunks[i] for i in chunk_ids(rank, degree)], dim=dim)


def local_positions(seq_len: int, rank: int, degree: int, device: torch.device | None = None) -> torch.Tensor:
    """Global positions (RoPE) of this rank's tokens."""
    c = seq_len // (2 * degree)
    return torch.cat([torch.arange(g * c, (g + 1) * c, device=device) for g in chunk_ids(rank, degree)])


@dataclass(frozen=True)
class ChannelSlice:
    """Channels [start, stop) of the ``total`` channels this rank would otherwise compute (e.g. its share after
    the context-parallel all-to-all from sequence shards to channel shards)."""

    start: int
    stop: int
    total: int

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """The rows of a per-channel (total, ...) or per-group (groups, ...) tensor that cover these channels.
        A slice may not split a group (layouts that would are rejected before the model is built)."""
        per_row = self.total // t.shape[0]
        if self.start % per_row or self.stop % per_row:
            raise ValueError(f"channels [{self.start}, {self.stop}) split a group of {per_row} channels")
        return t[self.start // per_row : self.stop // per_row]


@dataclass(frozen=True)
class ContextParallel:
    """One rank's view of the context-parallel group: who it is, and how attention and Hyena-MR exchange data.

    ``rotate_method``: ``allgather`` (gather all K/V once; any attention backend) or ``ring`` (pass K/V blocks
    around the ring, merging partial attentions by log-sum-exp: K/V of one block at a time).
    ``mr_method``: Hyena-MR convolutions by ``halo`` (p2p exchange of the last K-1 positions) or ``alltoall``
    (sequence shards -> channel shards, as the LI convolutions).
    """

    group: dist.ProcessGroup
    rank: int
    degree: int
    rotate_method: str = "allgather"
    mr_method: str = "halo"

    def chunks(self) -> tuple[int, int]:
        return chunk_ids(self.rank, self.degree)

    def shard_batch(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's tokens of every (B, L) tensor of ``batch`` (input, labels, loss weights), plus their
        global ``positions``. The loss then sums over local tokens; the trainer's token count, summed over the
        ``dp_cp`` group, is the global one."""
        seq_len = batch["input"].shape[1]
        if seq_len % (2 * self.degree):
            raise ValueError(f"sequence length {seq_len} is not divisible by 2 x context_parallel_degree")
        out = {
            key: shard_sequence(value, self.rank, self.degree)
            if torch.is_tensor(value) and value.dim() >= 2 and value.shape[1] == seq_len
            else value
            for key, value in batch.items()
        }
        out["positions"] = local_positions(seq_len, self.rank, self.degree, batch["input"].device)
        return out
