"""Token cross entropy, summed in fp32; the trainer divides by the global token count."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from torchtitan_hyena.components.datasets.base import IGNORE_INDEX
from torchtitan_hyena.tools.logging import logger

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over tokens of (optionally weighted) cross entropy; logits are upcast to fp32 here.

    Summing (not averaging) per microbatch and dividing once by the global number of valid tokens
    makes the loss, and so the gradients, independent of how tokens are split across ranks and
    accumulation steps. Under loss parallel ``logits`` is a vocab-sharded DTensor: the cross
    entropy runs on the shards and yields replicated per-token losses, taken here as a plain tensor.
    """
    losses = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(0, 1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    if isinstance(losses, DTensor):
        losses = losses.full_tensor()
    if weights is not None:
        losses = losses * weights.flatten(0, 1).to(losses.dtype)
    return losses.sum()


def build_cross_entropy_loss(job_config) -> LossFn:
    if job_config.compile.enable and "loss" in job_config.compile.components:
        if job_config.parallelism.enable_loss_parallel:
            # Compiled, the vocab-sharded cross entropy gives wrong values (torch 2.13): loss parallel's
            # DTensor op handlers are not traced. The shards' cross entropy is cheap; keep it eager.
            logger.info("loss not compiled: loss parallel runs the cross entropy eagerly on vocab shards")
            return cross_entropy_sum
        return torch.compile(cross_entropy_sum, backend=job_config.compile.backend)
    return cross_entropy_sum
