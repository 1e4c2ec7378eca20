"""Measure one steady-state train step of a layout: collective bytes per mesh dimension and peak memory per rank.

    torchrun --standalone --nproc_per_node N -m tests.helpers.plan_measure OUT.json -- <train args...>
    torchrun --standalone --nproc_per_node N -m tests.helpers.plan_measure OUT.json RUNS.json

RUNS.json (a list of argument lists) measures several layouts in one job (one process group); OUT.json then holds
one list of records per run.

The run trains ``training.steps`` (>= 2) steps; step 2 (optimizer state exists, warm-up collectives are done) runs
inside :func:`count_collectives` (the world mesh, its flattened views and ``ParallelDims.named_meshes()``) and
torch's ``MemTracker``, over the whole ``Trainer.train_step``: forward, backward (or the pipeline schedule), gradient
clipping and the optimizer step. Rank 0 writes OUT.json, a list indexed by rank of
``{"rank", "mesh", "collectives": {"dim/op": {"bytes", "calls"}}, "peak_bytes", "peak_breakdown"}``; byte
definitions: ``torchtitan_hyena/distributed/comm_counter.py``. Memory counts tensor storages only (MemTracker: the
parameters, optimizer states and live tensors it sees), not the allocator's caching or fragmentation.
``context_parallel_sent`` is the context-parallel collectives' own count (``track_communication``: bytes sent to
other ranks, e.g. (n - 1) x the shard for an all-gather), which tells their share of the CP dimension's traffic apart
from FSDP's when both use one group.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._tools.mem_tracker import MemTracker

from tests.helpers import run_worker
from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.distributed.comm_counter import count_collectives
from torchtitan_hyena.distributed.context_parallel.collectives import track_communication
from torchtitan_hyena.train import Trainer

MEASURED_STEP = 2
# MemTracker's reference types -> the planner's categories
_CATEGORIES = {
    "Parameter": "parameters",
    "Gradient": "gradients",
    "Optstate": "optimizer_state",
    "Activation": "activations",
    "Temp": "temporaries",
    "Buffer": "buffers",
    "Other": "other",
}


class StepMemTracker(MemTracker):
    """MemTracker over a step of several forwards (microbatches, pipeline chunks): MemTracker refuses a root
    module's second forward, so that starts its per-module statistics afresh; only the global peak is read."""

    def _pre_fw_hook(self, module: torch.nn.Module, inputs: Any) -> None:
        tracker = self._mod_tracker
        parents = set(tracker.parents) - {tracker.get_known_fqn(module)}
        if module in self.memory_tracking and not tracker.is_bw and parents == {"Global"}:
            self.reset_mod_stats()
        super()._pre_fw_hook(module, inputs)


def measure_step(trainer: Trainer, record: dict[str, Any]) -> None:
    """Wrap ``trainer.train_step`` so that step :data:`MEASURED_STEP` fills ``record``."""
    step = trainer.train_step
    dims = trainer.setup.parallel_dims
    mesh = dims.world_mesh

    def measured(microbatches):
        if trainer.state.step != MEASURED_STEP:
            return step(microbatches)
        tracker = StepMemTracker()
        tracker.track_external(*trainer.model_parts, *trainer.optimizers.optimizers)
        with tracker, count_collectives(mesh, dims.named_meshes()) as counts, track_communication() as cp:
            out = step(microbatches)
        (peak,) = tracker.get_tracker_snapshot("peak").values()  # one device per rank
        record["collectives"] = counts.summary()
        record["context_parallel_sent"] = dict(cp)
        record["peak_bytes"] = peak.get("Total", 0)
        record["peak_breakdown"] = {name: peak.get(key, 0) for key, name in _CATEGORIES.items()}
        return out

    trainer.train_step = measured


def main() -> None:
    out_path = Path(sys.argv[1])
    args = sys.argv[2:]
    if args[:1] == ["--"]:
        results = measure_run(args[1:])
    else:
        results = [measure_run(run) for run in json.loads(Path(args[0]).read_text())]
    if dist.get_rank() == 0:
        out_path.write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def measure_run(args: list[str]) -> list[Any]:
    """Every rank's record of one layout's measured step."""
    trainer = Trainer(ConfigManager().parse_args(args))
    mesh = trainer.setup.parallel_dims.world_mesh
    record: dict[str, Any] = {
        "rank": dist.get_rank(),
        "mesh": dict(zip(mesh.mesh_dim_names or (), mesh.shape)),
    }
    measure_step(trainer, record)
    try:
        trainer.train()
    finally:
        trainer.close()
    if "collectives" not in record:
        raise SystemExit(f"step {MEASURED_STEP} did not run: set --training.steps >= {MEASURED_STEP}")
    records: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    return records


if __name__ == "__main__":
    run_worker(main)
