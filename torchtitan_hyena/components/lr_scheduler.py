"""Warmup followed by linear / sqrt / cosine decay, or warmup-stable-decay (WSD)."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from torch.optim.lr_scheduler import LambdaLR

from torchtitan_hyena.components.optimizer import OptimizersContainer


def lr_factor(
    step: int, *, warmup_steps: int, total_steps: int, decay_ratio: float, decay_type: str, min_lr_factor: float
) -> float:
    """LR multiplier for the ``step``-th optimizer step (0-based).

    Warmup rises linearly from 1/(warmup+1); then the LR is held (WSD, when ``decay_ratio`` >= 0)
    and decays over the last ``decay_ratio`` of training, or decays straight after warmup.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = round(total_steps * decay_ratio) if decay_ratio >= 0 else total_steps - warmup_steps
    decay_start = total_steps - decay_steps
    if step < decay_start or decay_steps <= 0:
        return 1.0
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    if decay_type == "linear":
        shape = 1.0 - progress
    elif decay_type == "sqrt":
        shape = 1.0 - math.sqrt(progress)
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_factor + (1.0 - min_lr_factor) * shape


class LRSchedulersContainer:
    """One LambdaLR per optimizer; checkpointed as the step count alone."""

    def __init__(self, optimizers: OptimizersContainer, config: Any, total_steps: int) -> None:
        fn = partial(
            lr_factor,
            warmup_steps=config.warmup_steps,
            total_steps=total_steps,
            decay_ratio=config.decay_ratio,
            decay_type=config.decay_type,
            min_lr_factor=config.min_lr_factor,
        )
        self.schedulers = [LambdaLR(opt, fn) for opt in optimizers.optimizers]

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def get_last_lr(self) -> float:
        return self.schedulers[0].get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.schedulers[0].last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Set the LR of the next step explicitly: correct even when the optimizer state is not loaded.
        for s in self.schedulers:
            s.last_epoch = int(state_dict["last_epoch"])
            for group, base, fn in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas):
                group["lr"] = base * fn(s.last_epoch)
            s._last_lr = [g["lr"] for g in s.optimizer.param_groups]


def build_lr_schedulers(optimizers: OptimizersContainer, config: Any, total_steps: int) -> LRSchedulersContainer:
    return LRSchedulersContainer(optimizers, config, total_steps)
