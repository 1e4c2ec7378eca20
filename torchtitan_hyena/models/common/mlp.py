"""Gated MLP shared by Llama (SwiGLU) and StripedHyena 2 (GELU-GLU in layer 0, bilinear GLU after)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "identity": lambda x: x}


class GatedMLP(nn.Module):
    """``w2(act(w1 x) * w3 x)``: w1 = gate, w3 = up, w2 = down (Meta/TorchTitan names)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu", bias: bool = False) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown MLP activation {activation!r}")
        self.activation = activation
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(_ACTIVATIONS[self.activation](self.w1(x)) * self.w3(x))
