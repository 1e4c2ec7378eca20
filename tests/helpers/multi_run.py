"""Run several training configs inside one torchrun job and record rank 0's per-step losses.

    torchrun --nproc_per_node N -m tests.helpers.multi_run RUNS.json OUT.json [GRADS_DIR]

RUNS.json is a list of argument lists (as for ``python -m torchtitan_hyena.train``); OUT.json gets one
``{"losses", "grad_norms", "steps"}`` per run. Reusing one process group for many configs keeps multi-process
tests affordable on a 2-core machine. With GRADS_DIR, rank 0 also saves every parameter's whole gradient after
step 1 of run i as ``GRADS_DIR/i.pt``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tests.helpers import run_worker
from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.distributed.utils import clean_fqn
from torchtitan_hyena.train import Trainer


def save_first_gradients(trainer: Trainer, path: Path) -> None:
    """After the first train_step, gather every gradient (a collective) and save them from rank 0."""
    step = trainer.train_step

    def first_step(microbatches):
        out = step(microbatches)
        if trainer.state.step == 1:
            grads = {}
            for name, p in trainer.model_parts[0].named_parameters():
                g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                grads[clean_fqn(name)] = g.detach().cpu()
            if dist.get_rank() == 0:
                torch.save(grads, path)
        return out

    trainer.train_step = first_step


def record_grad_norms(trainer: Trainer) -> list[float]:
    """The global gradient norm (before clipping) of every step, filled in as the run goes."""
    norms: list[float] = []
    step = trainer.train_step

    def recorded(microbatches):
        out = step(microbatches)
        norms.append(out[1].item())
        return out

    trainer.train_step = recorded
    return norms


def log_time(args: list[str], build_s: float, train_s: float) -> None:
    """With TORCHTITAN_HYENA_RUN_TIMES=FILE, rank 0 appends each run's set-up and training seconds: where the
    suite's multi-process time goes."""
    path = os.environ.get("TORCHTITAN_HYENA_RUN_TIMES")
    if path and dist.get_rank() == 0:
        record = {"ranks": dist.get_world_size(), "build_s": round(build_s, 2), "train_s": round(train_s, 2),
                  "test": os.environ.get("PYTEST_CURRENT_TEST", ""), "args": args}  # fmt: skip
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def main() -> None:
    runs = json.loads(Path(sys.argv[1]).read_text())
    grads_dir = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    results = []
    for i, args in enumerate(runs):
        start = time.perf_counter()
        trainer = Trainer(ConfigManager().parse_args(args))
        built = time.perf_counter()
        if grads_dir is not None:
            save_first_gradients(trainer, grads_dir / f"{i}.pt")
        grad_norms = record_grad_norms(trainer)
        try:
            losses = trainer.train()
            results.append({"losses": losses, "grad_norms": grad_norms, "steps": trainer.state.step})
        finally:
            trainer.close()
        log_time(args, built - start, time.perf_counter() - built)
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    run_worker(main)
