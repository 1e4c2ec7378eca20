"""The ``flash`` attention backend: flash-attn's ``flash_attn_func``, with SDPA as the fallback.

On Frontier this is the ROCm fork (github.com/ROCm/flash-attention, built with ``GPU_ARCHS=gfx90a``),
running its Composable Kernel kernels, or its Triton kernels when ``FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE``;
on NVIDIA GPUs it is upstream flash-attn. ``flash_attn_func`` takes (B, L, H, D) and groups the query
heads over fewer K/V heads itself (GQA), so InnerAttention's (B, H, L, D) tensors are passed as transposed
views, without copies or repeated K/V heads.

Calls flash-attn cannot serve (tensors off the GPU, fp32, head_dim above 256) run through SDPA, with
one warning per cause. A rank's query chunk against the gathered keys before it
(context parallelism) is fine: with fewer queries than keys the causal mask is aligned bottom-right, as
in flash-attn, and ``sdpa_attention`` does the same.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from torchtitan_hyena.models.common.sdpa import AttentionFn, sdpa_attention
from torchtitan_hyena.tools.logging import logger

MAX_HEAD_DIM = 256  # flash-attn 2 (CK, Triton and CUDA kernels)
GPU_DEVICE_TYPES = ("cuda",)  # ROCm tensors report "cuda" too
_warned: set[str] = set()


def warn_once(cause: str, message: str) -> None:
    if cause not in _warned:
        _warned.add(cause)
        logger.warning(message)


def import_flash_attn_func() -> Callable[..., torch.Tensor] | None:
    """``flash_attn.flash_attn_func``, or None when flash-attn is absent or its extension does not load."""
    try:
        from flash_attn import flash_attn_func
    except (ImportError, OSError):
        return None
    return flash_attn_func


def flash_available() -> bool:
    """What ``attention_backend = auto`` asks: a GPU and an importable flash-attn."""
    return torch.cuda.is_available() and import_flash_attn_func() is not None


def describe() -> str:
    """Version and kernel family, for the one log line naming the backend in use."""
    import flash_attn

    kernels = ""
    if torch.version.hip:
        triton = os.environ.get("FLASH_ATTENTION_TRITON_AMD_ENABLE", "").upper() == "TRUE"
        kernels = ", ROCm Triton kernels" if triton else ", ROCm CK kernels"
    return f"flash-attn {getattr(flash_attn, '__version__', '?')}{kernels}"


def unsupported(q: torch.Tensor) -> tuple[str, str] | None:
    """(cause, description) when flash-attn cannot run this call, else None."""
    if q.device.type not in GPU_DEVICE_TYPES:
        return "device", f"on {q.device.type} tensors"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return "dtype", f"in {q.dtype} (it needs float16 or bfloat16)"
    if q.size(-1) > MAX_HEAD_DIM:
        return "head_dim", f"head_dim {q.size(-1)} (at most {MAX_HEAD_DIM})"
    return None


def make_flash_attention(flash_attn_func: Callable[..., torch.Tensor]) -> AttentionFn:
    def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        problem = unsupported(q)
        if problem is not None:
            warn_once(problem[0], f"flash-attn cannot run {problem[1]}; using SDPA for such calls")
            return sdpa_attention(q, k, v, scale)
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=True)
        return out.transpose(1, 2)

    return flash_attention


def resolve_flash() -> AttentionFn:
    """The flash backend, or SDPA (with one warning) when flash-attn cannot be imported."""
    flash_attn_func = import_flash_attn_func()
    if flash_attn_func is None:
        warn_once(
            "import",
            "model.attention_backend = flash but flash_attn cannot be imported (on ROCm build "
            "github.com/ROCm/flash-attention with GPU_ARCHS=gfx90a, see README); using SDPA",
        )
        return sdpa_attention
    return make_flash_attention(flash_attn_func)
