"""Tokenizers; each dataset chooses its own (``components/dataloader.py``): the data decide what a token id means.

Neural Pile spikes need no tokenizer beyond a vocabulary (a token is a spike count); DNA and text
are bytes (Evo 2's CharLevelTokenizer); random mock data take the model's vocabulary; preprocessed
memmap data name their tokenizer in their metadata; other datasets register their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np


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

    @property
    def max_token_id(self) -> int:
        return self.separator


@dataclass(frozen=True)
class ByteTokenizer:
    """Evo 2's ``CharLevelTokenizer(512)``: a token is a UTF-8 byte (A=65, a=97); EOD 0, PAD 1.

    The vocabulary is 512 as in the Evo 2 checkpoints; ids 256-511 are never produced.
    """

    vocab_size: int = 512
    eod_id: ClassVar[int] = 0
    pad_id: ClassVar[int] = 1
    max_token_id: ClassVar[int] = 255

    def encode(self, text: str | bytes) -> np.ndarray:
        """Token ids (uint8) of ``text``; a ``str`` is UTF-8 encoded first."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8)
