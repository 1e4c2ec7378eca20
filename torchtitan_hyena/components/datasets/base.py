"""Token sources and the fixed-length window dataset built on them.

A *token source* is one epoch's token stream, addressable by offset: ``read(epoch, start, stop)``.
Windows of ``seq_len + 1`` tokens tile each epoch without overlap (the tail shorter than a window
is dropped), and window ``w`` lives in epoch ``w // windows_per_epoch``. Because a window is a pure
function of its index, data order is independent of the parallel layout and resuming needs only
the number of windows consumed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from torchtitan_hyena.errors import UserError

IGNORE_INDEX = -100


class TokenSource(Protocol):
    name: str

    def num_tokens(self, epoch: int) -> int:
        """Tokens in one epoch's stream."""
        ...

    def read(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of epoch ``epoch``'s stream."""
        ...


class WindowDataset(Dataset):
    """Map-style dataset of non-overlapping ``seq_len + 1`` windows: item w -> input/labels.

    ``targets`` (optional) turns a window into the item dict instead, for data whose labels or loss
    weights depend on the tokens (e.g. Evo 2's lowercase weighting and control-tag masking).
    """

    def __init__(
        self,
        source: TokenSource,
        seq_len: int,
        vocab_size: int,
        infinite: bool = True,
        targets: Callable[[np.ndarray], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.source = source
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.infinite = infinite
        self.targets = targets
        self.windows_per_epoch = source.num_tokens(0) // (seq_len + 1)
        if self.windows_per_epoch == 0:
            raise UserError(
                f"dataset {source.name} holds {source.num_tokens(0)} tokens, fewer than one window of "
                f"training.seq_len + 1 = {seq_len + 1}; lower training.seq_len or use more data"
            )

    def __len__(self) -> int:
        return self.windows_per_epoch

    def window(self, index: int) -> np.ndarray:
        epoch, local = divmod(index, self.windows_per_epoch)
        if epoch > 0 and not self.infinite:
            raise IndexError(index)
        start = local * (self.seq_len + 1)
        tokens = self.source.read(epoch, start, start + self.seq_len + 1)
        top = int(tokens.max())
        if top >= self.vocab_size:
            raise UserError(
                f"token id {top} in {self.source.name} is >= model.vocab_size {self.vocab_size}; "
                "raise model.vocab_size or fix the data"
            )
        return tokens

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.targets is not None:
            return self.targets(self.window(index))
        tokens = torch.from_numpy(self.window(index).astype(np.int64))
        return {"input": tokens[:-1], "labels": tokens[1:]}
