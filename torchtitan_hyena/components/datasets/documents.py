"""Documents laid end to end as one token stream: the source behind DNA, text and memmap data.

The tokens of every document sit in one flat array (in memory, or a ``np.memmap`` of a
preprocessed file) with ``offsets[i]:offsets[i + 1]`` delimiting document i. Each epoch lays the
documents out in a seeded order (the same permutation as the Neural Pile source's per-row shuffle),
and a read copies only the slices it covers, so windows pack across document boundaries without
any token buffer.
"""

from __future__ import annotations

import numpy as np

from torchtitan_hyena.errors import UserError


class DocumentStream:
    """A :class:`~torchtitan_hyena.components.datasets.base.TokenSource` over concatenated documents."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, name: str, shuffle: bool, seed: int) -> None:
        offsets = np.asarray(offsets, dtype=np.int64)
        if len(offsets) < 2:
            raise UserError(f"dataset {name} holds no documents")
        if offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
            raise UserError(
                f"dataset {name}: the document index does not match its {len(tokens)} tokens; re-run preprocess"
            )
        self.tokens = tokens
        self.offsets = offsets
        self.name = name
        self.shuffle = shuffle
        self.seed = seed
        self._epoch: int | None = None
        self._order = self._starts = None

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def num_tokens(self, epoch: int) -> int:
        return int(self.offsets[-1])

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, start of each placed document in the epoch's stream)."""
        if self._epoch != epoch:
            order = np.random.default_rng((self.seed, epoch)).permutation(self.num_documents)
            self._order = order
            self._starts = np.concatenate([[0], np.cumsum(np.diff(self.offsets)[order])])
            self._epoch = epoch
        return self._order, self._starts

    def read(self, epoch: int, start: int, stop: int) -> np.ndarray:
        if not self.shuffle:
            return np.asarray(self.tokens[start:stop])
        order, starts = self._layout(epoch)
        first = int(np.searchsorted(starts, start, side="right")) - 1
        last = int(np.searchsorted(starts, stop, side="left"))
        pieces = []
        for pos in range(first, last):
            begin = int(self.offsets[order[pos]])
            a = max(start, int(starts[pos])) - int(starts[pos])
            b = min(stop, int(starts[pos + 1])) - int(starts[pos])
            pieces.append(self.tokens[begin + a : begin + b])
        return np.concatenate(pieces)
