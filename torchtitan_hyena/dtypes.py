"""Floating-point dtypes by the names that configs and command lines use: the project's one table of them."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
# What weights are stored and exported in (float64 only computes, e.g. scoring).
WEIGHT_DTYPES = ("bfloat16", "float16", "float32")
