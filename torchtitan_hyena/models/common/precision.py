"""Modules whose parameters stay fp32 when the rest of the model runs in bf16.

A module opts in with the class attribute ``keep_fp32_params = True`` (e.g. the Hyena-LI modal filter,
whose poles lose the filter's tail in bf16). FSDP shards such modules as their own fp32 units, and
:func:`cast_model_` casts everything else.
"""

from __future__ import annotations

import torch
from torch import nn

FP32_ATTR = "keep_fp32_params"


def fp32_modules(model: nn.Module) -> list[nn.Module]:
    """Submodules that must keep fp32 parameters (outermost ones; ``modules()`` is pre-order)."""
    found: list[nn.Module] = []
    covered: set[int] = set()
    for module in model.modules():
        if id(module) not in covered and getattr(module, FP32_ATTR, False):
            found.append(module)
            covered.update(id(m) for m in module.modules())
    return found


def cast_model_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)``, except the parameters of :func:`fp32_modules`, which stay fp32."""
    model.to(dtype)
    if dtype != torch.float64:
        for module in fp32_modules(model):
            module.float()
    return model
