"""Save under one layout, resume under another, in one 4-rank torchrun job; check the resumed state bit for bit.

    torchrun --nproc_per_node 4 -m tests.helpers.pp_resume OUT.json DUMP_ROOT ARGS...

For each family config in ARGS (``--job.config_file`` values): train 1 step under pipeline 2 x FSDP 2 and save,
resume under FSDP 4 (every model and optimizer tensor compared with the saved run's), train 1 more step and save,
resume under pipeline 2 x FSDP 2 again and compare. Tensors are compared by a hash of their whole (gathered) bytes,
collected from every rank: a pipeline rank holds only its stages' tensors.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tests.helpers import run_worker
from torchtitan_hyena.components.checkpoint import model_state_dict
from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.train import Trainer

COMMON = [
    "--job.print_config", "false",
    "--training.seq_len", "64",
    "--training.local_batch_size", "1",
    "--training.global_batch_size", "-1",
    "--training.mixed_precision_param", "float32",
    "--training.deterministic", "true",
    "--metrics.enable_tensorboard", "false",
    "--validation.enable", "false",
    "--checkpoint.enable", "true",
    "--checkpoint.interval", "1000",
    "--checkpoint.last_save_model_only", "false",
    "--checkpoint.exclude_from_loading", "dataloader",  # the data-parallel degree changes
]  # fmt: skip
PP2_FSDP2 = ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_schedule", "GPipe"]
FSDP4: list[str] = []


def fingerprint(value: Any) -> Any:
    if isinstance(value, DTensor):
        value = value.full_tensor()
    if torch.is_tensor(value):
        return f"{tuple(value.shape)} {value.dtype} " + hashlib.sha1(value.detach().cpu().numpy().tobytes()).hexdigest()
    return repr(value)


def state_fingerprints(trainer: Trainer) -> dict[str, str]:
    """Every model and optimizer entry of the whole model (all ranks' stages), by checkpoint key."""
    mine = {f"model.{k}": fingerprint(v) for k, v in model_state_dict(trainer.model_parts).items()}
    mine.update({f"optimizer.{k}": fingerprint(v) for k, v in trainer.optimizers.state_dict().items()})
    everyone: list[dict[str, str]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, mine)
    merged: dict[str, str] = {}
    for part in everyone:
        for k, v in part.items():
            if merged.setdefault(k, v) != v:  # a tied copy on two stages must be equal too
                merged[k] = "differs between ranks"
    return merged


def run(args: list[str], steps: int) -> tuple[Trainer, dict[str, str]]:
    trainer = Trainer(ConfigManager().parse_args([*args, "--training.steps", str(steps)]))
    resumed = state_fingerprints(trainer)
    trainer.train()
    return trainer, resumed


def compare(saved: dict[str, str], resumed: dict[str, str]) -> list[str]:
    keys = sorted(set(saved) | set(resumed))
    return [k for k in keys if saved.get(k) != resumed.get(k)]


def main() -> None:
    out, root, configs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    results = {}
    for config in configs:
        base = ["--job.config_file", config, *COMMON, "--job.dump_folder", str(root / Path(config).stem)]
        first, _ = run([*base, *PP2_FSDP2], 1)
        saved_pp = state_fingerprints(first)
        first.close()
        second, resumed_fsdp = run([*base, *FSDP4], 2)
        saved_fsdp = state_fingerprints(second)
        second.close()
        third = Trainer(ConfigManager().parse_args([*base, *PP2_FSDP2, "--training.steps", "3"]))
        resumed_pp = state_fingerprints(third)
        third.close()
        results[config] = {
            "entries": len(saved_pp),
            "pp_to_fsdp": compare(saved_pp, resumed_fsdp),
            "fsdp_to_pp": compare(saved_fsdp, resumed_pp),
            "steps_moved_the_state": saved_pp != saved_fsdp,
        }
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    run_worker(main)
