"""Process-group set-up, device selection, determinism, parameter names under wrappers, distributed math."""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torchtitan_hyena.tools.logging import logger

# torch 2.13 renames the tensor-form collectives (the old names warn); torch 2.11 has only the old ones.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_fqn(fqn: str) -> str:
    """Strip the names that AC, compile and FSDP wrappers insert into parameter paths."""
    for part in _WRAPPER_PARTS:
        fqn = fqn.replace(part, "")
    return fqn


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


def _square_share(grads: list[torch.Tensor], world_size: int) -> torch.Tensor:
    """This rank's share of the squared norm of ``grads`` (one mesh and placement), such that summing the
    shares over the ``world_size`` ranks that hold these parameters (one pipeline stage's ranks) gives the squared
    norm of the full gradients.

    Shards add up; a replicated dimension, and every rank outside the mesh, holds copies, each counting
    ``1 / copies``. Partial gradients are reduced first (DTensor), after which every rank holds the norm.
    """
    first = grads[0]
    if isinstance(first, DTensor) and not any(p.is_partial() for p in first.placements):
        mesh = first.device_mesh
        copies = world_size // mesh.size()
        for size, placement in zip(mesh.shape, first.placements):
            if placement.is_replicate():
                copies *= size
        local = torch.nn.utils.get_total_norm([g.to_local() for g in grads], norm_type=2.0, foreach=True)
        return local.float() ** 2 / copies
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.float() ** 2 / world_size


@torch.no_grad()
def clip_grad_norm_(
    parameters: list[torch.nn.Parameter],
    max_norm: float,
    *,
    stages: int = 1,
    counted_elsewhere: frozenset[int] = frozenset(),
) -> torch.Tensor:
    """Total gradient norm over all ranks (FSDP, TP and CP shards included); clip when max_norm > 0.

    Gradients may live on different meshes (e.g. FSDP-only norms next to FSDP x TP matrices), which
    ``torch.nn.utils.clip_grad_norm_`` cannot combine. Each group's local sum of squares becomes a share
    of the global one and a single all-reduce over the world adds them up (DTensor would all-reduce once
    per group and sharded mesh dimension).

    Under pipeline parallelism (``stages`` > 1) each stage's ranks hold other parameters: shares are counted per
    stage and the world sum adds the stages. ``counted_elsewhere``: ids of parameters whose gradient another stage
    holds too and counts (a tied embedding on the last stage); they are clipped, not counted.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    groups: dict[object, list[torch.Tensor]] = {}
    counted: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        g = p.grad
        if g is None:
            continue
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
        if id(p) not in counted_elsewhere:
            counted.setdefault(key, []).append(g)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    per_stage = world_size // stages
    shares = [_square_share(group, per_stage) for group in counted.values()]
    shares = torch.stack(shares) if shares else torch.zeros(1, device=grads[0].device)
    total = dist_sum(shares.sum(), dist.group.WORLD if world_size > 1 else None).sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for group in groups.values():  # foreach per group: DTensors of one mesh, or plain tensors
            torch._foreach_mul_(group, coef.to(group[0].device))
    return total


def dist_sum(value: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value
