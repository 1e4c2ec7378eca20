"""The model-spec registry: everything the set-up path (``build.py``) needs from one model family.

A family is one folder, ``torchtitan_hyena/models/<name>/``, whose ``__init__`` registers a :class:`TrainSpec`;
``model.name = <name>`` imports it on first use. README "Adding a model family" walks through the files.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from torchtitan_hyena.components.dataloader import build_dataloader_from_config, build_tokenizer
from torchtitan_hyena.components.loss import build_cross_entropy_loss
from torchtitan_hyena.components.lr_scheduler import build_lr_schedulers
from torchtitan_hyena.components.optimizer import build_optimizers
from torchtitan_hyena.distributed.parallelize import ParallelizePlan
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.protocols.model import BaseModelArgs
from torchtitan_hyena.protocols.state_dict_adapter import StateDictAdapter
from torchtitan_hyena.tools.activation_memory import ActivationEstimator
from torchtitan_hyena.tools.comm_model import TrafficEstimator


@dataclass
class TrainSpec:
    """How to build, parallelize, train, size and convert one model family.

    * ``model_cls(args)`` builds the model; ``model_args`` maps flavor names to instances of the family's args
      class, which reads its ``model.*`` config keys (``config_keys``, ``config_overrides``).
    * ``parallelize_plan``: the family's tensor-parallel, context-parallel and FSDP-unit plan for the shared
      parallelize skeleton (``distributed/parallelize.py``).
    * ``validate_fn(model_args, parallel_dims, job_config)`` rejects layouts the model cannot take (e.g. a TP
      degree that does not divide the heads) before anything is built.
    * ``activation_estimator(model_args, inputs)``: activation memory per rank for the dry run and the planner;
      ``traffic_estimator(model_args, inputs)``: the TP/CP messages of its blocks, for the planner.
    * ``state_dict_adapters``: external checkpoint formats (e.g. ``hf``, ``vortex``) to and from the model's
      state dict; the converters in ``convert/`` read and write the files.
    * ``build_*_fn``: optimizer, LR schedule, data, tokenizer and loss; the shared components by default.
    """

    name: str
    model_cls: type[nn.Module]
    model_args: Mapping[str, BaseModelArgs]
    parallelize_plan: ParallelizePlan
    validate_fn: Callable[..., None] | None = None
    activation_estimator: ActivationEstimator | None = None
    traffic_estimator: TrafficEstimator | None = None
    state_dict_adapters: Mapping[str, type[StateDictAdapter]] = field(default_factory=dict)
    build_optimizers_fn: Callable[..., Any] = build_optimizers
    build_lr_schedulers_fn: Callable[..., Any] = build_lr_schedulers
    build_dataloader_fn: Callable[..., Any] = build_dataloader_from_config
    build_tokenizer_fn: Callable[..., Any] = build_tokenizer
    build_loss_fn: Callable[..., Any] = build_cross_entropy_loss

    @property
    def args_cls(self) -> type[BaseModelArgs]:
        return type(next(iter(self.model_args.values())))


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
    """Names of the model families (the folders under ``models/``, and anything registered from elsewhere)."""
    models = Path(__file__).resolve().parents[1] / "models"
    found = {m.name for m in pkgutil.iter_modules([str(models)]) if m.ispkg and m.name != "common"}
    return sorted(found | set(_REGISTRY))


def get_flavor_args(spec: TrainSpec, flavor: str) -> BaseModelArgs:
    """A fresh copy of a flavor's args (flavors are shared templates and must not be mutated)."""
    if flavor not in spec.model_args:
        raise ConfigError(
            f"model.flavor {flavor!r} is not a {spec.name} flavor; available: {', '.join(spec.model_args)}"
        )
    return copy.deepcopy(spec.model_args[flavor])
