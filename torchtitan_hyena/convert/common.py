"""Pieces every converter shares: lazy tensors and streaming DCP writes (outputs: ``tools/outputs.py``)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.metadata import MetadataIndex

from torchtitan_hyena.components.dcp_reader import dcp_error, short_reason
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.protocols.state_dict_adapter import LazyTensor
from torchtitan_hyena.tools.logging import logger


def load_torch_file(path: Path, source: str = "", safe_globals: Sequence[type] = ()) -> Any:
    """``torch.load`` of a checkpoint file, memory-mapped and ``weights_only`` (plus ``safe_globals``), with a
    one-line error saying what is wrong: damaged or truncated, or holding objects that could run code."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        if "Weights only load failed" in str(e):
            reason = "it holds objects other than tensors, and loading them could run code; refused"
        else:
            reason = f"not a complete PyTorch checkpoint, truncated or damaged ({short_reason(e)}); download it again"
        raise UserError(f"cannot read {source or path}: {reason}") from None


class _LazySavePlanner(DefaultSavePlanner):
    """Plans from meta tensors and asks each ``LazyTensor`` for its data when the writer reaches it."""

    def __init__(self, tensors: Mapping[str, LazyTensor]) -> None:
        super().__init__()
        self._tensors = tensors

    def lookup_object(self, index: MetadataIndex) -> Any:
        spec = self._tensors[index.fqn]
        tensor = spec.load()
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"{index.fqn}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {spec}")
        return tensor


def with_progress(tensors: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
    """Log every tenth of the tensors: a 70B conversion takes minutes and must not look hung."""
    total, done, t0 = len(tensors), [0], time.perf_counter()

    def wrap(tensor: LazyTensor) -> LazyTensor:
        def load() -> torch.Tensor:
            out = tensor.load()
            done[0] += 1
            if done[0] % max(1, total // 10) == 0 or done[0] == total:
                logger.info(f"converted {done[0]}/{total} tensors ({time.perf_counter() - t0:.0f}s)")
            return out

        return LazyTensor(tensor.shape, tensor.dtype, load)

    return {k: wrap(t) for k, t in tensors.items()}


def save_dcp_streaming(tensors: Mapping[str, LazyTensor], folder: str | Path) -> None:
    """Write ``tensors`` as one DCP checkpoint, holding about one tensor in memory at a time.

    One file per tensor (``single_file_per_rank=False``): the file writer keeps every tensor of a
    file alive until the file is closed, so one file per rank would hold the whole model.
    """
    state = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in tensors.items()}
    writer = FileSystemWriter(str(folder), single_file_per_rank=False, thread_count=1)
    try:
        dcp.save(state, storage_writer=writer, planner=_LazySavePlanner(tensors), no_dist=True)
    except CheckpointException as e:  # re-raise what a loader raised (a UserError, Ctrl-C), not DCP's wrapper
        raise dcp_error(e) from None
