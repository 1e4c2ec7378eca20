"""Decode state for autoregressive generation, shared by both model families (docs/stripedhyena2.md §17).

A model called with a :class:`DecodeCache` runs in two phases:

* **prefill**: the first call takes the prompts, right-padded to one length, through the ordinary
  (stateless) forward; every stateful block records its state at each row's own prompt end;
* **step**: every later call takes one new token per row, and each block advances its state: the
  KV cache grows by one slot, FIR filters shift their last ``taps - 1`` inputs, recurrent filters
  update their modes. Only attention reads something that grows with the position.

Rows may hold prompts of different lengths: FIR and recurrent states are per row, and attention masks
each row's keys beyond its own position, so a row computes exactly what it would compute alone.
Right padding never reaches a real position in prefill because every block is causal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchtitan_hyena.models.common.attention import InnerAttention


class DecodeCache:
    """The decode state of a whole model for a batch of ``len(prompt_lengths)`` sequences.

    ``capacity`` bounds the positions a row may reach (longest prompt + new tokens): the KV caches are
    allocated once at that size.
    """

    def __init__(self, prompt_lengths: Tensor, capacity: int) -> None:
        if prompt_lengths.dim() != 1 or int(prompt_lengths.min()) < 1:
            raise ValueError(f"prompt lengths must be a 1-D tensor of positive lengths, got {prompt_lengths}")
        self.capacity = capacity
        self.prompt_lengths = prompt_lengths.long()
        self.lengths = torch.zeros_like(self.prompt_lengths)  # tokens already absorbed, per row
        self.new_lengths = self.prompt_lengths  # valid tokens of the call in progress, per row
        self.kv_end = 0  # KV slots a step reads: 1 + the furthest position of the batch
        self.prefilled = False
        self._layers: dict[str, LayerCache] = {}

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def prefilling(self) -> bool:
        return not self.prefilled

    def layer(self, name: str) -> LayerCache:
        """The state of layer ``name`` (created empty on first use)."""
        if name not in self._layers:
            self._layers[name] = LayerCache(self)
        return self._layers[name]

    def begin(self, tokens: Tensor) -> Tensor:
        """Start a forward call over ``tokens`` (B, L); returns their absolute positions (B, L)."""
        batch, length = tokens.shape[0], tokens.shape[1]
        if batch != self.batch_size:
            raise ValueError(f"the cache holds {self.batch_size} rows, the tokens {batch}")
        if self.prefilling:
            if length != int(self.prompt_lengths.max()):
                raise ValueError(f"prefill takes the prompts right-padded to {int(self.prompt_lengths.max())} tokens")
            self.new_lengths = self.prompt_lengths
        else:
            if length != 1:
                raise ValueError(f"after prefill the model takes one token per row, got {length}")
            self.new_lengths = torch.ones_like(self.lengths)
        end = int((self.lengths + self.new_lengths).max())
        if end > self.capacity:
            raise ValueError(f"position {end - 1} is beyond the cache capacity {self.capacity}")
        self.kv_end = end
        return self.lengths[:, None] + torch.arange(length, device=tokens.device)

    def last(self, h: Tensor) -> Tensor:
        """(B, 1, D): each row's hidden state at its last valid token of this call."""
        index = (self.new_lengths - 1).to(h.device)[:, None, None].expand(-1, 1, h.shape[-1])
        return h.gather(1, index)

    def end(self) -> None:
        """Finish a forward call: the rows have absorbed its tokens."""
        self.lengths = self.lengths + self.new_lengths
        self.prefilled = True


class LayerCache:
    """One block's decode state; each stateful module keeps its own entry of ``state``."""

    def __init__(self, parent: DecodeCache) -> None:
        self.parent = parent
        self.state: dict[str, Any] = {}

    @property
    def prefilling(self) -> bool:
        return self.parent.prefilling

    @property
    def lengths(self) -> Tensor:
        """Tokens each row held before this call (its position of the first new token)."""
        return self.parent.lengths

    @property
    def new_lengths(self) -> Tensor:
        return self.parent.new_lengths


# ---------------------------------------------------------------------------------------------- models
def forward_positions(tokens: Tensor, positions: Tensor | None, cache: DecodeCache | None) -> Tensor:
    """The positions a model's forward uses: the cache's under generation (starting the call), else ``positions``,
    else 0..L-1."""
    if cache is not None:
        return cache.begin(tokens)
    return torch.arange(tokens.shape[1], device=tokens.device) if positions is None else positions


def run_blocks(layers: nn.ModuleDict, h: Tensor, cos: Tensor, sin: Tensor, cache: DecodeCache | None) -> Tensor:
    """The blocks in order. Under a decode cache each block gets its layer's state and only each row's last valid
    token comes out, (B, 1, D), ending the call."""
    if cache is None:
        for layer in layers.values():
            h = layer(h, cos, sin)
        return h
    for name, layer in layers.items():
        h = layer(h, cos, sin, cache=cache.layer(name))
    h = cache.last(h)
    cache.end()
    return h


# ---------------------------------------------------------------------------------------------- attention
def cached_attention(cache: LayerCache, q: Tensor, k: Tensor, v: Tensor, inner: InnerAttention) -> Tensor:
    """Causal attention that keeps K/V in ``cache``. q (B, H, L, d); k, v (B, H_kv, L, d), RoPE applied.

    Prefill runs ``inner`` (the training kernel) and stores all L slots; a row's padding slots are
    overwritten by its own steps before it can see them. A step writes each row's new K/V at its own
    position and attends over the slots up to it (SDPA with a per-row mask; GQA by ``enable_gqa``).
    """
    parent = cache.parent
    if cache.prefilling:
        shape = (k.shape[0], k.shape[1], parent.capacity, k.shape[3])
        keys, values = k.new_zeros(shape), v.new_zeros(shape)
        keys[:, :, : k.shape[2]], values[:, :, : v.shape[2]] = k, v
        cache.state["kv"] = (keys, values)
        return inner(q, k, v)
    keys, values = cache.state["kv"]
    rows = torch.arange(k.shape[0], device=k.device)
    position = cache.lengths.to(k.device)
    keys[rows, :, position], values[rows, :, position] = k[:, :, 0], v[:, :, 0]
    end = parent.kv_end
    mask = torch.arange(end, device=k.device)[None, :] <= position[:, None]
    return F.scaled_dot_product_attention(
        q, keys[:, :, :end], values[:, :, :end], attn_mask=mask[:, None, None, :], scale=inner.scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- FIR filters
def fir_tail(x: Tensor, lengths: Tensor, taps: int) -> Tensor:
    """(B, taps - 1, C): the inputs at positions ``lengths[b] - taps + 1 .. lengths[b] - 1`` of each row of
    ``x`` (B, L, C), zeros before position 0, which is the zero padding a causal convolution sees. So a
    prompt shorter than the filter leaves exactly the state the stateless forward implies."""
    keep = taps - 1
    index = lengths.to(x.device)[:, None] + torch.arange(keep, device=x.device)  # into x padded by `keep`
    padded = F.pad(x, (0, 0, keep, 0))
    return padded.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


def fir_step(state: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """One token through a depthwise causal FIR. ``state`` (B, K-1, C) from :func:`fir_tail`, ``x``
    (B, 1, C), ``weight`` (C, K) in conv1d order (``weight[:, -1]`` multiplies x). Returns (the fp32
    output (B, 1, C), the next state)."""
    window = torch.cat([state, x.to(state.dtype)], dim=1)
    y = torch.einsum("bkc,ck->bc", window.float(), weight.float())[:, None]
    return y, window[:, 1:]


def cached_fir(
    cache: LayerCache, key: str, x: Tensor, weight: Callable[[], Tensor], full: Callable[[Tensor], Tensor]
) -> Tensor:
    """Causal FIR of ``x`` (B, L, C) that keeps its state under ``key``; ``weight()`` is (C, K), conv1d order.

    Prefill returns ``full(x)`` (the stateless convolution by the model's own kernel) and records the tail
    and the weight; a step returns :func:`fir_step`'s output in ``x``'s dtype.
    """
    if cache.prefilling:
        w = weight()
        cache.state[key] = (fir_tail(x, cache.new_lengths, w.shape[1]), w)
        return full(x)
    state, w = cache.state[key]
    y, state = fir_step(state, x, w)
    cache.state[key] = (state, w)
    return y.to(x.dtype)
