"""Tokenizers, chosen by the dataset: the data decide what a token id means.

Neural Pile spikes need no tokenizer beyond a vocabulary (a token is a spike count); random mock
data take the model's vocabulary; other datasets register their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SpikeTokenizer:
    """Neural Pile tokens: spike counts 0..vocab-2, and ``vocab_size - 1`` separates time bins (gpt-neuro)."""

    vocab_size: int = 256

    @property
    def separator(self) -> int:
        return self.vocab_size - 1

    @property
    def max_count(self) -> int:
        """Counts are clipped here so that no count collides with the separator."""
        return self.vocab_size - 2


_TOKENIZERS: dict[str, Callable[[Any], Any]] = {
    "neural_pile": lambda job_config: SpikeTokenizer(256),
    "mock": lambda job_config: None,
}


def register_tokenizer(dataset: str, builder: Callable[[Any], Any]) -> None:
    """``builder(job_config)`` returns the tokenizer of ``dataset`` (an object with ``vocab_size``) or None."""
    _TOKENIZERS[dataset] = builder


def build_tokenizer(job_config: Any) -> Any:
    """The tokenizer of ``training.dataset``; None when the data need none (mock)."""
    builder = _TOKENIZERS.get(job_config.training.dataset)
    return None if builder is None else builder(job_config)
