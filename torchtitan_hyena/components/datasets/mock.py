"""Random tokens for throughput runs: blocks of tokens seeded by (seed, block index)."""

from __future__ import annotations

import numpy as np

_BLOCK = 1 << 16


class MockSource:
    """An effectively endless uniform token stream, reproducible from the seed alone."""

    def __init__(self, vocab_size: int, seed: int) -> None:
        self.name = "mock"
        self.vocab_size = vocab_size
        self.seed = seed

    def num_tokens(self, epoch: int) -> int:
        return 1 << 40

    def read(self, epoch: int, start: int, stop: int) -> np.ndarray:
        first, last = start // _BLOCK, (stop - 1) // _BLOCK
        blocks = [
            np.random.default_rng((self.seed, epoch, b)).integers(0, self.vocab_size, _BLOCK, dtype=np.int32)
            for b in range(first, last + 1)
        ]
        flat = np.concatenate(blocks)
        return flat[start - first * _BLOCK : stop - first * _BLOCK]
