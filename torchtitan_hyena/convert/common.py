"""Pieces every converter shares: all-or-nothing output folders and streaming DCP writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.metadata import MetadataIndex

from torchtitan_hyena.components.dcp_reader import dcp_error
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.tools.logging import logger

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` that becomes ``target`` only if the block succeeds.

    A crash, an error or Ctrl-C leaves no partial output: the temporary folder is removed. An
    existing non-empty ``target`` is refused unless ``overwrite``; it is replaced only at the end.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"output {target} exists and is not a folder; choose another --output_dir")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UserError(f"output folder {target} exists and is not empty; pass --overwrite or choose another")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():  # empty, or --overwrite: set it aside, then swap the new folder in
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by shape and dtype, materialized by ``load()`` only when it is written."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


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
