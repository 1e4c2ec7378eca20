"""LoRA (low-rank adaptation) for any model family: adapters on chosen linear layers, the rest frozen.

``y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T`` with ``A`` (rank x in) and ``B`` (out x rank). ``B``
starts at zero, so an adapted model computes exactly its base model until the first optimizer step.

The set-up (``build.py``) calls, in order: :func:`apply_lora` on the meta model (swaps the target linears for
:class:`LoRALinear` and marks what trains), the parallelize plan (tensor parallelism shards the adapters like
their base layer through :func:`shard_adapters`), then after initialisation :func:`init_adapters`.
:func:`merge_adapters` folds them back into plain ``nn.Linear`` layers (``python -m torchtitan_hyena.merge_lora``).
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from torchtitan_hyena.errors import ConfigError, UserError
from torchtitan_hyena.tools.logging import logger

ADAPTER_NAMES = ("lora_a", "lora_b")


class LoRALinear(nn.Linear):
    """A linear layer with a trainable low-rank update; ``weight`` and ``bias`` keep the base layer's names, so
    checkpoints of the base model load into it unchanged and tensor-parallel plans treat it as any linear."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float, dropout: float, **kw: Any
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.scaling = alpha / rank
        self.dropout = dropout  # functional: tensor-parallel styles expect a linear without submodules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        update = F.linear(F.linear(h, self.lora_a), self.lora_b)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def merged_weight(self) -> torch.Tensor:
        """``W + scaling * B A`` (plain tensors, one process)."""
        return self.weight + self.scaling * (self.lora_b.float() @ self.lora_a.float()).to(self.weight.dtype)


def _matches(fqn: str, patterns: list[str]) -> bool:
    """A pattern names a module by its full name or its last part (``wq``, ``layers.0.*``, ``*.mlp.w?``)."""
    last = fqn.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(fqn, p) or fnmatch.fnmatchcase(last, p) for p in patterns)


def apply_lora(model: nn.Module, config: Any) -> None:
    """Swap every ``nn.Linear`` whose name matches ``config.target_modules`` for a :class:`LoRALinear` (on the
    meta model, before parallelization) and mark what trains (:func:`mark_trainable`). Only plain linears are
    targets. Patterns that match nothing are listed (the default names both families' layers); none matching
    anything is a ConfigError."""
    targets = {
        fqn: m
        for fqn, m in model.named_modules()
        if type(m) is nn.Linear and fqn and _matches(fqn, config.target_modules)
    }
    if not targets:
        linears = sorted({fqn.rsplit(".", 1)[-1] for fqn, m in model.named_modules() if type(m) is nn.Linear})
        raise ConfigError(
            f"lora.target_modules {config.target_modules} match no linear layer of this model; "
            f"its linear layers are named {', '.join(linears)}"
        )
    unused = [p for p in config.target_modules if not any(_matches(fqn, [p]) for fqn in targets)]
    if unused:
        logger.info(f"lora.target_modules not in this model: {', '.join(unused)}")
    for fqn, base in targets.items():
        parent_name, _, name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = LoRALinear(
            base.in_features, base.out_features, base.bias is not None, config.rank, config.alpha, config.dropout,
            device=base.weight.device, dtype=base.weight.dtype,
        )  # fmt: skip
        lora.weight = base.weight
        if base.bias is not None:
            lora.bias = base.bias
        parent.register_module(name, lora)
    mark_trainable(model, config)
    logger.info(f"LoRA rank {config.rank} (alpha {config.alpha}) on {len(targets)} linear layers")


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def mark_trainable(model: nn.Module, config: Any) -> None:
    """Adapters train; with ``train_embeddings`` the embeddings and output head, with ``train_norms`` the norms;
    every other parameter is frozen (no gradient, no optimizer state, no gradient reduction)."""
    for fqn, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        train_all = (config.train_embeddings and (isinstance(module, nn.Embedding) or fqn == "output")) or (
            config.train_norms and _is_norm(module)
        )
        for name, p in own.items():
            p.requires_grad_(train_all or (isinstance(module, LoRALinear) and name in ADAPTER_NAMES))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, LoRALinear)}


def shard_adapters(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """After the tensor-parallel plan: shard each adapter consistently with its base layer, so the update needs no
    collective of its own. Colwise base (``W`` rows sharded): ``A`` replicated, ``B`` rows sharded (the update
    lands on this rank's output columns). Rowwise base (``W`` columns sharded): ``A`` columns sharded, ``B``
    replicated (the update is a partial sum reduced with the base output). Runs on the meta model."""
    for module in lora_modules(model).values():
        w = module.weight
        placement = w.placements[0] if isinstance(w, DTensor) else Replicate()
        if placement == Shard(0):
            layouts = {"lora_a": Replicate(), "lora_b": Shard(0)}
        elif placement == Shard(1):
            layouts = {"lora_a": Shard(1), "lora_b": Replicate()}
        else:
            layouts = {"lora_a": Replicate(), "lora_b": Replicate()}
        for name, layout in layouts.items():
            old = getattr(module, name)
            full = torch.empty(old.shape, dtype=old.dtype, device="meta")
            new = nn.Parameter(distribute_tensor(full, tp_mesh, [layout]), requires_grad=old.requires_grad)
            module.register_parameter(name, new)


@torch.no_grad()
def init_adapters(model: nn.Module, draw_uniform: Callable[[torch.Tensor, str, float], None]) -> None:
    """``B = 0`` (step 0 is the base model) and ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (``nn.Linear``'s default), drawn
    by ``draw_uniform(param, fqn, bound)`` so that the draw does not depend on the parallel layout."""
    for fqn, module in lora_modules(model).items():
        draw_uniform(module.lora_a, f"{fqn}.lora_a", 1 / math.sqrt(module.in_features))
        b = module.lora_b
        (b.to_local() if isinstance(b, DTensor) else b).zero_()


@torch.no_grad()
def merge_adapters(model: nn.Module) -> int:
    """Replace every :class:`LoRALinear` by a plain ``nn.Linear`` holding ``W + scaling * B A`` (one process,
    plain tensors). Returns how many layers were merged."""
    merged = lora_modules(model)
    for fqn, module in merged.items():
        parent_name, _, name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None,
            device=module.weight.device, dtype=module.weight.dtype,
        )  # fmt: skip
        linear.weight.copy_(module.merged_weight())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        parent.register_module(name, linear)
    return len(merged)


def parameter_counts(model: nn.Module, optimizer_states: int = 2) -> dict[str, float]:
    """Trainable and total parameters (whole model: a DTensor counts globally) and the optimizer state LoRA saves,
    in GiB (``optimizer_states`` fp32 tensors per trainable parameter: 2 for Adam/AdamW)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "trainable_params": trainable,
        "total_params": total,
        "optimizer_gib_saved": (total - trainable) * 4 * optimizer_states / 2**30,
    }


def parameter_summary(counts: dict[str, float]) -> str:
    """One log line of :func:`parameter_counts`."""
    trainable, total = counts["trainable_params"], counts["total_params"]
    return (
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%); optimizer "
        f"state {counts['optimizer_gib_saved']:.3f} GiB smaller than for full fine-tuning (whole model, all ranks)"
    )


def refuse_unmerged(step_dir: str | Path) -> None:
    """A LoRA run's step folder is not a model (adapters only, or base and adapters apart): tools that need the whole
    model (score, generate, the exporters) ask for the merge instead of reading a model without its adapters."""
    try:
        lora = json.loads((Path(step_dir) / "job_config.json").read_text()).get("lora", {})
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return  # no (readable) record of a LoRA run: a converter output or another tool's checkpoint
    if isinstance(lora, dict) and lora.get("enable") is True:
        raise UserError(
            f"{step_dir} is a LoRA checkpoint (adapters apart from the base weights); merge it first: "
            f"python -m torchtitan_hyena.merge_lora --input_dir {step_dir} --output_dir MERGED, then use MERGED"
        )
