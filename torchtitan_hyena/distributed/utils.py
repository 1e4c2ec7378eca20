"""Process-group set-up, device selection, determinism and distributed math helpers."""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torchtitan_hyena.tools.logging import logger


def device_type() -> str:
    """'cuda' on CUDA and ROCm builds with a visible GPU, else 'cpu' (never hard-code 'cuda')."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_device() -> torch.device:
    dtype = device_type()
    if dtype == "cpu":
        return torch.device("cpu")
    return torch.device(dtype, int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def init_distributed(init_timeout_seconds: int, trace_buf_size: int = 0) -> None:
    """Join (or create) the default process group: NCCL/RCCL on GPUs, gloo on CPU.

    A single process without torchrun gets a one-rank gloo group on a free local port, so the
    same code path (DTensor, DCP) runs everywhere.
    """
    if dist.is_initialized():
        return
    dtype = device_type()
    if dtype == "cuda":
        torch.cuda.set_device(local_device())
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", str(trace_buf_size))
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "cuda:nccl,cpu:gloo" if dtype == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=init_timeout_seconds))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_pg_timeout(seconds: int) -> None:
    """Shorten collective timeouts after the first step (start-up is allowed to be slow)."""
    if not dist.is_initialized() or device_type() == "cpu":
        return
    try:
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=seconds), None)
    except (AttributeError, RuntimeError) as e:
        logger.warning(f"could not change the collective timeout: {e}")


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed every RNG; in deterministic mode also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm_(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Total gradient norm over all ranks (FSDP and TP shards included); clip when max_norm > 0.

    Gradients may live on different meshes (e.g. FSDP-only norms next to FSDP x TP matrices);
    norms are computed per mesh and combined, which ``torch.nn.utils.clip_grad_norm_`` cannot do.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    groups: dict[object, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    squares = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type=2.0, foreach=True)
        squares.append(_full(norm).float() ** 2)
    total = torch.stack(squares).sum().sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=True)
    return total


def dist_sum(value: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value
