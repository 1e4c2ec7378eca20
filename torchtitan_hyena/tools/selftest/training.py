"""Whole-model checks through the trainer's own set-up: a compiled training step of each debug flavor against eager,
model throughput (tokens/s, MFU, peak memory) next to the dry run's predicted peak, and, on a multi-device launch, the
communication self-test's bandwidth table.

Models are built by :func:`build_trainer` only, the one place this tool reaches into set-up, so a change in how the
project builds a run reaches the self-test unchanged.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from torchtitan_hyena.components.dataloader import batch_to_device
from torchtitan_hyena.config import ConfigManager, JobConfig
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.distributed.warmup import warm_up
from torchtitan_hyena.tools import comm_check, dry_run
from torchtitan_hyena.tools.flops import get_peak_flops
from torchtitan_hyena.tools.selftest.plan import Model, Plan
from torchtitan_hyena.tools.selftest.report import GIB, Report
from torchtitan_hyena.train import Trainer

T = TypeVar("T")

# Every run: random tokens (no data on disk), no checkpoints or logs; the dump folder is a temporary one.
COMMON = [
    "--job.print_config", "false",
    "--metrics.enable_tensorboard", "false",
    "--checkpoint.enable", "false",
    "--validation.enable", "false",
    "--training.dataset", "mock",
    "--training.deterministic", "false",
    "--lr_scheduler.warmup_steps", "1",
]  # fmt: skip


def build_trainer(config: JobConfig) -> Trainer:
    """The self-test's one coupling to set-up: a run built exactly as ``python -m torchtitan_hyena.train`` builds it
    (validation, process group, mesh, meta model, float8, parallelize and compile, init, optimizer)."""
    return Trainer(config)


def job_config(args: list[str], dump_folder: str) -> JobConfig:
    return ConfigManager().parse_args([*COMMON, *args, "--job.dump_folder", dump_folder])


def with_trainer(args: list[str], fn: Callable[[Trainer], T]) -> T:
    """``fn`` of a trainer built for ``args`` on fresh compile caches; the trainer and its device memory are released
    before this returns, so the next one (and its peak memory) starts clean."""
    torch._dynamo.reset()  # the blocks of every model share code objects: no recompile limits, no stale guards
    with tempfile.TemporaryDirectory(prefix="selftest-") as dump:
        trainer = build_trainer(job_config(args, dump))
        try:
            return fn(trainer)
        finally:
            trainer.close()
            del trainer
            torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()


def run_steps(trainer: Trainer, steps: int) -> list[tuple[float, float, float]]:
    """(loss, grad norm, seconds) of ``steps`` optimizer steps; the seconds exclude fetching the batch."""
    data = iter(trainer.dataloader)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else lambda: None
    records = []
    for _ in range(steps):
        batch = [batch_to_device(next(data), trainer.device) for _ in range(trainer.dataloader.accumulation_steps)]
        sync()
        start = time.perf_counter()
        loss, grad_norm, _ = trainer.train_step(batch)
        records.append((loss.item(), grad_norm.item(), time.perf_counter() - start))
    return records


def check_compiled_steps(report: Report, plan: Plan) -> None:
    """Per model: fp32 steps of two sequences, compiled and eager from the same seed; every loss and grad norm within
    ``plan.train_rtol`` (fusion reorders float sums; a wrong graph differs by orders of magnitude more)."""
    steps = plan.train_steps
    for model in plan.train_models:
        args = [*model.args(plan.train_seq_len, 2, steps), "--training.mixed_precision_param", "float32"]
        runs = []
        for compiled in (False, True):
            flags = ["--compile.enable", str(compiled).lower(), "--compile.backend", plan.compile_backend]
            runs.append(with_trainer([*args, *flags], lambda t: [r[:2] for r in run_steps(t, steps)]))
        worst = max(abs(c - e) / abs(e) for cs, es in zip(*runs) for c, e in zip(cs, es))
        name = f"{model.name}: {steps} steps compiled ({plan.compile_backend}) vs eager"
        ok = worst <= plan.train_rtol
        report.check("correctness", name, ok, f"worst rel diff {worst:.1e} <= {plan.train_rtol:g}", rel_diff=worst)


def device_budget(device: torch.device) -> str:
    """This device's memory for the dry run's verdict, in GiB (the machine's memory on CPU)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{total / GIB:.2f}"


def throughput_args(plan: Plan, model: Model, ac: str, steps: int) -> list[str]:
    return [
        *model.args(plan.seq_len, 1, steps), "--training.mixed_precision_param", plan.dtype,
        "--activation_checkpoint.mode", ac, "--compile.enable", str(plan.compile_throughput).lower(),
        "--model.attention_backend", "auto",
    ]  # fmt: skip


def predict_peaks(plan: Plan, device: torch.device, world: int) -> dict[tuple[Model, str], dry_run.MemoryReport]:
    """The dry run's memory report of every throughput run (it needs a process without a process group)."""
    with tempfile.TemporaryDirectory(prefix="selftest-") as dump:
        return {
            (m, ac): dry_run.dry_run(job_config(throughput_args(plan, m, ac, 1), dump), world, device_budget(device))
            for m in plan.models
            for ac in plan.ac_modes
        }


def measure_throughput(report: Report, plan: Plan, predicted: dict[tuple[Model, str], dry_run.MemoryReport]) -> None:
    """Tokens/s per device, MFU (the model's training FLOPs per token over the device's peak bf16 FLOP/s) and the
    peak memory allocated during the timed steps, next to the dry run's prediction for the same run (parameters,
    gradients, optimizer state, FSDP buffers, activations; its 10 % runtime reserve left out)."""
    for model in plan.models:
        for ac in plan.ac_modes:
            prediction = predicted.get((model, ac))  # none when the dry run failed (a failed row of its own)
            row = {"model": model.name, "seq_len": plan.seq_len, "dtype": plan.dtype, "AC": ac,
                   "compile": plan.compile_throughput}  # fmt: skip
            if prediction is not None:
                row["dry_run_peak_gib"] = (prediction.total_bytes - prediction.reserve_bytes) / GIB
            if prediction is not None and not prediction.fits:
                row["error"] = f"skipped: the dry run predicts {prediction.total_bytes / GIB:.1f} GiB with reserve"
                report.add("throughput", row)
                continue
            try:
                args = throughput_args(plan, model, ac, plan.warmup_steps + plan.timed_steps)
                row.update(with_trainer(args, lambda t: _timed(t, plan)))
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            report.add("throughput", row)


def _timed(trainer: Trainer, plan: Plan) -> dict[str, float | None]:
    run_steps(trainer, plan.warmup_steps)  # compile, autotuning, allocator warm-up
    gpu = trainer.device.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    seconds = sum(r[2] for r in run_steps(trainer, plan.timed_steps)) / plan.timed_steps
    tokens_per_s = plan.seq_len / seconds  # one sequence per device and step
    peak_flops = get_peak_flops(trainer.device)
    return {
        "step_s": seconds,
        "tokens_per_s": tokens_per_s,
        "mfu_pct": 100 * trainer.flops_per_token * tokens_per_s / peak_flops if peak_flops else None,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB if gpu else None,
        "reserved_gib": torch.cuda.max_memory_reserved() / GIB if gpu else None,
    }


def measure_comm(report: Report, plan: Plan, device: torch.device) -> None:
    """``tools/comm_check``'s bus bandwidth over all ranks of the launch (one flat data-parallel dimension)."""
    world = dist.get_world_size()
    layout = ParallelDims(dp_replicate=1, dp_shard=world, cp=1, tp=1, world_size=world)
    layout.build_mesh(device.type)
    warm_up(layout, device, 120)
    for record in comm_check.measure(layout, device, [int(s * 2**20) for s in plan.comm_sizes_mib], plan.comm_iters):
        row = {k: record[k] for k in ("dimension", "group_size", "nodes_per_group")}
        row["MiB"] = record["size_bytes"] / 2**20
        row.update({f"{op}_busbw_GBps": record[op]["busbw_gbps"] for op in comm_check.OPS})
        report.add("communication", row)
