"""torch.compile per block: repeated structure compiles once, and graphs stay small."""

from __future__ import annotations

import torch
from torch import nn

from torchtitan_hyena.config.job_config import Compile
from torchtitan_hyena.tools.logging import logger


def compiles_model(config: Compile) -> bool:
    """Whether the model's blocks are torch.compile'd (``compile.enable`` with ``model`` in its components)."""
    return config.enable and "model" in config.components


def apply_compile(layers: nn.ModuleDict, backend: str, fullgraph: bool = True) -> None:
    """Compile each block of ``layers`` in place (after AC wrapping, before FSDP).

    ``fullgraph=False`` lets blocks that hold a nested FSDP unit (whose hooks Dynamo cannot trace)
    graph-break around it, as TorchTitan does for MoE experts.
    """
    for name, block in list(layers.items()):
        layers[name] = torch.compile(block, backend=backend, fullgraph=fullgraph)
    logger.info(f"compiled {len(layers)} blocks with torch.compile (backend {backend})")
