"""RMSNorm in the vortex/savanna form, with eps added to the RMS (outside the square root)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * x / (rms(x) + eps)``, computed in fp32.

    ``nn.RMSNorm`` puts eps inside the square root; StripedHyena 2 (vortex ``RMSNorm``, savanna's torch
    norm) adds it to the RMS. The difference is tiny at eps = 1e-6 but matters for parity with Evo 2.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        rms = xf.pow(2).mean(-1, keepdim=True).sqrt()
        return (self.weight.float() * (xf / (rms + self.eps))).type_as(x)
