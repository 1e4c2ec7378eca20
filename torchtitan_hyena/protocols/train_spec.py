"""The model-spec registry: everything the trainer needs to build one model family."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.protocols.model import BaseModelArgs


@dataclass
class TrainSpec:
    """How to build, parallelize and train one model family.

    ``parallelize_fn(model, parallel_dims, job_config) -> nn.Module`` applies TP/CP/AC/compile/FSDP.
    ``build_*_fn`` build the optimizer, LR scheduler, data loader, tokenizer and loss; the
    state-dict adapters convert to and from external checkpoint formats.
    ``validate_fn(model_args, parallel_dims, job_config)`` rejects layouts the model cannot take
    (e.g. a TP degree that does not divide the heads) before the model is built.
    """

    name: str
    model_cls: type[nn.Module]
    model_args: Mapping[str, BaseModelArgs]
    parallelize_fn: Callable[..., nn.Module]
    build_optimizers_fn: Callable[..., Any]
    build_lr_schedulers_fn: Callable[..., Any]
    build_dataloader_fn: Callable[..., Any]
    build_tokenizer_fn: Callable[..., Any]
    build_loss_fn: Callable[..., Any]
    state_dict_adapters: Mapping[str, Any] | None = None
    validate_fn: Callable[..., None] | None = None


_REGISTRY: dict[str, TrainSpec] = {}


def register_train_spec(spec: TrainSpec) -> None:
    """Register a spec; a second registration under the same name is a bug."""
    if spec.name in _REGISTRY:
        raise ValueError(f"TrainSpec {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def get_train_spec(name: str) -> TrainSpec:
    """Look up a spec, importing ``torchtitan_hyena.models.<name>`` on first use."""
    if name not in _REGISTRY:
        try:
            importlib.import_module(f"torchtitan_hyena.models.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"torchtitan_hyena.models.{name}":
                raise
    if name not in _REGISTRY:
        raise ConfigError(f"model.name {name!r} is not a registered model; available: {', '.join(available())}")
    return _REGISTRY[name]


def available() -> list[str]:
    import pkgutil

    import torchtitan_hyena.models as models

    found = {m.name for m in pkgutil.iter_modules(models.__path__) if m.name != "common"}
    return sorted(found | set(_REGISTRY))


def get_flavor_args(spec: TrainSpec, flavor: str) -> BaseModelArgs:
    """A fresh copy of a flavor's args (flavors are shared templates and must not be mutated)."""
    import copy

    if flavor not in spec.model_args:
        raise ConfigError(
            f"model.flavor {flavor!r} is not a {spec.name} flavor; available: {', '.join(spec.model_args)}"
        )
    return copy.deepcopy(spec.model_args[flavor])
