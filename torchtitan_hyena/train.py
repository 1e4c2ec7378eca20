"""The trainer: ``python -m torchtitan_hyena.train --job.config_file X.toml [--section.key value ...]``.

Readable top to bottom: set up (``build.py``: validate -> mesh -> warm-up -> context parallelism), data, model
(``build.py``: meta -> float8 -> parallelize -> init), optimizer, checkpoint; then loop (fetch microbatches ->
forward/backward -> clip -> step -> log -> checkpoint -> validate).
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from torchtitan_hyena import build
from torchtitan_hyena.components.checkpoint import CheckpointManager
from torchtitan_hyena.components.dataloader import batch_to_device
from torchtitan_hyena.components.datasets.base import IGNORE_INDEX
from torchtitan_hyena.components.lora import parameter_counts
from torchtitan_hyena.components.metrics import MetricsProcessor
from torchtitan_hyena.components.resilience import EXIT_PREEMPTED, NonFiniteGuard, StopSignals
from torchtitan_hyena.components.validate import Validator
from torchtitan_hyena.config import ConfigManager, JobConfig, config_table
from torchtitan_hyena.config.manager import to_dict
from torchtitan_hyena.distributed.float8 import describe_accelerator, precompute_float8_scales
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.distributed.utils import clip_grad_norm_, dist_sum, local_device, set_determinism, set_pg_timeout
from torchtitan_hyena.errors import run_cli
from torchtitan_hyena.tools import dry_run
from torchtitan_hyena.tools.flops import get_peak_flops
from torchtitan_hyena.tools.logging import init_logger, logger
from torchtitan_hyena.tools.profiling import maybe_enable_memory_snapshot, maybe_enable_profiling
from torchtitan_hyena.tools.world_size import required_world_size


class TrainState:
    """Progress counters, checkpointed with the rest of the state."""

    def __init__(self) -> None:
        self.step = 0
        self.ntokens_seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.ntokens_seen = int(state_dict["ntokens_seen"])


class Trainer:
    def __init__(self, job_config: JobConfig) -> None:
        self.job_config = c = job_config
        init_logger()
        self.setup = build.setup(c)  # validation, process group, mesh and its warm-up, context parallelism
        self.rank = dist.get_rank()
        if self.rank == 0 and c.job.print_config:
            logger.info("resolved config:\n" + config_table(c))
        set_determinism(c.training.seed, c.training.deterministic)
        s, t = self.setup, c.training
        self.device, self.cp, self.dp_rank = s.device, s.cp, s.parallel_dims.dp_rank()

        # Data: everything that can reject user input comes before the model.
        tokenizer = build.build_tokenizer(s)
        self.dataloader = build.build_dataloader(s, tokenizer)
        self.validator = None
        if c.validation.enable:
            self.validator = Validator(
                build.build_dataloader(s, tokenizer, validation=True),
                s.spec.build_loss_fn(c),
                c.validation.steps,
                self.device,
                s.loss_group(),
                prepare_batch=s.prepare_batch,
                pp_group=s.pp_group(),
                batch_size=t.local_batch_size if s.parallel_dims.pp_enabled else None,
            )

        built = build.build_model(s)
        self.model_parts, self.pipeline = built.model_parts, built.pipeline
        self.nparams, self.flops_per_token = built.nparams, built.flops_per_token
        self.optimizers = s.spec.build_optimizers_fn(self.model_parts, c.optimizer)
        self.lr_schedulers = s.spec.build_lr_schedulers_fn(self.optimizers, c.lr_scheduler, t.steps)
        self.loss_fn = s.spec.build_loss_fn(c)
        self.state = TrainState()
        self.dump_folder = Path(c.job.dump_folder)
        self.checkpointer = CheckpointManager(
            config=c.checkpoint,
            dump_folder=self.dump_folder,
            model_parts=self.model_parts,
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            dataloader=self.dataloader,
            train_state=self.state,
            model_info=(c.model.name, c.model.flavor, s.model_args),
            job_config_dict=to_dict(c),
            frozen_base=c.lora.enable,
            save_frozen=not c.lora.enable or c.lora.save_base_weights,
        )
        self.nonfinite = NonFiniteGuard(t.on_nonfinite_loss, t.max_nonfinite_skips, self.checkpointer)
        self.stop_signals = StopSignals()
        self.preempted = False
        self.stop_signals.install()  # before the (long) resume: a signal during it stops after the first step
        # Resume (or seed) before anything is written, so a bad checkpoint leaves no trace on disk.
        self.state.step = self.checkpointer.load()
        self.metrics = MetricsProcessor(
            dump_folder=self.dump_folder,
            enable_tensorboard=c.metrics.enable_tensorboard,
            tb_folder=c.metrics.save_tb_folder,
            is_writer=self.rank == 0,
            flops_per_token=self.flops_per_token,
            peak_flops=get_peak_flops(self.device),
            world_size=dist.get_world_size(),
            device=self.device,
            total_steps=t.steps,
            constants=parameter_counts(torch.nn.ModuleList(self.model_parts))
            if c.lora.enable
            else None,  # PP: this rank's
        )

    # ------------------------------------------------------------------ the loop
    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.setup.forward(model, batch)

    def train_step(self, microbatches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimizer step over this rank's microbatches. Returns (global loss, grad norm, tokens).

        The loss is a sum over tokens divided by the token count of the whole global batch, so the
        gradient is the same however the batch is split over ranks and accumulation steps. Under pipeline
        parallelism the schedule runs forward and backward; the loss exists on the last stage and is summed over
        the pipeline ranks for logging.
        """
        self.optimizers.zero_grad()
        microbatches = [self.setup.prepare_batch(mb) for mb in microbatches]
        local_tokens = sum((mb["labels"] != IGNORE_INDEX).sum() for mb in microbatches)
        global_tokens = dist_sum(local_tokens.to(torch.float64), self.setup.loss_group())
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        model, pipeline = self.model_parts[0], self.pipeline
        for mb in microbatches:
            with self.setup.loss_parallel():
                if pipeline is not None:
                    with self.setup.autocast():
                        loss_sum += pipeline.step(mb, self.loss_fn, global_tokens.to(torch.float32))
                    continue
                logits = self.forward(model, mb)
                loss = self.loss_fn(logits, mb["labels"], mb.get("loss_weights")) / global_tokens.to(torch.float32)
                del logits
                loss.backward()
            loss_sum += loss.detach().to(torch.float64)
        loss = dist_sum(loss_sum, self.setup.loss_group())
        params = [p for m in self.model_parts for p in m.parameters()]
        if pipeline is not None:
            loss = dist_sum(loss, self.setup.pp_group())
            pipeline.sync_tied_grads()
            norm_kwargs = dict(stages=self.setup.parallel_dims.pp, counted_elsewhere=pipeline.counted_elsewhere())
        else:
            norm_kwargs = {}
        grad_norm = clip_grad_norm_(params, self.job_config.training.max_norm, **norm_kwargs)
        self.last_lr = self.lr_schedulers.get_last_lr()
        if self.nonfinite.should_skip(self.state.step, loss, grad_norm):
            self.optimizers.zero_grad()  # the schedule still advances: lr stays a function of the step
        else:
            self.checkpointer.wait_for_staging()
            self.optimizers.step()
            f8 = self.job_config.float8
            if f8.enable and f8.precompute_float8_dynamic_scale_for_fsdp:
                precompute_float8_scales(self.model_parts)
        self.lr_schedulers.step()
        return loss, grad_norm, int(global_tokens.item())

    def _pipeline_validation_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pipeline schedule's forward of a validation batch: the summed loss on the last stage, else zero."""
        with self.setup.autocast():
            return self.pipeline.evaluate(batch, self.loss_fn)

    def _seed_step(self, step: int) -> None:
        """Per-step RNG state (dropout): a pure function of (seed, step, dp rank, cp rank), so resume reproduces it
        (context-parallel ranks hold different tokens, so their dropout masks must differ too)."""
        stream = self.dp_rank if self.cp is None else self.dp_rank * self.cp.degree + self.cp.rank
        torch.manual_seed((self.job_config.training.seed * 1_000_003 + step) * 4099 + stream)

    def train(self) -> list[float]:
        c = self.job_config
        losses: list[float] = []
        data_iter = iter(self.dataloader)
        accumulation = self.dataloader.accumulation_steps
        gc.disable()
        self.metrics.reset_timer(self.state.ntokens_seen)
        logger.info(
            f"training {c.model.name}/{c.model.flavor} from step {self.state.step} to {c.training.steps}: "
            f"global batch {self.setup.global_batch} x {c.training.seq_len} tokens, {accumulation} accumulation "
            f"step(s), {self.setup.parallel_dims.dp_degree} data-parallel rank(s)"
        )
        with (
            maybe_enable_profiling(c.profiling, self.dump_folder, self.state.step) as profiler,
            maybe_enable_memory_snapshot(c.profiling, self.dump_folder, self.state.step, self.device) as snapshot,
        ):
            last = c.training.steps if c.training.stop_at_step < 0 else min(c.training.stop_at_step, c.training.steps)
            while self.state.step < last:
                self.state.step += 1
                step = self.state.step
                if step % c.training.gc_freq == 0:
                    gc.collect(1)
                microbatches = [batch_to_device(next(data_iter), self.device) for _ in range(accumulation)]
                self._seed_step(step)
                loss, grad_norm, tokens = self.train_step(microbatches)
                self.state.ntokens_seen += tokens
                losses.append(loss.item())
                self.metrics.step_done()
                if step == 1:
                    set_pg_timeout(c.comm.train_timeout_seconds)
                stop = self.stop_signals.agreed()
                if step % c.metrics.log_freq == 0 or step == last or stop:
                    self.metrics.log(step, losses[-1], grad_norm.item(), self.last_lr, self.state.ntokens_seen)
                self.checkpointer.save(step, last_step=step == c.training.steps, force=step == last or stop)
                self.checkpointer.poll()
                if stop:
                    self._stop_for_signal(step)
                    break
                if self.validator is not None and (step % c.validation.freq == 0 or step == c.training.steps):
                    with self.setup.loss_parallel():
                        batch_loss = self._pipeline_validation_loss
                        if self.pipeline is None:
                            batch_loss = self.validator.model_loss(self.model_parts[0], self.forward)
                        val_loss, val_tokens = self.validator.validate(self.model_parts, batch_loss)
                    self.metrics.log_validation(step, val_loss, val_tokens)
                if profiler is not None:
                    profiler.step()
                if snapshot is not None:
                    snapshot.step()
        self.checkpointer.wait()
        gc.enable()
        logger.info(f"training done at step {self.state.step}")
        return losses

    def _stop_for_signal(self, step: int) -> None:
        self.preempted = True
        if self.job_config.checkpoint.enable:
            saved = f"saved checkpoint {self.checkpointer.folder / f'step-{step}'}"
        else:
            saved = "checkpoint.enable = false, nothing saved"
        logger.warning(f"stop signal after step {step}: {saved}; exiting with status {EXIT_PREEMPTED}")

    def close(self) -> None:
        self.stop_signals.restore()
        self.checkpointer.close()
        self.metrics.close()


def check(config: JobConfig, flags: dry_run.DryRunFlags) -> None:
    """``--check``: :func:`build.validate` for the launch's world size and device, in this one process."""
    init_logger()
    world_size = flags.world_size or required_world_size(config)
    device = dry_run.target_accelerator(flags.device) if flags.device else describe_accelerator(local_device())
    build.validate(config, ParallelDims.from_config(config.parallelism, world_size), device)
    logger.info(f"{config.job.config_file or 'the config'} passes every start-up check for {world_size} ranks")


def remove_if_created(folder: Path, created: bool) -> None:
    """After a failed set-up, remove the output folder this run created (rank 0, for the job): no empty runs left."""
    if created and os.environ.get("RANK", "0") == "0":
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(dry_run.HELP + "\n")
    argv, dry_run_flags = dry_run.split_flags(argv)
    config = ConfigManager().parse_args(argv)
    if dry_run_flags is not None and dry_run_flags.check:
        check(config, dry_run_flags)
        return
    if dry_run_flags is not None:
        dry_run.run(config, dry_run_flags)
        return
    trainer = None
    dump = Path(config.job.dump_folder)
    created = not dump.exists()
    try:
        try:
            trainer = Trainer(config)
        except BaseException:
            remove_if_created(dump, created)
            raise
        trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    if trainer.preempted:
        raise SystemExit(EXIT_PREEMPTED)


if __name__ == "__main__":
    run_cli(main)
