"""State-dict adapters: one external checkpoint format to and from one model family's state dict.

TorchTitan's ``BaseStateDictAdapter``, made for streaming: tensors come in as the format's reader gives them
(memory-mapped tensors, or :class:`LazyTensor`s read only when written) and leave as :class:`LazyTensor`s, so a
converter holds about one tensor at a time. An adapter knows names, layouts and re-parametrizations; the files
(shards, safetensors, YAML, DCP) belong to ``convert/``. A family lists its adapters in ``TrainSpec``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from torchtitan_hyena.protocols.model import BaseModelArgs


@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by shape and dtype, materialized by ``load()`` only when it is written."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


class StateDictAdapter:
    """Converts between ``format`` and the state dict of a model built from ``args``.

    ``block_prefix``, ``block_modules`` and ``top_modules`` name the format's modules (``<block_prefix>.N[.sub]``,
    or a top-level name) as the model's, for tools that address modules by the names users know (``score
    --embeddings``)."""

    format: str = ""
    block_prefix: str = ""
    block_modules: Mapping[str, str] = MappingProxyType({})
    top_modules: Mapping[str, str] = MappingProxyType({})

    @classmethod
    def module_name(cls, name: str) -> str | None:
        """The model's module for the format's module ``name`` (None: not a module name of the format)."""
        if cls.block_prefix:
            m = re.fullmatch(rf"{re.escape(cls.block_prefix)}\.(\d+)(?:\.(.+))?", name)
            if m:
                block, sub = m.groups()
                if sub is None:
                    return f"layers.{block}"
                return f"layers.{block}.{cls.block_modules[sub]}" if sub in cls.block_modules else None
        return cls.top_modules.get(name)

    def __init__(self, args: BaseModelArgs) -> None:
        self.args = args

    def from_external(self, tensors: Mapping[str, Any], source: str) -> dict[str, LazyTensor]:
        """The model's tensors (its FQNs) from the format's tensors; ``source`` names them in errors."""
        raise NotImplementedError(f"{type(self).__name__} does not convert into the model")

    def to_external(self, state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The format's tensors, in ``dtype`` where the format allows, from the model's state dict."""
        raise NotImplementedError(f"{type(self).__name__} does not export to {self.format}")
