"""The Neural Pile (``eminorhan/neural-pile-{primate,rodent}``) as a token source.

Each row holds ``spike_counts``: uint8, (neurons n, time bins t). As in gpt-neuro, the row becomes
the time-major stream ``[sep, c(1,t0), ..., c(n,t0), sep, c(1,t1), ...]`` with ``sep = vocab - 1``,
and rows are concatenated (optionally in a seeded per-epoch order) into one stream. Unlike
gpt-neuro, counts are clipped to ``vocab - 2`` so they cannot wrap or imitate the separator, and
a window is tokenized on demand from only the time bins it covers: no token buffer, no replay.
"""

from __future__ import annotations

import numpy as np

from torchtitan_hyena.components.tokenizers import SpikeTokenizer
from torchtitan_hyena.errors import UserError

COLUMN = "spike_counts"


def tokenize_spikes(counts: np.ndarray, tokenizer: SpikeTokenizer) -> np.ndarray:
    """(n, t) counts -> t * (n + 1) tokens, time-major with a leading separator per time bin."""
    n, t = counts.shape
    out = np.empty((t, n + 1), dtype=np.uint8)
    out[:, 0] = tokenizer.separator
    np.minimum(counts.T, tokenizer.max_count, out=out[:, 1:])
    return out.reshape(-1)


class NeuralPileSource:
    """Random access into the concatenated token stream of a Neural Pile split.

    Only offsets are held in memory; spike arrays stay in the memory-mapped Arrow files and are
    read zero-copy, a time-bin slice at a time.
    """

    def __init__(self, dataset, tokenizer: SpikeTokenizer, shuffle: bool, seed: int, name: str) -> None:
        if COLUMN not in dataset.column_names:
            raise UserError(
                f"dataset {name} has no {COLUMN!r} column (columns: {', '.join(dataset.column_names)}); "
                "is it a Neural Pile dataset?"
            )
        self.name = name
        self.tokenizer = tokenizer
        self.shuffle = shuffle
        self.seed = seed
        column = dataset.data.table.column(COLUMN)
        self._chunks = column.chunks
        self._chunk_start = np.cumsum([0] + [len(c) for c in self._chunks])
        self._neurons, self._bins = self._shapes()
        self._row_tokens = self._bins * (self._neurons + 1)
        self._epoch: int | None = None
        self._order = self._offsets = None

    def _shapes(self) -> tuple[np.ndarray, np.ndarray]:
        neurons, bins = [], []
        self._outer = [c.offsets.to_numpy() for c in self._chunks]
        self._inner = [c.values.offsets.to_numpy() for c in self._chunks]
        for outer, inner in zip(self._outer, self._inner):
            n = np.diff(outer).astype(np.int64)
            elems = (inner[outer[1:]] - inner[outer[:-1]]).astype(np.int64)
            t = elems // np.maximum(n, 1)
            first_len = np.where(n > 0, inner[np.minimum(outer[:-1] + 1, len(inner) - 1)] - inner[outer[:-1]], 0)
            if np.any((n > 0) & ((t * n != elems) | (first_len != t))):
                raise UserError(f"dataset {self.name}: a spike_counts row has neurons of different lengths")
            neurons.append(n)
            bins.append(t)
        return np.concatenate(neurons).astype(np.int64), np.concatenate(bins).astype(np.int64)

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch != epoch:
            rows = len(self._row_tokens)
            order = np.random.default_rng((self.seed, epoch)).permutation(rows) if self.shuffle else np.arange(rows)
            self._order = order
            self._offsets = np.concatenate([[0], np.cumsum(self._row_tokens[order])])
            self._epoch = epoch
        return self._order, self._offsets

    def num_tokens(self, epoch: int) -> int:
        return int(self._row_tokens.sum())

    def row_counts(self, row: int) -> np.ndarray:
        """Row ``row``'s spike counts as a zero-copy (n, t) uint8 view."""
        c = int(np.searchsorted(self._chunk_start, row, side="right") - 1)
        i = row - int(self._chunk_start[c])
        outer, inner = self._outer[c], self._inner[c]
        lo, hi = int(inner[outer[i]]), int(inner[outer[i + 1]])
        flat = self._chunks[c].values.values.slice(lo, hi - lo).to_numpy(zero_copy_only=False)
        return flat.reshape(int(self._neurons[row]), int(self._bins[row]))

    def read(self, epoch: int, start: int, stop: int) -> np.ndarray:
        order, offsets = self._epoch_layout(epoch)
        first = int(np.searchsorted(offsets, start, side="right") - 1)
        pieces = []
        pos = first
        while start < stop:
            row = int(order[pos])
            row_start = int(offsets[pos])
            width = int(self._neurons[row]) + 1
            a, b = start - row_start, min(stop, int(offsets[pos + 1])) - row_start
            t0, t1 = a // width, -(-b // width)
            tokens = tokenize_spikes(self.row_counts(row)[:, t0:t1], self.tokenizer)
            pieces.append(tokens[a - t0 * width : b - t0 * width])
            start = row_start + b
            pos += 1
        return np.concatenate(pieces)
