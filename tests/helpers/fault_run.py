"""Run training scenarios with injected faults in one torchrun job and record what every rank saw.

    torchrun --nproc_per_node N -m tests.helpers.fault_run SCENARIOS.json OUT.json

Each scenario is ``{"args": [...], "signal": {"rank": r, "step": k, "signum": "SIGUSR1"} | null,
"nan": {"rank": r, "steps": [k, ...]} | null}``. The signal is a real one: rank r sends it to itself
while step k runs, through the trainer's handler. NaNs are injected into rank r's logits at the listed
steps. OUT.json holds, per scenario, one record per rank.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tests.helpers import run_worker
from torchtitan_hyena.components.resilience import NonFiniteLossError
from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.train import Trainer


def _first_param(trainer: Trainer) -> torch.Tensor:
    p = next(trainer.model_parts[0].parameters())
    return (p.to_local() if isinstance(p, DTensor) else p).detach().clone()


def run_scenario(scenario: dict) -> dict:
    trainer = Trainer(ConfigManager().parse_args(scenario["args"]))
    rank = dist.get_rank()
    sig, nan = scenario.get("signal"), scenario.get("nan")
    unchanged: list[int] = []
    forward, train_step = trainer.forward, trainer.train_step

    def faulty_forward(model, batch):
        logits = forward(model, batch)
        if nan and rank == nan["rank"] and trainer.state.step in nan["steps"]:
            logits = logits * float("nan")
        return logits

    def watched_step(microbatches):
        before = _first_param(trainer)
        if sig and rank == sig["rank"] and trainer.state.step == sig["step"]:
            os.kill(os.getpid(), getattr(signal, sig["signum"]))
        out = train_step(microbatches)
        if torch.equal(before, _first_param(trainer)):
            unchanged.append(trainer.state.step)
        return out

    trainer.forward, trainer.train_step = faulty_forward, watched_step
    losses, error = None, None
    try:
        losses = trainer.train()
    except NonFiniteLossError as e:
        error = str(e)
    finally:
        trainer.close()
    return {
        "rank": rank,
        "step": trainer.state.step,
        "preempted": trainer.preempted,
        "error": error,
        "skipped": trainer.nonfinite.skipped,
        "unchanged_steps": unchanged,
        "losses": losses,
    }


def main() -> None:
    scenarios = json.loads(Path(sys.argv[1]).read_text())
    results = []
    for scenario in scenarios:
        record = run_scenario(scenario)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, record)
        results.append(gathered)
    if dist.get_rank() == 0:
        Path(sys.argv[2]).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    run_worker(main)
