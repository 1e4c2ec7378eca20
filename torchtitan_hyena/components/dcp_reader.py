"""The one way this project opens a DCP checkpoint folder (trainer, evaluate, score, converters, and every
future reader): nothing in a checkpoint runs as code, and a damaged folder is one line.

A DCP folder's ``.metadata`` is a pickle, and torch's ``FileSystemReader`` unpickles it with ``pickle.load``;
its ``DefaultLoadPlanner`` also unpickles non-tensor entries (optimizer hyper-parameters, train state) with
a full ``torch.load``. Checkpoints travel between people and through the Hub, so here:

* ``.metadata`` is read by :func:`~torchtitan_hyena.components.safe_pickle.restricted_loads` with an
  allow-list of DCP's metadata classes, ``torch.Size``, dtypes, layouts and plain containers, and its
  structure is checked (types, sizes, that every entry has data, that data files are plain names in the
  folder) before anything else uses it;
* every ``.distcp`` file the metadata names must exist and be at least as long as the metadata says, so a
  truncated or missing shard is reported before any tensor is read;
* non-tensor entries are loaded with ``torch.load(weights_only=True)``; tensors already are by torch.

Use :func:`read_dcp_metadata` to inspect a checkpoint and :func:`load_dcp` to read from it; both raise
:class:`~torchtitan_hyena.errors.UserError` with one line naming the folder or file.
"""

from __future__ import annotations

import io
import pathlib
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import filesystem as _dcp_filesystem
from torch.distributed.checkpoint import metadata as _dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem

from torchtitan_hyena.components.safe_pickle import UnsafePickleError, restricted_loads
from torchtitan_hyena.errors import UserError

METADATA_FILE = ".metadata"
_StorageInfo = _dcp_filesystem._StorageInfo  # the per-entry record FileSystemWriter pickles into .metadata
_CLASSES = ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                     "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")  # fmt: skip
_LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}


def _layout_by_name(name: str) -> torch.layout:
    """What ``torch.serialization._get_layout`` does for a pickled layout, from a fixed table."""
    if name not in _LAYOUTS:
        raise ValueError(f"unknown layout {name!r}")
    return _LAYOUTS[name]


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {(_dcp_metadata.__name__, n): getattr(_dcp_metadata, n) for n in _CLASSES}
    allowed[(_dcp_filesystem.__name__, "_StorageInfo")] = _StorageInfo
    allowed[("torch", "Size")] = torch.Size
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    allowed[("torch.serialization", "_get_layout")] = _layout_by_name
    allowed[("collections", "OrderedDict")] = OrderedDict
    # StorageMeta.checkpoint_id is the writer's path object; rebuilt as a pure path (no filesystem access).
    for module in ("pathlib", "pathlib._local"):
        for name, cls in (("PosixPath", pathlib.PurePosixPath), ("WindowsPath", pathlib.PureWindowsPath)):
            allowed[(module, name)] = cls
            allowed[(module, "Pure" + name)] = cls
    return allowed


_ALLOWED = _allowed_globals()


def _is_size(value: Any, ndim: int | None = None) -> bool:
    return (
        isinstance(value, torch.Size)
        and all(isinstance(x, int) and x >= 0 for x in value)
        and (ndim is None or len(value) == ndim)
    )


def _structure_problem(meta: Any) -> str | None:
    """What makes ``meta`` unusable as DCP metadata (None when it is well-formed)."""
    if not isinstance(meta, Metadata):
        return f"it holds a {type(meta).__name__}, not DCP metadata"
    if not isinstance(meta.state_dict_metadata, dict) or not isinstance(meta.storage_data, dict):
        return "its entry tables are not dicts"
    if not isinstance(meta.storage_meta, (StorageMeta, type(None))) or not isinstance(
        meta.planner_data, (dict, type(None))
    ):
        return "its storage or planner data has the wrong type"
    stored = set()
    for index, info in meta.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo) or not isinstance(index.fqn, str):
            return "its storage table holds something other than DCP storage records"
        name = info.relative_path
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            return f"entry {index.fqn} points at {name!r}, which is not a file in the checkpoint folder"
        if not all(isinstance(n, int) and n >= 0 for n in (info.offset, info.length)):
            return f"entry {index.fqn} has an invalid byte range"
        if info.transform_descriptors is not None and not all(isinstance(d, str) for d in info.transform_descriptors):
            return f"entry {index.fqn} has invalid transform descriptors"
        stored.add((index.fqn, None if index.offset is None else tuple(index.offset)))
    for key, item in meta.state_dict_metadata.items():
        if not isinstance(key, str):
            return "it has a non-string key"
        if isinstance(item, BytesStorageMetadata):
            if (key, None) not in stored:
                return f"entry {key} has no data record"
            continue
        if not isinstance(item, TensorStorageMetadata):
            return f"entry {key} is a {type(item).__name__}, not tensor or bytes metadata"
        if not isinstance(item.properties, TensorProperties) or not isinstance(item.properties.dtype, torch.dtype):
            return f"tensor {key} has no valid dtype"
        if not _is_size(item.size) or not isinstance(item.chunks, list):
            return f"tensor {key} has an invalid size"
        for chunk in item.chunks:
            if not isinstance(chunk, ChunkStorageMetadata) or not (
                _is_size(chunk.offsets, len(item.size)) and _is_size(chunk.sizes, len(item.size))
            ):
                return f"tensor {key} has an invalid chunk"
            if (key, tuple(chunk.offsets)) not in stored:
                return f"tensor {key} has a chunk without a data record"
    return None


def _check_data_files(path: Path, meta: Metadata) -> None:
    """Every data file the metadata names exists and reaches the end of its last entry."""
    needed: dict[str, int] = {}
    for info in meta.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise UserError(
                f"checkpoint {path} is incomplete: its metadata names {name}, which is missing; "
                "copy the whole step folder again or use another step"
            )
        have = file.stat().st_size
        if have < size:
            raise UserError(
                f"checkpoint {path} is damaged: {name} has {have} bytes but its metadata needs {size} "
                "(truncated copy?); copy the whole step folder again or use another step"
            )


def read_dcp_metadata(path: str | Path) -> Metadata:
    """The validated metadata of the DCP folder ``path``; a one-line :class:`UserError` for anything else.

    Nothing in ``.metadata`` is executed: a pickle naming anything outside DCP's metadata classes is refused.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist or is not a folder; point at a step-N folder")
    file = path / METADATA_FILE
    if not file.is_file():
        raise UserError(f"checkpoint {path} is not a DCP checkpoint (no {METADATA_FILE}); point at a step-N folder")
    try:
        meta = restricted_loads(file.read_bytes(), _ALLOWED)
        problem = _structure_problem(meta)
    except UnsafePickleError as e:
        problem = str(e)
    except OSError as e:
        raise UserError(f"cannot read {file} ({e.strerror or e}); check the file's permissions") from None
    if problem is not None:
        raise UserError(f"refusing {file}: {problem}; use a checkpoint written by torch.distributed.checkpoint")
    _check_data_files(path, meta)
    return meta


class SafeDCPReader(FileSystemReader):
    """``FileSystemReader`` whose metadata comes from :func:`read_dcp_metadata` (read once, then reused)."""

    def __init__(self, path: str | Path, metadata: Metadata | None = None) -> None:
        super().__init__(str(path))
        self._metadata = metadata if metadata is not None else read_dcp_metadata(path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise UserError(f"checkpoint {self.path} has no per-rank metadata; only a global {METADATA_FILE} is read")
        meta = self._metadata
        if meta.storage_meta is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that unpickles non-tensor entries with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def dcp_error(e: BaseException) -> BaseException:
    """What actually failed: DCP wraps every error, even Ctrl-C, in CheckpointException (a BaseException)."""
    if isinstance(e, CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]
    return e


DAMAGED_FIX = "the step folder is damaged or incomplete: copy it again or use another step"


def load_dcp(
    state: dict[str, Any],
    path: str | Path,
    *,
    partial: bool = False,
    metadata: Metadata | None = None,
    fix: str = DAMAGED_FIX,
) -> None:
    """Load ``state`` in place from the DCP folder ``path`` (collectively when a process group exists).

    ``partial`` allows keys of ``state`` that the checkpoint lacks; ``metadata`` skips re-reading it. Failures,
    on any rank, become one :class:`UserError` naming the folder, the cause and ``fix``; Ctrl-C stays Ctrl-C.
    """
    reader = SafeDCPReader(path, metadata)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, planner=_WeightsOnlyLoadPlanner(allow_partial_load=partial))
    except (Exception, CheckpointException) as e:
        cause = dcp_error(e)
        if isinstance(cause, UserError) or not isinstance(cause, Exception):
            raise cause from None
        raise UserError(f"could not read checkpoint {path} ({short_reason(cause)}); {fix}") from None


def short_reason(e: BaseException) -> str:
    """The gist of a low-level error, for a one-line message (no advice meant for someone else's situation)."""
    text = str(e).strip()
    if "Weights only load failed" in text:  # its advice (weights_only=False) is exactly what must not be done
        return "an entry is not plain tensor data: damaged, or objects that could run code, refused"
    first = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(e).__name__}: {first[:160]}" if first else type(e).__name__
