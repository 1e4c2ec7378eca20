"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), reproducible per sequence.

Every sequence draws from its own CPU generator, seeded from (seed, the sequence's index in the input),
and a draw is one uniform number turned into a token by the inverse CDF. So a sequence's samples
depend only on the seed, its index and its logits: not on the batch it shares, nor on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from torchtitan_hyena.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """``temperature`` 0 is greedy (argmax); ``top_k`` 0 and ``top_p`` 1 switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1] (1 keeps every token), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sequence_generators(seed: int, indices: list[int]) -> list[torch.Generator]:
    """One CPU generator per sequence, seeded from (seed, index) through numpy's SeedSequence mixing."""
    generators = []
    for index in indices:
        state = int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])
        generators.append(torch.Generator().manual_seed(state))
    return generators


def filtered_probs(logits: Tensor, sampling: Sampling) -> tuple[Tensor, Tensor]:
    """(probabilities sorted in descending order, their token ids), after temperature, top-k and top-p.

    Top-p keeps the smallest prefix of the sorted tokens whose mass reaches ``top_p`` (at least one);
    the kept probabilities are not renormalised, the draw scales to their sum.
    """
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    probs, order = probs.sort(dim=-1, descending=True)
    if sampling.top_k > 0:
        probs[:, sampling.top_k :] = 0
    if sampling.top_p < 1:
        mass_before = probs.cumsum(-1) - probs
        probs = torch.where(mass_before < sampling.top_p, probs, 0)
    return probs, order


def sample_next(logits: Tensor, sampling: Sampling, generators: list[torch.Generator]) -> Tensor:
    """(B,) next tokens for (B, V) logits; row b draws from ``generators[b]`` (unused when greedy)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs, order = filtered_probs(logits, sampling)
    cdf = probs.cumsum(-1)
    uniform = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    target = (uniform.to(cdf.device) * cdf[:, -1].double()).float()[:, None]
    index = torch.searchsorted(cdf, target, right=True)
    last_kept = (probs > 0).sum(-1, keepdim=True) - 1  # a target rounded up to the total stays on a kept token
    index = torch.minimum(index, last_kept)
    return order.gather(-1, index).squeeze(-1)
