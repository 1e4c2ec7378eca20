"""Communication self-test on the job's own mesh, launched like the trainer (same config and overrides):

    torchrun --nproc_per_node 4 -m torchtitan_hyena.tools.comm_check --job.config_file X.toml [--section.key value ...]
        [--sizes_mib 1,16,256] [--iters N] [--output PATH] [--min_internode_gbps G]

First it warms every process group of the mesh as the trainer does (``distributed.warmup``: a group that cannot form
fails in one line within ``comm.warmup_timeout_seconds``). Then it times all-reduce, all-gather and reduce-scatter
on every mesh dimension at a few message sizes and reports bus bandwidth as nccl-tests define it (algorithm
bandwidth x 2(n-1)/n for all-reduce, x (n-1)/n for the others, so groups of any size compare with the link speed).
A dimension's figure is its slowest group's. Rank 0 prints a table and writes JSON (default
``<job.dump_folder>/comm_check.json``). With ``--min_internode_gbps``, a dimension whose groups span nodes and whose
best bus bandwidth stays below it gets a warning naming the likely cause: the collectives run over TCP sockets
because the network plugin did not load.
"""

from __future__ import annotations

import datetime
import json
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tabulate import tabulate

from torchtitan_hyena.config import ConfigManager, JobConfig
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.distributed.utils import all_gather_single, init_distributed, local_device, reduce_scatter_single
from torchtitan_hyena.distributed.warmup import warm_up
from torchtitan_hyena.errors import ConfigError, run_cli
from torchtitan_hyena.tools.logging import init_logger

OPS = ("all_reduce", "all_gather", "reduce_scatter")
MiB = 1 << 20


@dataclass
class Flags:
    sizes_mib: list[float] = field(default_factory=list)  # empty: the device's defaults
    iters: int = 0  # 0: the device's default
    output: str = ""
    min_internode_gbps: float = 0.0


def split_flags(argv: list[str]) -> tuple[list[str], Flags]:
    """Take this tool's flags out of ``argv``; the rest are config options."""
    flags, rest, i = Flags(), [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        key = name.removeprefix("--")
        if key not in ("sizes_mib", "iters", "output", "min_internode_gbps"):
            rest.append(argv[i])
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"{name} needs a value")
            value, i = argv[i + 1], i + 1
        i += 1
        try:
            if key == "sizes_mib":
                flags.sizes_mib = [float(v) for v in value.split(",")]
                ok = all(v > 0 for v in flags.sizes_mib)
            elif key == "iters":
                flags.iters = int(value)
                ok = flags.iters > 0
            elif key == "min_internode_gbps":
                flags.min_internode_gbps = float(value)
                ok = flags.min_internode_gbps >= 0
            else:
                flags.output, ok = value, bool(value)
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"{name} got {value!r}; expected " + {
                "sizes_mib": "positive MiB sizes separated by commas, e.g. 1,16,256",
                "iters": "a positive integer", "min_internode_gbps": "a number >= 0", "output": "a file path",
            }[key])  # fmt: skip
    return rest, flags


def bus_factor(op: str, n: int) -> float:
    """nccl-tests' bus bandwidth factor: the share of the data each rank's link carries."""
    return 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n


def message_numel(nbytes: int, n: int) -> int:
    """fp32 elements of a message of about ``nbytes`` that splits evenly over ``n`` ranks."""
    return max(n, nbytes // 4 // n * n)


def time_op(op: str, group: dist.ProcessGroup, nbytes: int, device: torch.device, iters: int) -> float:
    """Seconds per call of ``op`` on a message of about ``nbytes`` (all-reduce: the buffer; all-gather: the gathered
    output; reduce-scatter: the input), the slowest rank of the group's figure."""
    n = dist.get_world_size(group)
    numel = message_numel(nbytes, n)
    full, part = torch.ones(numel, device=device), torch.ones(numel // n, device=device)
    calls = {
        "all_reduce": lambda: dist.all_reduce(full, group=group),
        "all_gather": lambda: all_gather_single(full, part, group=group),
        "reduce_scatter": lambda: reduce_scatter_single(part, full, group=group),
    }
    call = calls[op]
    call()  # warm: buffers, algorithm selection
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(iters):
        call()
    sync()
    seconds = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX, group=group)
    return seconds.item()


def measure(pd: ParallelDims, device: torch.device, sizes: list[int], iters: int) -> list[dict[str, Any]]:
    """One record per (mesh dimension, size), on rank 0 (every rank takes part); slowest group per dimension."""
    mine = {}
    for dim in pd.world_mesh.mesh_dim_names or ():
        group = pd.world_mesh[dim].get_group()
        for nbytes in sizes:
            mine[dim, nbytes] = [time_op(op, group, nbytes, device, iters) for op in OPS]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), mine))
    hosts = [host for host, _ in everyone]
    records = []
    names, mesh = pd.world_mesh.mesh_dim_names or (), pd.world_mesh.mesh
    for dim in names:
        axis = names.index(dim)
        groups = mesh.movedim(axis, -1).reshape(-1, mesh.shape[axis]).tolist()
        nodes = max(len({hosts[rank] for rank in members}) for members in groups)
        n = len(groups[0])
        for nbytes in sizes:
            moved = message_numel(nbytes, n) * 4
            record = {"dimension": dim, "group_size": n, "groups": len(groups), "nodes_per_group": nodes,
                      "size_bytes": moved}  # fmt: skip
            for i, op in enumerate(OPS):
                seconds = max(timings[dim, nbytes][i] for _, timings in everyone)
                algbw = moved / seconds / 1e9
                record[op] = {"seconds": seconds, "algbw_gbps": algbw, "busbw_gbps": algbw * bus_factor(op, n)}
            records.append(record)
    return records


def internode_warnings(records: list[dict[str, Any]], min_gbps: float) -> list[str]:
    """A warning per dimension spanning nodes whose best bus bandwidth is below ``min_gbps``."""
    best: dict[str, tuple[float, int]] = {}
    for r in records:
        if r["nodes_per_group"] > 1:
            peak = max(r[op]["busbw_gbps"] for op in OPS)
            best[r["dimension"]] = (max(peak, best.get(r["dimension"], (0.0, 0))[0]), r["nodes_per_group"])
    return [
        f"inter-node bandwidth of mesh dimension {dim!r} ({nodes} nodes per group) peaks at {peak:.2f} GB/s bus "
        f"bandwidth, below {min_gbps:g} GB/s: the collectives most likely run over TCP sockets because the network "
        "plugin did not load; check that NCCL_NET_PLUGIN or LD_LIBRARY_PATH leads to librccl-net.so (bash "
        "aws_ofi_rccl.sh, or PLUGIN=module), set NCCL_NET=OFI to make a missing plugin an error, and look for "
        "'NET/OFI' in the NCCL_DEBUG=INFO output"
        for dim, (peak, nodes) in best.items()
        if peak < min_gbps
    ]


def table(records: list[dict[str, Any]]) -> str:
    rows = [
        [r["dimension"], r["group_size"], r["groups"], r["nodes_per_group"], f"{r['size_bytes'] / MiB:g}",
         *(f"{r[op]['busbw_gbps']:.3f}" for op in OPS)]
        for r in records
    ]  # fmt: skip
    headers = ["dimension", "ranks/group", "groups", "nodes/group", "MiB", *(f"{op} GB/s" for op in OPS)]
    return "bus bandwidth (slowest group of each dimension)\n" + tabulate(rows, headers=headers, disable_numparse=True)


def run(config: JobConfig, flags: Flags) -> None:
    init_logger()
    init_distributed(config.comm.init_timeout_seconds, config.comm.trace_buf_size)
    pd = ParallelDims.from_config(config.parallelism, dist.get_world_size())
    device = local_device()
    pd.build_mesh(device.type)
    warmup = warm_up(pd, device, config.comm.warmup_timeout_seconds)
    gpu = device.type == "cuda"
    sizes = [int(s * MiB) for s in flags.sizes_mib or ([1, 16, 256] if gpu else [0.0625, 1])]
    records = measure(pd, device, sizes, flags.iters or (10 if gpu else 3))
    if dist.get_rank() == 0:
        warnings = internode_warnings(records, flags.min_internode_gbps)
        print(table(records), flush=True)
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr, flush=True)
        output = Path(flags.output or Path(config.job.dump_folder) / "comm_check.json")
        output.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "world_size": dist.get_world_size(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if gpu else "cpu", "torch": torch.__version__,
            "warmup": [{"group": n, "ranks": r, "seconds": t} for n, r, t in warmup],
            "bandwidth": records, "warnings": warnings,
        }  # fmt: skip
        output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {output}", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv, flags = split_flags(list(sys.argv[1:] if argv is None else argv))
    config = ConfigManager().parse_args(argv)
    try:
        run(config, flags)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
