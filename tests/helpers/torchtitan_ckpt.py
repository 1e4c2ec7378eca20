"""Step folders as TorchTitan 0.2 (and gpt-neuro) write them, without installing TorchTitan: model FQNs at the top
level, the flattened optimizer state under ``optimizer``, the whole LambdaLR state under ``lr_scheduler``, the loader
state as a pickle per data-parallel rank under ``dataloader``, ``train_state`` {step, ntokens_seen}; no
``model_args.json``, ``job_config.json`` or completion marker."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp


def save_torchtitan_step(
    folder: Path,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any] | None = None,
    step: int = 0,
    lr: float = 0.0,
) -> Path:
    state: dict[str, Any] = dict(model)
    if optimizer is not None:
        state["optimizer"] = optimizer
    state["lr_scheduler"] = {"base_lrs": [lr], "last_epoch": step, "_step_count": step + 1, "_is_initial": False,
                             "_get_lr_called_within_step": False, "_last_lr": [lr], "lr_lambdas": [{}]}  # fmt: skip
    state["dataloader"] = {"dp_rank_0": pickle.dumps({"_num_yielded": step}), "world_size": 1}
    state["train_state"] = {"step": step, "ntokens_seen": 0}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder
