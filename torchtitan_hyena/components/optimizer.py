"""AdamW/Adam over the model parts, with optional no-decay groups and distributed state dicts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from torchtitan_hyena.distributed.utils import clean_fqn
from torchtitan_hyena.tools.logging import logger

NO_DECAY_ATTR = "no_weight_decay_keywords"


def _no_decay(model: nn.Module) -> set[int]:
    """Parameters exempt from weight decay: 1-D tensors (norms, biases, D terms), embeddings and
    anything whose name contains one of the model's ``no_weight_decay_keywords`` (e.g. filters)."""
    keywords = tuple(getattr(model, NO_DECAY_ATTR, ()))
    exempt = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            exempt.update(id(p) for p in module.parameters(recurse=False))
    for fqn, p in model.named_parameters():
        if p.ndim < 2 or any(k in clean_fqn(fqn) for k in keywords):
            exempt.add(id(p))
    return exempt


def _implementation(choice: str, params: list[torch.Tensor]) -> dict[str, bool]:
    if choice == "fused" or (choice == "auto" and params and params[0].device.type in ("cuda", "cpu")):
        return {"fused": True}
    if choice in ("foreach", "auto"):
        return {"foreach": True}
    return {"foreach": False}


class OptimizersContainer:
    """One optimizer per model part; state dicts use FQN keys so they reshard through DCP."""

    def __init__(self, model_parts: list[nn.Module], config: Any) -> None:
        self.model_parts = model_parts
        self.optimizers: list[torch.optim.Optimizer] = []
        cls = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}[config.name]
        for model in model_parts:
            params = [p for p in model.parameters() if p.requires_grad]
            if config.decay_norms_and_embeddings:
                groups = [{"params": params, "weight_decay": config.weight_decay}]
            else:
                exempt = _no_decay(model)
                groups = [
                    {"params": [p for p in params if id(p) not in exempt], "weight_decay": config.weight_decay},
                    {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0},
                ]
                logger.info(f"weight decay off for {len(groups[1]['params'])} norm/embedding/filter tensors")
            self.optimizers.append(
                cls(
                    groups,
                    lr=config.lr,
                    betas=(config.beta1, config.beta2),
                    eps=config.eps,
                    **_implementation(config.implementation, params),
                )
            )

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """Flattened, under plain module paths (as the model's: ``checkpoint.model_state_dict``)."""
        opts = StateDictOptions(flatten_optimizer_state_dict=True)
        out: dict[str, Any] = {}
        for model, opt in zip(self.model_parts, self.optimizers):
            out.update({clean_fqn(k): v for k, v in get_optimizer_state_dict(model, opt, options=opts).items()})
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        opts = StateDictOptions(flatten_optimizer_state_dict=True)
        for model, opt in zip(self.model_parts, self.optimizers):
            own = get_optimizer_state_dict(model, opt, options=opts)  # DSD takes its own names back
            own = {k: state_dict[clean_fqn(k)] for k in own if clean_fqn(k) in state_dict}
            set_optimizer_state_dict(model, opt, optim_state_dict=own, options=opts)


def build_optimizers(model_parts: list[nn.Module], config: Any) -> OptimizersContainer:
    return OptimizersContainer(model_parts, config)
