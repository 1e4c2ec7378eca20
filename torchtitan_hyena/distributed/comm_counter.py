"""Count the bytes and calls of every collective this thread issues, by mesh dimension and kind.

For checking a layout planner's predictions against what the code really sends: ``count_collectives(mesh)`` is
a ``TorchDispatchMode`` that sees both the c10d ops (``torch.ops.c10d.*``: what ``torch.distributed.*`` calls,
FSDP2 included) and the functional ones (``torch.ops._c10d_functional*``: DTensor redistributions). A functional
op runs its c10d op underneath while the mode is popped off the stack, so each logical collective counts once.

Bytes per call, for the calling rank (what a planner predicts from shapes, not the wire traffic of an algorithm):

- ``all_gather``: this rank's input shard;
- ``reduce_scatter``: this rank's input, the full-size tensor;
- ``all_reduce``, ``broadcast``, ``send``, ``recv``: the tensor;
- ``all_to_all``: this rank's input.

Coalesced and list forms add their tensors up (one call). A key is ``(dimension, kind)``: the dimension is the
mesh dimension (or flattened dimension, e.g. ``dp_shard_cp``) whose process group the op ran on, ``world`` for
the default group, ``other`` for any other group. Where two names share one group (FSDP over ``dp_shard_cp`` when
only ``cp`` is present), the mesh dimension's name wins. c10d barrier, gather, scatter and reduce are counted too,
under kinds of those names (their tensor or input bytes), so nothing is silently dropped.

Only the calling thread is seen: backward collectives count because CPU autograd runs in the calling thread, and
the autograd engine carries the dispatch mode to its device threads on GPUs (not checked here).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import device_mesh
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _ops(namespace: str, kinds: dict[str, str]) -> dict[Any, str]:
    """Overload packets by name -> kind, skipping the names this torch lacks (2.11 has fewer)."""
    ns = getattr(torch.ops, namespace)
    found = {}
    for name, kind in kinds.items():
        try:
            found[getattr(ns, name)] = kind
        except (AttributeError, RuntimeError):
            continue
    return found


_FUNCTIONAL = {
    "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "all_gather_into_tensor_out": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "reduce_scatter_tensor_out": "reduce_scatter",
    "all_reduce": "all_reduce",
    "all_reduce_": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_reduce_coalesced_": "all_reduce",
    "all_to_all_single": "all_to_all",
    "broadcast": "broadcast",
    "broadcast_": "broadcast",
    "isend": "send",
    "irecv": "recv",
}
_C10D = {
    "allgather_": "all_gather",
    "_allgather_base_": "all_gather",
    "allgather_coalesced_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather",
    "reduce_scatter_": "reduce_scatter",
    "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "allreduce_": "all_reduce",
    "allreduce_coalesced_": "all_reduce",
    "alltoall_": "all_to_all",
    "alltoall_base_": "all_to_all",
    "broadcast_": "broadcast",
    "send": "send",
    "recv_": "recv",
    "recv_any_source_": "recv",
    "barrier": "barrier",
    "gather_": "gather",
    "scatter_": "scatter",
    "reduce_": "reduce",
}
_KINDS: dict[Any, str] = {
    **_ops("_c10d_functional", _FUNCTIONAL),
    **_ops("_c10d_functional_autograd", _FUNCTIONAL),
    **_ops("c10d", _C10D),
}


def _nbytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(obj) if isinstance(t, torch.Tensor))


_GROUP_ARGS = ("group_name", "process_group")
# The argument whose bytes define the call (module docstring): a functional op's input(s), a c10d op's inputs
# (gathers, scatters, all-to-all) or its tensor list (all-reduce, broadcast, send, receive).
_PAYLOAD_ARGS = ("input", "inputs", "input_tensors", "input_tensor", "input_list", "tensors", "tensor")


def _arg(func: Any, args: tuple, kwargs: dict, names: tuple[str, ...]) -> Any:
    """The first argument of ``func`` named in ``names``, by its schema (positional or keyword)."""
    schema = {a.name: i for i, a in enumerate(func._schema.arguments)}
    for name in names:
        if name in schema:
            i = schema[name]
            return args[i] if i < len(args) else kwargs.get(name)
    return None


@dataclass
class CollectiveCounts:
    """Bytes and calls per ``(dimension, kind)``; filled in while the ``count_collectives`` block runs."""

    bytes: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def add(self, key: tuple[str, str], nbytes: int) -> None:
        self.bytes[key] += nbytes
        self.calls[key] += 1

    def summary(self) -> dict[str, dict[str, int]]:
        """``{"dim/kind": {"bytes", "calls"}}``, sorted: the JSON form."""
        return {f"{d}/{k}": {"bytes": self.bytes[(d, k)], "calls": self.calls[(d, k)]} for d, k in sorted(self.calls)}


def _root_and_flattened(mesh: DeviceMesh) -> tuple[DeviceMesh, dict[str, DeviceMesh]]:
    """The root mesh and its flattened views: attributes of the mesh in torch 2.13, of ``_mesh_resources`` before."""
    if hasattr(mesh, "_get_root_mesh"):
        root = mesh._get_root_mesh()
        return root, dict(getattr(root, "_flatten_mapping", None) or {})
    resources = getattr(device_mesh, "_mesh_resources", None)
    if resources is None or not hasattr(resources, "get_root_mesh"):
        return mesh, {}
    root = resources.get_root_mesh(mesh)
    return root, dict(getattr(resources, "root_to_flatten_mapping", {}).get(root, {}))


def mesh_group_names(mesh: DeviceMesh, extra: Mapping[str, DeviceMesh] | None = None) -> dict[str, str]:
    """Process-group name -> dimension name, for every dimension of ``mesh``'s root and its flattened views
    (``_flatten`` keeps them in the root's ``_flatten_mapping``), then the 1-D meshes of ``extra`` by their keys
    (e.g. ``ParallelDims.named_meshes()``: an unflattened HSDP mesh may have groups of its own)."""
    root, flattened = _root_and_flattened(mesh)
    named: dict[str, DeviceMesh] = {}
    for m in (root, mesh):
        for name in m.mesh_dim_names or ():
            named.setdefault(name, m[name])
    named.update(flattened)
    for name, sub in (extra or {}).items():
        named.setdefault(name, sub)
    names = {}
    for name, sub in named.items():
        if sub.ndim == 1:
            names.setdefault(sub.get_group().group_name, name)
    return names


def _ranks(group_name: str) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(_resolve_process_group(group_name)))


def _group_name(group: Any) -> str | None:
    """A functional op names its group; a c10d op gets it boxed, as a ``torch.ScriptObject``."""
    if isinstance(group, str):
        return group
    if isinstance(group, torch.ScriptObject):
        group = dist.ProcessGroup.unbox(group)
    name = getattr(group, "group_name", None)
    return name if isinstance(name, str) else None


class _Counter(TorchDispatchMode):
    def __init__(self, groups: dict[str, str], counts: CollectiveCounts) -> None:
        super().__init__()
        self.groups, self.counts = groups, counts
        self.world = _group_name(dist.group.WORLD) if dist.is_initialized() else None
        # DeviceMesh equality compares layouts, so torch's DTensor caches may hand a later mesh the groups of an
        # identical one built earlier in the process (several runs in one job): such a group counts under the
        # dimension with its ranks.
        self.by_ranks = {_ranks(group): dim for group, dim in reversed(groups.items())}

    def _dim(self, group: Any) -> str:
        name = _group_name(group)
        if name in self.groups:
            return self.groups[name]
        if name is not None and name == self.world:
            return "world"
        return self.by_ranks.get(_ranks(name), "other") if name is not None else "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if func.namespace == "_c10d_functional" and packet.__name__ == "batch_p2p_ops":
            dim = self._dim(_arg(func, args, kwargs, _GROUP_ARGS))
            for op, t in zip(_arg(func, args, kwargs, ("op_list",)), _arg(func, args, kwargs, ("tensors",))):
                self.counts.add((dim, "send" if "send" in op else "recv"), _nbytes(t))
        elif packet in _KINDS:
            dim = self._dim(_arg(func, args, kwargs, _GROUP_ARGS))
            self.counts.add((dim, _KINDS[packet]), _nbytes(_arg(func, args, kwargs, _PAYLOAD_ARGS)))
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_collectives(mesh: DeviceMesh, extra: Mapping[str, DeviceMesh] | None = None) -> Iterator[CollectiveCounts]:
    """``with count_collectives(mesh) as counts:`` counts this thread's collectives into ``counts`` (``extra``: more
    named meshes, see :func:`mesh_group_names`)."""
    counts = CollectiveCounts()
    with _Counter(mesh_group_names(mesh, extra), counts):
        yield counts
