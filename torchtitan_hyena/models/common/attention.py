"""Attention kernels behind one module, so backends (and context parallelism) plug in at one point.

Inputs are (B, H, L, d) with K/V carrying their own (possibly fewer, GQA) heads: the backend does
the grouping, so context parallelism can exchange KV heads rather than repeated heads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan_hyena.errors import ConfigError

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float | None], torch.Tensor]


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """Causal attention through ``F.scaled_dot_product_attention`` (flash/efficient/math kernels)."""
    gqa = q.size(1) != k.size(1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p, enable_gqa=gqa)


_BACKENDS: dict[str, Callable[[], AttentionFn]] = {"sdpa": lambda: sdpa_attention}


def register_attention_backend(name: str, resolver: Callable[[], AttentionFn]) -> None:
    """Add a backend; ``resolver`` returns the kernel or raises ConfigError when unavailable."""
    _BACKENDS[name] = resolver


def resolve_attention_backend(name: str) -> AttentionFn:
    if name == "auto":
        name = "sdpa"
    if name not in _BACKENDS:
        raise ConfigError(f"model.attention_backend {name!r} is not available here; available: {', '.join(_BACKENDS)}")
    return _BACKENDS[name]()


class InnerAttention(nn.Module):
    """Parameter-free causal attention; context parallelism wraps or replaces this module.

    ``dropout`` (attention-probability dropout, training only) needs the SDPA backend.
    """

    def __init__(self, backend: str = "sdpa", scale: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.backend = backend
        self.scale = scale
        self.dropout = dropout
        self.attention_fn = resolve_attention_backend(backend)
        if dropout > 0 and self.attention_fn is not sdpa_attention:
            raise ConfigError(f"attention dropout needs model.attention_backend sdpa, not {backend!r}")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.dropout > 0 and self.training:
            return sdpa_attention(q, k, v, self.scale, dropout_p=self.dropout)
        return self.attention_fn(q, k, v, self.scale)
