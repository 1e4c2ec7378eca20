"""Torch profiler traces and allocator memory snapshots behind ``[profiling]``."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from torchtitan_hyena.tools.logging import logger


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def maybe_enable_profiling(config: Any, dump_folder: Path, start_step: int) -> Iterator[Any]:
    """Yield a profiler that records one step every ``profile_freq`` steps, or None."""
    if not config.enable_profiling:
        yield None
        return
    folder = dump_folder / config.save_traces_folder
    freq = config.profile_freq

    def on_trace_ready(prof: torch.profiler.profile) -> None:
        out = folder / f"iteration_{prof.step_num + start_step}"
        out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out / f"rank{_rank()}_trace.json"))
        logger.info(f"wrote profiler trace to {out}")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=max(freq - 2, 0), warmup=1 if freq > 1 else 0, active=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=on_trace_ready) as prof:
        prof.step_num = start_step
        yield prof


class _MemorySnapshot:
    def __init__(self, folder: Path, freq: int, step: int) -> None:
        self.folder, self.freq, self.step_num = folder, freq, step

    def step(self) -> None:
        self.step_num += 1
        if self.step_num % self.freq == 0:
            out = self.folder / f"iteration_{self.step_num}"
            out.mkdir(parents=True, exist_ok=True)
            with (out / f"rank{_rank()}_memory_snapshot.pickle").open("wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)
            logger.info(f"wrote memory snapshot to {out}")


@contextlib.contextmanager
def maybe_enable_memory_snapshot(
    config: Any, dump_folder: Path, start_step: int, device: torch.device
) -> Iterator[Any]:
    """Yield a snapshotter (GPU allocators only) or None."""
    if not config.enable_memory_snapshot:
        yield None
        return
    if device.type != "cuda":
        logger.warning("profiling.enable_memory_snapshot needs a CUDA/ROCm device; no snapshots on CPU")
        yield None
        return
    torch.cuda.memory._record_memory_history(max_entries=100000)
    try:
        yield _MemorySnapshot(dump_folder / config.save_memory_snapshot_folder, config.profile_freq, start_step)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
