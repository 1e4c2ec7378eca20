"""Periodic evaluation on a held-out split (token-weighted loss over all data-parallel ranks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from torchtitan_hyena.components.dataloader import ParallelAwareDataloader, batch_to_device
from torchtitan_hyena.components.datasets.base import IGNORE_INDEX


class Validator:
    def __init__(
        self,
        dataloader: ParallelAwareDataloader,
        loss_fn: Callable[..., torch.Tensor],
        steps: int,
        device: torch.device,
        loss_group: dist.ProcessGroup | None,
        prepare_batch: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.dataloader = dataloader
        self.loss_fn = loss_fn
        self.steps = steps
        self.device = device
        self.loss_group = loss_group
        self.prepare_batch = prepare_batch  # e.g. the context-parallel sharding of the trainer

    @torch.no_grad()
    def validate(
        self, model: torch.nn.Module, forward: Callable[[torch.nn.Module, dict[str, Any]], Any]
    ) -> tuple[float, int]:
        """(mean loss per token, tokens) over ``steps`` batches from the start of the split."""
        was_training = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.dataloader.load_state_dict({"windows_consumed": 0})
        for i, batch in enumerate(self.dataloader):
            if 0 <= self.steps <= i:
                break
            batch = batch_to_device(batch, self.device)
            if self.prepare_batch is not None:
                batch = self.prepare_batch(batch)
            logits = forward(model, batch)
            total[0] += self.loss_fn(logits, batch["labels"], batch.get("loss_weights")).double()
            total[1] += (batch["labels"] != IGNORE_INDEX).sum()
        if self.loss_group is not None:
            dist.all_reduce(total, group=self.loss_group)
        model.train(was_training)
        return (total[0] / total[1].clamp(min=1)).item(), int(total[1].item())
