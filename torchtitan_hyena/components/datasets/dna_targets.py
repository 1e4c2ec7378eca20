"""Evo 2 style inputs, labels and loss weights for byte-level (DNA) windows.

Savanna (``training.py``, ``reweighted_cross_entropy``) and bionemo (``Evo2Dataset``) shape a
window of byte tokens before the loss:

* ``to_upper``: inputs and labels are uppercased (a-z -> A-Z). ``weighted`` gives labels that were
  lowercase (soft-masked repeats) the weight ``lowercase_loss_reweighting`` (0.1 in Evo 2), and
  ``normalized_weighted`` (Evo 2) rescales the weights of each microbatch so that they sum to its
  number of counted labels; the loss scale then does not depend on how much of it was lowercase.
* ``mask_loss_control_tags``: no loss on ``@`` (splice splits), ``#`` (contig splits) and
  phylogenetic tag spans ``|d__...;p__...|``: text between ``|``/EOD boundaries that contains
  ``_``, ``;`` or a space is a tag, masked together with its delimiting pipes; EOD ends a span.
* ``eod_loss_mask``: ``after_eod`` drops the label that follows an EOD input (the first token of the
  next document, predicted across the boundary; Megatron/savanna ``eod_mask_loss``), ``eod`` drops
  EOD labels (bionemo ``--eod-pad-in-loss-mask``), ``both`` does both.

Dropped labels become ``IGNORE_INDEX``, so the trainer's global token count excludes them. Items
carry raw weights; :meth:`ByteTargets.collate` renormalizes per microbatch because a microbatch is
the unit savanna normalizes over, and it is the only place that sees all of one. The sampler's
microbatches are always the same ``local_batch_size`` consecutive windows, so losses stay
independent of the data-parallel degree for a fixed ``training.local_batch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from torchtitan_hyena.components.datasets.base import IGNORE_INDEX
from torchtitan_hyena.errors import ConfigError

TO_UPPER = ("none", "upper", "weighted", "normalized_weighted")
EOD_LOSS_MASK = ("none", "after_eod", "eod", "both")
PIPE = ord("|")
CONTROL_TAGS = (ord("@"), ord("#"))
TAG_CHARS = (ord("_"), ord(";"), ord(" "))
LOWER_A, LOWER_Z, CASE_SHIFT = ord("a"), ord("z"), 32


@dataclass(frozen=True)
class LossShaping:
    """The ``training.*`` options that shape byte-level targets (see the module docstring)."""

    to_upper: str = "normalized_weighted"
    lowercase_loss_reweighting: float = 0.1
    mask_loss_control_tags: bool = True
    eod_loss_mask: str = "none"

    @classmethod
    def from_config(cls, training: Any) -> LossShaping:
        """From the ``training`` section (validated by the config manager)."""
        return cls(
            training.to_upper,
            training.lowercase_loss_reweighting,
            training.mask_loss_control_tags,
            training.eod_loss_mask,
        )


def control_tag_mask(tokens: np.ndarray, eod_id: int) -> np.ndarray:
    """True where a token is *not* part of a control tag (``@``, ``#``, ``|...;..._...|`` spans)."""
    boundary = (tokens == PIPE) | (tokens == eod_id)
    segment = np.cumsum(boundary)  # a boundary opens the segment after it
    is_tag_char = np.isin(tokens, TAG_CHARS)
    tagged = np.bincount(segment[is_tag_char], minlength=int(segment[-1]) + 1) > 0
    in_tag = tagged[segment]
    # A pipe is masked when it opens a tag (its own segment) or closes one (the segment before it).
    closes = np.zeros_like(in_tag)
    closes[1:] = tagged[segment[1:] - 1]
    is_pipe = tokens == PIPE
    masked = np.where(is_pipe, in_tag | closes, in_tag & ~boundary) | np.isin(tokens, CONTROL_TAGS)
    return ~masked


def _upper(tokens: np.ndarray) -> np.ndarray:
    return np.where((tokens >= LOWER_A) & (tokens <= LOWER_Z), tokens - CASE_SHIFT, tokens)


class ByteTargets:
    """``WindowDataset`` hook: window (seq_len + 1 byte tokens) -> input, labels and loss weights."""

    def __init__(self, options: LossShaping, eod_id: int) -> None:
        if options.to_upper not in TO_UPPER or options.eod_loss_mask not in EOD_LOSS_MASK:
            raise ConfigError(f"unknown loss shaping {options}")
        self.options = options
        self.eod_id = eod_id
        self.weighted = options.to_upper in ("weighted", "normalized_weighted")

    def __call__(self, window: np.ndarray) -> dict[str, torch.Tensor]:
        o = self.options
        tokens = window.astype(np.int64)
        inputs, labels = tokens[:-1], tokens[1:]
        keep = np.ones(len(labels), dtype=bool)
        if o.mask_loss_control_tags:
            keep &= control_tag_mask(tokens, self.eod_id)[1:]
        if o.eod_loss_mask in ("after_eod", "both"):
            keep &= inputs != self.eod_id
        if o.eod_loss_mask in ("eod", "both"):
            keep &= labels != self.eod_id
        lowercase = (labels >= LOWER_A) & (labels <= LOWER_Z)
        if o.to_upper != "none":
            inputs, labels = _upper(inputs), _upper(labels)
        item = {
            "input": torch.from_numpy(np.ascontiguousarray(inputs)),
            "labels": torch.from_numpy(np.where(keep, labels, IGNORE_INDEX)),
        }
        if self.weighted:
            weights = np.where(lowercase, np.float32(o.lowercase_loss_reweighting), np.float32(1.0)) * keep
            item["loss_weights"] = torch.from_numpy(weights.astype(np.float32))
        return item

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack one microbatch; under ``normalized_weighted`` rescale its weights to sum to its label count."""
        batch = default_collate(items)
        if self.options.to_upper == "normalized_weighted":
            batch["loss_weights"] = renormalize(batch["loss_weights"], batch["labels"])
        return batch


def renormalize(weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``w * n / sum(w)`` with ``n`` the number of counted labels (savanna ``normalize_per_batch``)."""
    total = weights.double().sum()
    if total == 0:
        return weights
    count = (labels != IGNORE_INDEX).sum().double()
    return (weights.double() * (count / total)).float()
