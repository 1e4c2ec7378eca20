"""Causal depthwise convolutions used by StripedHyena 2, behind one dispatch point.

Layout is time-major, channels last: (B, L, C), as the projections produce it. Three operations:

* ``causal_conv(x, weight)``: ungated depthwise causal FIR (the featurizer). ``weight`` is (C, K) in
  ``F.conv1d`` order: ``weight[:, K-1]`` multiplies the current token.
* ``gated_causal_conv(q, k, v, h, skip, flip)``: ``y = q * (h * (k*v) + skip * (k*v))`` with a grouped
  filter ``h`` (G, K); channel c uses ``h[c // (D // G)]`` (blocks of consecutive channels share a
  filter). ``flip=False``: ``h`` is in conv1d order (Hyena-SE); ``flip=True``: ``h`` is an impulse
  response, ``h[:, 0]`` = lag 0 (Hyena-MR). ``skip`` is the (D,) D term or None.
* ``gated_modal_conv(q, k, v, log_poles, residues, skip)``: the same gated form with Hyena-LI's modal filter
  ``h[d, t] = sum_n residues[d, n] exp(log_poles[d, n] t)`` as long as the sequence, by FFT (``ops.fftconv``).

Every implementation accumulates in fp32 and returns the input dtype. ``impl``: ``"torch"`` is the
reference (``F.conv1d``), ``"triton"`` the portable kernels (registered by ``ops.triton_conv``),
``"auto"`` picks Triton on GPUs and torch elsewhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.ops.fftconv import gated_modal_fft_conv
from torchtitan_hyena.tools.logging import logger


def causal_conv_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Ungated depthwise causal conv through ``F.conv1d`` in fp32."""
    channels, taps = weight.shape
    xt = F.pad(x.float().transpose(1, 2), (taps - 1, 0))
    y = F.conv1d(xt, weight.float().unsqueeze(1), groups=channels)
    return y.transpose(1, 2).to(x.dtype)


def expand_groups(h: torch.Tensor, channels: int) -> torch.Tensor:
    """(G, K) grouped filter -> (channels, K): blocks of channels // G consecutive channels share a row."""
    groups = h.shape[0]
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} filter groups")
    return h.repeat_interleave(channels // groups, dim=0)


def gated_causal_conv_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, skip: torch.Tensor | None, flip: bool
) -> torch.Tensor:
    """``q * (h * (k*v) + skip * (k*v))`` through ``F.conv1d`` in fp32."""
    weight = expand_groups(h.float(), q.shape[-1])
    if flip:
        weight = weight.flip(-1)
    s = k.float() * v.float()
    y = causal_conv_reference(s, weight)
    if skip is not None:
        y = y + skip.float() * s
    return (q.float() * y).to(q.dtype)


_IMPLS: dict[str, dict[str, Callable[..., torch.Tensor]]] = {
    "torch": {
        "causal_conv": causal_conv_reference,
        "gated_causal_conv": gated_causal_conv_reference,
        "gated_modal_conv": gated_modal_fft_conv,
    }
}
_PROVIDERS = {"triton": "torchtitan_hyena.ops.triton_conv"}
_warned: set[str] = set()


def register_conv_impl(
    name: str,
    causal_conv: Callable[..., torch.Tensor],
    gated_causal_conv: Callable[..., torch.Tensor],
    gated_modal_conv: Callable[..., torch.Tensor],
) -> None:
    """Plug in kernels implementing the three operations with the reference signatures."""
    _IMPLS[name] = {
        "causal_conv": causal_conv,
        "gated_causal_conv": gated_causal_conv,
        "gated_modal_conv": gated_modal_conv,
    }


def _load(name: str) -> bool:
    if name in _IMPLS:
        return True
    if name not in _PROVIDERS:
        return False
    try:
        importlib.import_module(_PROVIDERS[name])
    except ImportError as e:
        if name not in _warned:
            logger.warning(f"{name} convolution kernels unavailable: {e}")
            _warned.add(name)
        return False
    return name in _IMPLS


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation ``impl`` means on ``device`` (``auto``: Triton on GPUs when it loads)."""
    if impl == "auto":
        return "triton" if device.type == "cuda" and _load("triton") else "torch"
    if not _load(impl):
        raise ConfigError(f"model.conv_impl {impl!r} is not available here; use 'torch' or 'auto'")
    return impl


def causal_conv(x: torch.Tensor, weight: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    return _IMPLS[resolve_impl(impl, x.device)]["causal_conv"](x, weight)


def gated_causal_conv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    skip: torch.Tensor | None,
    flip: bool,
    impl: str = "auto",
) -> torch.Tensor:
    return _IMPLS[resolve_impl(impl, q.device)]["gated_causal_conv"](q, k, v, h, skip, flip)


def gated_modal_conv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_poles: torch.Tensor,
    residues: torch.Tensor,
    skip: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    return _IMPLS[resolve_impl(impl, q.device)]["gated_modal_conv"](q, k, v, log_poles, residues, skip)
