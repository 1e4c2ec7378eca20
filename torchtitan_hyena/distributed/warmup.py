"""Process-group warm-up: a first collective on every group of the device mesh, in a fixed order, each with a deadline.

NCCL/RCCL build a group's communicator at its first collective, and on MI250X systems that first collective on a
freshly created sub-group has been reported to hang silently on multi-node runs. Unwarmed, a bad interconnect
set-up surfaces as a watchdog timeout minutes later that names neither the group nor the setting. Here every
group meets once right after the mesh is built, all ranks in the same order (so ranks of different groups of
a dimension warm up side by side), and a group that misses its deadline ends the process with one line naming
the mesh dimension, its ranks and the variables to check.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.errors import EXIT_USER_ERROR
from torchtitan_hyena.tools.logging import logger

# What decides whether a group can form, shown with its value in the timeout message.
CHECK_VARIABLES = ("NCCL_SOCKET_IFNAME", "NCCL_NET", "NCCL_NET_PLUGIN", "FI_PROVIDER", "GLOO_SOCKET_IFNAME")


def mesh_groups(parallel_dims: ParallelDims) -> list[tuple[str, dist.ProcessGroup]]:
    """This rank's process group of each mesh dimension (the world first), each group once, in mesh order."""
    groups: list[tuple[str, dist.ProcessGroup]] = [("world", dist.group.WORLD)]
    for name, mesh in parallel_dims.named_meshes().items():
        group = mesh.get_group()
        if all(group is not g for _, g in groups):
            groups.append((name, group))
    return groups


def _first_collective(group: dist.ProcessGroup, device: torch.device, outcome: dict) -> None:
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            x = torch.ones(1, device=device)
            dist.all_reduce(x, group=group)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    except Exception as e:  # a collective that fails (rather than hangs) is re-raised by the caller
        outcome["error"] = e
    finally:
        outcome["done"].set()


def timeout_message(name: str, ranks: list[int], timeout_s: float) -> str:
    settings = ", ".join(f"{v}={os.environ.get(v, '(unset)')}" for v in CHECK_VARIABLES)
    return (
        f"the first collective of mesh group {name!r} (ranks {ranks}) did not complete within {timeout_s:g} s "
        f"(comm.warmup_timeout_seconds): a rank is missing or the interconnect is misconfigured; check {settings}, "
        "that LD_LIBRARY_PATH or NCCL_NET_PLUGIN leads to the network plugin, and rerun with NCCL_DEBUG=INFO"
    )


def warm_up(parallel_dims: ParallelDims, device: torch.device, timeout_s: float) -> list[tuple[str, list[int], float]]:
    """One all-reduce on every mesh group; returns (name, ranks, seconds) per group.

    The collective runs in a helper thread (a hung communicator set-up blocks inside the call, where no timeout
    reaches it). A group that misses ``timeout_s`` ends the process at once with a one-line error: the collective
    cannot be cancelled, and tearing the process group down would wait on it.
    """
    timings = []
    for name, group in mesh_groups(parallel_dims):
        ranks = dist.get_process_group_ranks(group)
        outcome = {"done": threading.Event()}
        start = time.perf_counter()
        threading.Thread(target=_first_collective, args=(group, device, outcome), daemon=True).start()
        if not outcome["done"].wait(timeout_s):
            print(f"error: {timeout_message(name, ranks, timeout_s)}", file=sys.stderr, flush=True)
            os._exit(EXIT_USER_ERROR)
        if "error" in outcome:
            raise outcome["error"]
        timings.append((name, ranks, time.perf_counter() - start))
    logger.info("warmed up " + ", ".join(f"{n} ({len(r)} ranks) {t:.2f}s" for n, r, t in timings))
    return timings
