"""Attention kernels behind one module, so backends (and context parallelism) plug in at one point.

Inputs are (B, H, L, d) with K/V carrying their own (possibly fewer, GQA) heads: the backend does
the grouping, so context parallelism can exchange KV heads rather than repeated heads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.models.common.flash_attention import describe, flash_available, resolve_flash
from torchtitan_hyena.models.common.sdpa import AttentionFn, sdpa_attention
from torchtitan_hyena.tools.logging import logger

_BACKENDS: dict[str, Callable[[], AttentionFn]] = {"sdpa": lambda: sdpa_attention, "flash": resolve_flash}
_logged: set[tuple[str, str]] = set()


def register_attention_backend(name: str, resolver: Callable[[], AttentionFn]) -> None:
    """Add a backend; ``resolver`` returns the kernel or raises ConfigError when unavailable."""
    _BACKENDS[name] = resolver


def resolve_attention_backend(name: str) -> AttentionFn:
    """The kernel for ``model.attention_backend``; ``auto`` is flash on a GPU with flash-attn, else SDPA."""
    requested = name
    if name == "auto":
        name = "flash" if flash_available() else "sdpa"
    if name not in _BACKENDS:
        raise ConfigError(f"model.attention_backend {name!r} is not available here; available: {', '.join(_BACKENDS)}")
    fn = _BACKENDS[name]()
    used = "sdpa" if fn is sdpa_attention else name
    if (requested, used) not in _logged:
        _logged.add((requested, used))
        detail = ""
        if used == "flash":
            detail = f" ({describe()})"
        logger.info(f"attention backend: {used}{detail} (model.attention_backend = {requested})")
    return fn


class InnerAttention(nn.Module):
    """Parameter-free causal attention; context parallelism wraps or replaces this module.

    ``dropout`` (attention-probability dropout, training only) runs on SDPA (``auto`` picks it then).
    """

    def __init__(self, backend: str = "sdpa", scale: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.backend = backend
        self.scale = scale
        self.dropout = dropout
        self.attention_fn = resolve_attention_backend("sdpa" if dropout > 0 and backend == "auto" else backend)
        if dropout > 0 and self.attention_fn is not sdpa_attention:
            raise ConfigError(f"attention dropout needs model.attention_backend sdpa or auto, not {backend!r}")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.dropout > 0 and self.training:
            return sdpa_attention(q, k, v, self.scale, dropout_p=self.dropout)
        return self.attention_fn(q, k, v, self.scale)
