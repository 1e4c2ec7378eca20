"""Which channels of a layer one rank computes, when a parallelism splits them beyond tensor parallelism."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
