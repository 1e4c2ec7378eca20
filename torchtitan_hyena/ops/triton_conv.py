"""Portable Triton causal convolutions (ROCm, CUDA, CPU interpreter) behind ``ops.conv``'s dispatch.

Importing this module registers the ``"triton"`` implementation. The kernels are wrapped as
``torch.library`` custom ops with fake implementations and registered autograd, so models compile without graph
breaks (``triton_op`` fails under the interpreter, ``docs/kernels.md`` §4), plus DTensor sharding rules.

Dispatch: short filters (<= 16 taps: the featurizer's ungated conv, Hyena-SE) use the direct kernels of
``triton_direct``; longer gated filters (Hyena-MR) the two-pass Toeplitz kernels of ``triton_toeplitz``; Hyena-LI's
modal filter the FFT pipeline of ``triton_fftconv``. Where no kernel fits (longer ungated filters, gated ones over 129
taps, fp32 MR on AMD's 64 KB LDS) the torch reference runs instead, with a warning.
"""

from __future__ import annotations

import torch

from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.ops.conv import causal_conv_reference, gated_causal_conv_reference, register_conv_impl
from torchtitan_hyena.ops.fftconv import check_inputs
from torchtitan_hyena.ops.triton_backend import MAX_CHUNK
from torchtitan_hyena.ops.triton_direct import INTERPRETED, direct_backward, direct_forward
from torchtitan_hyena.ops.triton_fftconv import modal_backward, modal_forward
from torchtitan_hyena.ops.triton_toeplitz import toeplitz_backward, toeplitz_forward, toeplitz_supported
from torchtitan_hyena.tools.logging import logger

MAX_DIRECT_TAPS = 16
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_warned: set[str] = set()


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not INTERPRETED:
        raise ConfigError(
            f"model.conv_impl='triton' needs a GPU, but the inputs are on {t.device.type}; on CPU run the Triton "
            "interpreter with TRITON_INTERPRET=1 set before start-up (slow; for tests), or use conv_impl='auto'/'torch'"
        )


def _check_activation(name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
    if t.dim() != 3:
        raise ValueError(f"{name} must be (batch, length, channels); got shape {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise ValueError(f"{name} must be bfloat16, float16, float32 or float64; got {t.dtype}")
    if like is not None and (t.shape != like.shape or t.dtype != like.dtype or t.device != like.device):
        raise ValueError(f"q, k and v must match; {name} is {tuple(t.shape)} {t.dtype} on {t.device}")


def causal_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Ungated depthwise causal conv of ``x`` (B, L, C) with ``weight`` (C, K) in ``F.conv1d`` order."""
    _check_activation("x", x)
    if weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be (channels, taps) = ({x.shape[-1]}, K); got {tuple(weight.shape)}")
    _check_device(x)
    if weight.shape[1] > MAX_DIRECT_TAPS:
        _warn_fallback(f"{weight.shape[1]}-tap ungated filters exceed the direct kernel's {MAX_DIRECT_TAPS} taps")
        return causal_conv_reference(x, weight)
    return torch.ops.torchtitan_hyena.triton_causal_conv(x, weight)


def _warn_fallback(reason: str) -> None:
    if reason not in _warned and not torch.compiler.is_compiling():
        logger.warning(f"triton conv: {reason}; using the torch reference")
        _warned.add(reason)


@torch.compiler.assume_constant_result
def fallback_reason(dtype: torch.dtype, taps: int) -> str | None:
    """Why no kernel serves this filter (None: one does). Evaluated, not traced, by torch.compile: it asks the
    Triton driver for the device."""
    if taps <= MAX_DIRECT_TAPS or toeplitz_supported(dtype, taps):
        return None
    if taps > MAX_CHUNK + 1:
        return f"{taps}-tap filters exceed the two-pass Toeplitz kernel's {MAX_CHUNK + 1} taps"
    return f"no Toeplitz kernel configuration fits this device for {dtype} inputs"


def gated_causal_conv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, skip: torch.Tensor | None, flip: bool
) -> torch.Tensor:
    """``q * (h * (k*v) + skip * (k*v))`` with grouped filter ``h`` (G, K); see ``ops.conv`` for orientation."""
    _check_activation("q", q)
    _check_activation("k", k, q)
    _check_activation("v", v, q)
    channels = q.shape[-1]
    if h.dim() != 2 or channels % h.shape[0]:
        raise ValueError(f"h must be (groups, taps) with groups dividing {channels}; got {tuple(h.shape)}")
    if skip is not None and skip.shape != (channels,):
        raise ValueError(f"skip must be ({channels},); got {tuple(skip.shape)}")
    _check_device(q)
    reason = fallback_reason(q.dtype, h.shape[1])
    if reason is not None:
        _warn_fallback(reason)
        return gated_causal_conv_reference(q, k, v, h, skip, flip)
    return torch.ops.torchtitan_hyena.triton_gated_conv(q, k, v, h, skip, flip)


def gated_modal_conv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor, residues: torch.Tensor,
    skip: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Hyena-LI: ``q * (h * (k*v) + skip * (k*v))`` with the modal filter of (D, N) ``log_poles`` and ``residues``."""
    _check_activation("q", q)
    _check_activation("k", k, q)
    _check_activation("v", v, q)
    check_inputs(q, k, v, skip, log_poles, residues)
    _check_device(q)
    return torch.ops.torchtitan_hyena.triton_modal_conv(q, k, v, log_poles, residues, skip)


# --- custom ops -------------------------------------------------------------------------------------------------


@torch.library.custom_op("torchtitan_hyena::triton_causal_conv", mutates_args=())
def _causal_conv_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return direct_forward(None, None, x, weight, None, lag_order=False)


@_causal_conv_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("torchtitan_hyena::triton_causal_conv_backward", mutates_args=())
def _causal_conv_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, dx, dw, _ = direct_backward(dy, None, None, x, weight, None, lag_order=False)
    return dx, dw


@_causal_conv_backward_op.register_fake
def _(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _causal_conv_setup(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _causal_conv_grad(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, weight = ctx.saved_tensors
    return torch.ops.torchtitan_hyena.triton_causal_conv_backward(dy, x, weight)


_causal_conv_op.register_autograd(_causal_conv_grad, setup_context=_causal_conv_setup)


@torch.library.custom_op("torchtitan_hyena::triton_gated_conv", mutates_args=())
def _gated_conv_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, skip: torch.Tensor | None, flip: bool
) -> torch.Tensor:
    if h.shape[1] <= MAX_DIRECT_TAPS:
        return direct_forward(q, k, v, h, skip, lag_order=flip)
    return toeplitz_forward(q, k, v, h, skip, lag_order=flip)


@_gated_conv_op.register_fake
def _(q, k, v, h, skip, flip) -> torch.Tensor:
    return q.new_empty(q.shape)


@torch.library.custom_op("torchtitan_hyena::triton_gated_conv_backward", mutates_args=())
def _gated_conv_backward_op(
    dy: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    skip: torch.Tensor | None,
    flip: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dh, dskip); dskip is empty when ``skip`` is None (ops cannot return None)."""
    backward = direct_backward if h.shape[1] <= MAX_DIRECT_TAPS else toeplitz_backward
    dq, dk, dv, dh, dskip = backward(dy, q, k, v, h, skip, lag_order=flip)
    return dq, dk, dv, dh, (dskip if dskip is not None else h.new_empty(0))


@_gated_conv_backward_op.register_fake
def _(dy, q, k, v, h, skip, flip) -> tuple[torch.Tensor, ...]:
    dskip = skip.new_empty(skip.shape) if skip is not None else h.new_empty(0)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), h.new_empty(h.shape), dskip


def _gated_conv_setup(ctx, inputs: tuple, output: torch.Tensor) -> None:
    q, k, v, h, skip, flip = inputs
    ctx.save_for_backward(q, k, v, h, skip)
    ctx.flip = flip


def _gated_conv_grad(ctx, dy: torch.Tensor) -> tuple:
    q, k, v, h, skip = ctx.saved_tensors
    dq, dk, dv, dh, dskip = torch.ops.torchtitan_hyena.triton_gated_conv_backward(dy, q, k, v, h, skip, ctx.flip)
    return dq, dk, dv, dh, (dskip if skip is not None else None), None


_gated_conv_op.register_autograd(_gated_conv_grad, setup_context=_gated_conv_setup)


@torch.library.custom_op("torchtitan_hyena::triton_modal_conv", mutates_args=())
def _modal_conv_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor, residues: torch.Tensor,
    skip: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    return modal_forward(q, k, v, log_poles, residues, skip)


@_modal_conv_op.register_fake
def _(q, k, v, log_poles, residues, skip) -> torch.Tensor:
    return q.new_empty(q.shape)


@torch.library.custom_op("torchtitan_hyena::triton_modal_conv_backward", mutates_args=())
def _modal_conv_backward_op(
    dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
    residues: torch.Tensor, skip: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dq, dk, dv, d log_poles, d residues, dskip)."""
    return modal_backward(dy, q, k, v, log_poles, residues, skip)


@_modal_conv_backward_op.register_fake
def _(dy, q, k, v, log_poles, residues, skip) -> tuple[torch.Tensor, ...]:
    return tuple(t.new_empty(t.shape) for t in (q, k, v, log_poles, residues, skip))


def _modal_conv_setup(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _modal_conv_grad(ctx, dy: torch.Tensor) -> tuple:
    return torch.ops.torchtitan_hyena.triton_modal_conv_backward(dy, *ctx.saved_tensors)


_modal_conv_op.register_autograd(_modal_conv_grad, setup_context=_modal_conv_setup)


# --- DTensor sharding rules -------------------------------------------------------------------------------------


def _register_sharding() -> None:
    """Batch sharding (filter replicated, filter gradients partial sums) and channel sharding (filters sharded
    with their channels: tensor parallelism, groups must not straddle ranks), besides full replication."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    ops = torch.ops.torchtitan_hyena
    R, B, C, F = Replicate(), Shard(0), Shard(2), Shard(0)  # F: filter rows follow the channel shards

    @register_sharding(ops.triton_causal_conv.default)
    def _(x, weight):
        return [([R], [R, R]), ([B], [B, R]), ([C], [C, F])]

    @register_sharding(ops.triton_causal_conv_backward.default)
    def _(dy, x, weight):
        return [([R, R], [R, R, R]), ([B, Partial()], [B, B, R]), ([C, F], [C, C, F])]

    @register_sharding(ops.triton_gated_conv.default)
    def _(q, k, v, h, skip, flip):
        s = skip is not None
        return [
            ([R], [R, R, R, R, R if s else None, None]),
            ([B], [B, B, B, R, R if s else None, None]),
            ([C], [C, C, C, F, F if s else None, None]),
        ]

    @register_sharding(ops.triton_gated_conv_backward.default)
    def _(dy, q, k, v, h, skip, flip):
        s = skip is not None
        return [
            ([R] * 5, [R, R, R, R, R, R if s else None, None]),
            ([B, B, B, Partial(), Partial() if s else R], [B, B, B, B, R, R if s else None, None]),
            ([C, C, C, F, F if s else R], [C, C, C, C, F, F if s else None, None]),
        ]

    @register_sharding(ops.triton_modal_conv.default)
    def _(q, k, v, log_poles, residues, skip):
        return [([R], [R] * 6), ([B], [B, B, B, R, R, R]), ([C], [C, C, C, F, F, F])]

    @register_sharding(ops.triton_modal_conv_backward.default)
    def _(dy, q, k, v, log_poles, residues, skip):
        P = Partial()
        return [
            ([R] * 6, [R] * 7),
            ([B, B, B, P, P, P], [B, B, B, B, R, R, R]),
            ([C, C, C, F, F, F], [C] * 4 + [F] * 3),
        ]


if torch.distributed.is_available():
    _register_sharding()

register_conv_impl(
    "triton", causal_conv=causal_conv, gated_causal_conv=gated_causal_conv, gated_modal_conv=gated_modal_conv
)
