"""Causal scaled-dot-product attention through torch's SDPA: the default backend, and every backend's fallback."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float | None], torch.Tensor]


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """Causal attention through ``F.scaled_dot_product_attention`` (flash/efficient/math kernels).

    With fewer queries than keys (a context-parallel query chunk against the keys before it) the
    causal mask is aligned bottom-right, as in flash-attn. ``dropout_p``: attention dropout (training).
    """
    gqa = q.size(1) != k.size(1)
    if q.size(2) == k.size(2):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p, enable_gqa=gqa)
    mask = causal_lower_right(q.size(2), k.size(2))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p, enable_gqa=gqa)
