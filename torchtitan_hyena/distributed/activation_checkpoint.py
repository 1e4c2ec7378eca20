"""Activation checkpointing: full, every N-th block, or per-op selective (SAC)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from torchtitan_hyena.tools.logging import logger

_aten = torch.ops.aten


def _save_list() -> set:
    """Ops whose outputs per-op SAC keeps: matmuls (every other one), attention and collectives."""
    ops = {_aten.mm.default, _aten.max.default}
    for name in (
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    ):
        if hasattr(_aten, name):
            ops.add(getattr(_aten, name).default)
    if hasattr(torch.ops, "_c10d_functional"):
        ops.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)
    return ops


def _op_sac_context():
    save = _save_list()
    counts: dict[str, int] = defaultdict(int)

    def policy(ctx, func, *args, **kwargs):
        mode = "recompute" if ctx.is_recompute else "forward"
        if func == _aten.mm.default:
            counts[mode] += 1
            # Recompute every second matmul: half the activation memory of saving all of them.
            if counts[mode] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if func in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_ac(layers: nn.ModuleDict, mode: str, selective_option: str) -> None:
    """Wrap the blocks of ``layers`` in place according to ``activation_checkpoint.mode``."""
    if mode == "none":
        return
    every = int(selective_option) if mode == "selective" and selective_option != "op" else 1
    for i, (name, block) in enumerate(list(layers.items())):
        if mode == "selective" and selective_option == "op":
            wrapped = checkpoint_wrapper(block, context_fn=_op_sac_context, preserve_rng_state=False)
        elif i % every == 0:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            continue
        layers[name] = wrapped
    detail = f" ({selective_option})" if mode == "selective" else ""
    logger.info(f"activation checkpointing: {mode}{detail}")
