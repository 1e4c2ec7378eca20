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
        # Zero-copy numpy views of the (memory-mapped) uint8 buffers: row access is then pure numpy.
        self._values = [c.values.values.to_numpy(zero_copy_only=False) for c in column.chunks]
        chunk_ids, starts, neurons, bins = self._row_layout(column.chunks)
        self._row_tokens = bins * (neurons + 1)
        # Per-row (chunk, first element, neurons, bins) as Python ints: cheap scalar access per window.
        self._rows = list(zip(chunk_ids.tolist(), starts.tolist(), neurons.tolist(), bins.tolist()))
        self._epoch: int | None = None
        self._order: list[int] = []
        self._offsets = np.zeros(1, dtype=np.int64)

    def _row_layout(self, chunks) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Vectorised row shapes from the Arrow list offsets, without touching the spike data."""
        chunk_ids, starts, neurons, bins = [], [], [], []
        for c, chunk in enumerate(chunks):
            outer = chunk.offsets.to_numpy().astype(np.int64)
            inner = chunk.values.offsets.to_numpy().astype(np.int64)
            n = np.diff(outer)
            elems = inner[outer[1:]] - inner[outer[:-1]]
            t = elems // np.maximum(n, 1)
            first_len = np.where(n > 0, inner[np.minimum(outer[:-1] + 1, len(inner) - 1)] - inner[outer[:-1]], 0)
            if np.any((n > 0) & ((t * n != elems) | (first_len != t))):
                raise UserError(f"dataset {self.name}: a spike_counts row has neurons of different lengths")
            chunk_ids.append(np.full(len(n), c))
            starts.append(inner[outer[:-1]])
            neurons.append(n)
            bins.append(t)
        return tuple(np.concatenate(x).astype(np.int64) for x in (chunk_ids, starts, neurons, bins))

    def _epoch_layout(self, epoch: int) -> tuple[list[int], np.ndarray]:
        if self._epoch != epoch:
            rows = len(self._row_tokens)
            order = np.random.default_rng((self.seed, epoch)).permutation(rows) if self.shuffle else np.arange(rows)
            self._order = order.tolist()
            self._offsets = np.concatenate([[0], np.cumsum(self._row_tokens[order])])
            self._epoch = epoch
        return self._order, self._offsets

    def num_tokens(self, epoch: int) -> int:
        return int(self._row_tokens.sum())

    def row_counts(self, row: int) -> np.ndarray:
        """Row ``row``'s spike counts as a zero-copy (n, t) uint8 view."""
        chunk, lo, n, t = self._rows[row]
        return self._values[chunk][lo : lo + n * t].reshape(n, t)

    def read(self, epoch: int, start: int, stop: int) -> np.ndarray:
        order, offsets = self._epoch_layout(epoch)
        pos = int(offsets.searchsorted(start, side="right")) - 1
        pieces = []
        while start < stop:
            row = order[pos]
            row_start, row_end = offsets[pos].item(), offsets[pos + 1].item()
            width = self._rows[row][2] + 1
            a, b = start - row_start, (stop if stop < row_end else row_end) - row_start
            t0, t1 = a // width, -(-b // width)
            tokens = tokenize_spikes(self.row_counts(row)[:, t0:t1], self.tokenizer)
            pieces.append(tokens[a - t0 * width : b - t0 * width])
            start = row_start + b
            pos += 1
        return np.concatenate(pieces)
