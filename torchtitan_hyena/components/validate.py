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
        pp_group: dist.ProcessGroup | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.dataloader = dataloader
        self.loss_fn = loss_fn
        self.steps = steps
        self.device = device
        self.loss_group = loss_group
        self.prepare_batch = prepare_batch  # e.g. the context-parallel sharding of the trainer
        self.pp_group = pp_group  # pipeline: the loss exists on the last stage only
        self.batch_size = batch_size  # pipeline: the schedule's batch; a shorter last batch is left out

    def model_loss(
        self, model: torch.nn.Module, forward: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]
    ) -> Callable[[dict[str, Any]], torch.Tensor]:
        """The ``batch_loss`` of a whole model: ``forward`` gives the logits of a prepared batch."""
        return lambda batch: self.loss_fn(forward(model, batch), batch["labels"], batch.get("loss_weights"))

    @torch.no_grad()
    def validate(
        self, model_parts: list[torch.nn.Module], batch_loss: Callable[[dict[str, Any]], torch.Tensor]
    ) -> tuple[float, int]:
        """(mean loss per token, tokens) over ``steps`` batches from the start of the split; ``batch_loss`` is
        this rank's summed token loss of a prepared batch (the model's forward, or the pipeline schedule's)."""
        modes = [m.training for m in model_parts]
        for m in model_parts:
            m.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.dataloader.load_state_dict({"windows_consumed": 0})
        for i, batch in enumerate(self.dataloader):
            if 0 <= self.steps <= i or (self.batch_size is not None and len(batch["input"]) != self.batch_size):
                break
            batch = batch_to_device(batch, self.device)
            if self.prepare_batch is not None:
                batch = self.prepare_batch(batch)
            total[0] += batch_loss(batch).double()
            total[1] += (batch["labels"] != IGNORE_INDEX).sum()
        if self.pp_group is not None:
            dist.all_reduce(total[:1], group=self.pp_group)
        if self.loss_group is not None:
            dist.all_reduce(total, group=self.loss_group)
        for m, mode in zip(model_parts, modes):
            m.train(mode)
        return (total[0] / total[1].clamp(min=1)).item(), int(total[1].item())
