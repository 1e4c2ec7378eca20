"""The trainer: ``python -m torchtitan_hyena.train --job.config_file X.toml [--section.key value ...]``.

Readable top to bottom: build (validate -> mesh -> data -> meta model -> parallelize -> init ->
optimizer -> checkpoint), then loop (fetch microbatches -> forward/backward -> clip -> step ->
log -> checkpoint -> validate).
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from torchtitan_hyena.components.checkpoint import CheckpointManager, check_model_family, step_folders
from torchtitan_hyena.components.dataloader import batch_to_device
from torchtitan_hyena.components.datasets.base import IGNORE_INDEX
from torchtitan_hyena.components.datasets.dna_targets import LossShaping
from torchtitan_hyena.components.dcp_reader import read_dcp_metadata
from torchtitan_hyena.components.metrics import MetricsProcessor
from torchtitan_hyena.components.resilience import EXIT_PREEMPTED, NonFiniteGuard, StopSignals
from torchtitan_hyena.components.validate import Validator
from torchtitan_hyena.config import ConfigManager, JobConfig, config_table
from torchtitan_hyena.config.manager import to_dict
from torchtitan_hyena.distributed.context_parallel import build_context_parallel
from torchtitan_hyena.distributed.float8 import (
    Accelerator,
    convert_to_float8,
    describe_accelerator,
    precompute_float8_scales,
    validate_float8,
)
from torchtitan_hyena.distributed.fsdp import DTYPES
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.distributed.parallelize_common import validate_parallelism
from torchtitan_hyena.distributed.tensor_parallel import maybe_loss_parallel
from torchtitan_hyena.distributed.utils import (
    clip_grad_norm_,
    dist_sum,
    init_distributed,
    local_device,
    set_determinism,
    set_pg_timeout,
)
from torchtitan_hyena.distributed.warmup import warm_up
from torchtitan_hyena.errors import ConfigError, run_cli
from torchtitan_hyena.protocols.model import BaseModelArgs
from torchtitan_hyena.protocols.train_spec import get_flavor_args, get_train_spec
from torchtitan_hyena.tools import dry_run
from torchtitan_hyena.tools.flops import get_peak_flops
from torchtitan_hyena.tools.logging import init_logger, logger
from torchtitan_hyena.tools.outputs import check_writable_dir
from torchtitan_hyena.tools.profiling import maybe_enable_memory_snapshot, maybe_enable_profiling
from torchtitan_hyena.tools.world_size import required_world_size


def validate_layout(job_config: JobConfig, parallel_dims: ParallelDims, accelerator: Accelerator) -> None:
    """Checks that need the parallel degrees and the device, run before any data or model is built
    (the dry run calls this with the target device instead of the local one)."""
    t = job_config.training
    if t.global_batch_size > 0 and t.global_batch_size % (t.local_batch_size * parallel_dims.dp_degree):
        raise ConfigError(
            f"training.global_batch_size {t.global_batch_size} must be a multiple of local_batch_size "
            f"{t.local_batch_size} x data-parallel degree {parallel_dims.dp_degree}"
        )
    tp, cp = parallel_dims.tp, parallel_dims.cp
    split = tp * 2 * cp if cp > 1 else tp
    if t.seq_len % split:
        raise ConfigError(
            f"training.seq_len {t.seq_len} must be divisible by {split} "
            f"(tensor_parallel_degree {tp} x 2 x context_parallel_degree {cp} when CP is on)"
        )
    validate_parallelism(job_config, parallel_dims)
    validate_float8(job_config.float8, parallel_dims, accelerator)
    comp = job_config.compile
    if comp.enable and comp.backend not in torch.compiler.list_backends(exclude_tags=()):
        raise ConfigError(
            f"compile.backend {comp.backend!r} is not a torch.compile backend; use inductor (default), "
            f"aot_eager or eager (available: {', '.join(torch.compiler.list_backends())})"
        )
    if (
        job_config.model.conv_impl == "triton"
        and accelerator.kind == "cpu"
        and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        raise ConfigError(
            "model.conv_impl = triton needs a GPU; on CPU use auto or torch (or set TRITON_INTERPRET=1 before start-up "
            "to run the Triton interpreter, slow, for tests)"
        )


def validate_job(job_config: JobConfig, parallel_dims: ParallelDims, accelerator: Accelerator) -> BaseModelArgs:
    """Every check that needs no process group, data or model, in one process; returns the model's args.

    The trainer runs it on every rank before joining the process group (each rank rejects a bad config alike,
    and one line reaches the user); ``--check`` runs it once before a launcher starts any rank (run_train.sh,
    the Frontier job scripts).
    """
    c = job_config
    validate_layout(c, parallel_dims, accelerator)
    spec = get_train_spec(c.model.name)
    model_args = get_flavor_args(spec, c.model.flavor)
    model_args.update_from_config(c)
    if spec.validate_fn is not None:
        spec.validate_fn(model_args, parallel_dims, c)
    dump = Path(c.job.dump_folder)
    check_writable_dir(dump, "job.dump_folder")
    for key, folder, used in (
        ("metrics.save_tb_folder", c.metrics.save_tb_folder, c.metrics.enable_tensorboard),
        ("checkpoint.folder", c.checkpoint.folder, c.checkpoint.enable),
        ("profiling.save_traces_folder", c.profiling.save_traces_folder, c.profiling.enable_profiling),
    ):
        if used:
            check_writable_dir(dump / folder, key)
    seed = c.checkpoint.initial_load_path
    if seed and not (c.checkpoint.enable and step_folders(dump / c.checkpoint.folder)):  # a resume ignores the seed
        check_model_family(Path(seed), c.model.name)
        read_dcp_metadata(seed)  # refuses unsafe or damaged checkpoints before any rank builds anything
    return model_args


def convert_model(model: torch.nn.Module, job_config: JobConfig, parallel_dims: ParallelDims) -> None:
    """Module swaps that must happen on the meta model before parallelization (float8)."""
    f8 = job_config.float8
    if f8.enable:
        compiled = job_config.compile.enable and "model" in job_config.compile.components
        convert_to_float8(model, f8, tp_degree=parallel_dims.tp, compiled=compiled)


def parallel_dims_of(job_config: JobConfig, world_size: int) -> ParallelDims:
    """The config's parallel degrees for ``world_size`` ranks (rejects degrees that do not multiply to it)."""
    p = job_config.parallelism
    return ParallelDims(
        dp_replicate=p.data_parallel_replicate_degree,
        dp_shard=p.data_parallel_shard_degree,
        cp=p.context_parallel_degree,
        tp=p.tensor_parallel_degree,
        world_size=world_size,
    )


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
        # Known before joining the process group, so every rank rejects a bad layout alike and none waits for it.
        world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        self.parallel_dims = pd = parallel_dims_of(c, world_size)
        self.device = local_device()
        self.model_args = validate_job(c, pd, describe_accelerator(self.device))
        init_distributed(c.comm.init_timeout_seconds, c.comm.trace_buf_size)
        self.rank = dist.get_rank()
        if self.rank == 0 and c.job.print_config:
            logger.info("resolved config:\n" + config_table(c))
        pd.build_mesh(self.device.type)
        warm_up(pd, self.device, c.comm.warmup_timeout_seconds)
        self.cp = build_context_parallel(pd, c)
        set_determinism(c.training.seed, c.training.deterministic)

        # Tokenizer, data: everything else that can reject user input comes before the model.
        self.train_spec = spec = get_train_spec(c.model.name)
        tokenizer = spec.build_tokenizer_fn(c)
        if tokenizer is not None and tokenizer.vocab_size > self.model_args.vocab_size:
            raise ConfigError(
                f"model.vocab_size {self.model_args.vocab_size} is smaller than the {c.training.dataset} "
                f"vocabulary ({tokenizer.vocab_size}); set model.vocab_size >= {tokenizer.vocab_size}"
            )
        self.dp_degree, self.dp_rank = pd.dp_degree, pd.dp_rank()
        t = c.training
        self.global_batch = t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size * self.dp_degree
        data_kwargs = dict(
            dataset=t.dataset,
            path=t.dataset_path,
            tokenizer=tokenizer,
            vocab_size=self.model_args.vocab_size,
            seq_len=t.seq_len,
            dp_rank=self.dp_rank,
            dp_degree=self.dp_degree,
            seed=t.seed,
            loss_shaping=LossShaping.from_config(t),
        )
        self.dataloader = spec.build_dataloader_fn(
            split=t.dataset_split,
            local_batch=t.local_batch_size,
            global_batch=self.global_batch,
            shuffle=t.shuffle,
            infinite=True,
            **data_kwargs,
        )
        self.validator = None
        if c.validation.enable:
            v_local = c.validation.local_batch_size if c.validation.local_batch_size > 0 else t.local_batch_size
            val_loader = spec.build_dataloader_fn(
                split=c.validation.dataset_split,
                local_batch=v_local,
                global_batch=v_local * self.dp_degree,
                shuffle=False,
                infinite=False,
                **data_kwargs,
            )
            self.validator = Validator(
                val_loader,
                spec.build_loss_fn(c),
                c.validation.steps,
                self.device,
                self._loss_group(),
                prepare_batch=self.prepare_batch,
            )

        # Model: built on meta, converted, parallelized, then materialized and initialized.
        with torch.device("meta"):
            model = spec.model_cls(self.model_args)
        self._convert_model(model)
        self.nparams, self.flops_per_token = self.model_args.get_nparams_and_flops(model, t.seq_len)
        logger.info(
            f"{c.model.name} {c.model.flavor}: {self.nparams:,} parameters, "
            f"{self.flops_per_token:.3e} training FLOPs per token"
        )
        model = spec.parallelize_fn(model, pd, c)
        init_device = torch.device("cpu") if t.enable_cpu_offload else self.device
        model.to_empty(device=init_device)
        with torch.no_grad():
            model.init_weights(buffer_device=self.device if t.enable_cpu_offload else None, seed=t.seed)
        model.train()
        self.model_parts = [model]

        self.optimizers = spec.build_optimizers_fn(self.model_parts, c.optimizer)
        self.lr_schedulers = spec.build_lr_schedulers_fn(self.optimizers, c.lr_scheduler, t.steps)
        self.loss_fn = spec.build_loss_fn(c)
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
            model_info=(c.model.name, c.model.flavor, self.model_args),
            job_config_dict=to_dict(c),
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
            world_size=world_size,
            device=self.device,
            total_steps=t.steps,
        )

    # ------------------------------------------------------------------ set-up helpers
    def _convert_model(self, model: torch.nn.Module) -> None:
        convert_model(model, self.job_config, self.parallel_dims)

    def _amp(self) -> contextlib.AbstractContextManager:
        """Autocast to the mixed-precision dtype when no FSDP wrapper does the casting (one rank, TP only)."""
        dtype = self.job_config.training.mixed_precision_param
        if self.parallel_dims.fsdp_mesh() is not None or dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[dtype])

    def _loss_parallel(self) -> contextlib.AbstractContextManager:
        """Loss parallel (vocab-sharded logits) around forward, loss and backward when enabled (TP only)."""
        return maybe_loss_parallel(self.job_config.parallelism.enable_loss_parallel)

    def _loss_group(self) -> dist.ProcessGroup | None:
        mesh = self.parallel_dims.get_mesh("dp_cp")
        return None if mesh is None else mesh.get_group()

    # ------------------------------------------------------------------ the loop
    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Under context parallelism, this rank's tokens of the batch and their global ``positions``."""
        return batch if self.cp is None else self.cp.shard_batch(batch)

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._amp():
            return model(batch["input"], batch.get("positions"))

    def train_step(self, microbatches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimizer step over this rank's microbatches. Returns (global loss, grad norm, tokens).

        The loss is a sum over tokens divided by the token count of the whole global batch, so the
        gradient is the same however the batch is split over ranks and accumulation steps.
        """
        self.optimizers.zero_grad()
        microbatches = [self.prepare_batch(mb) for mb in microbatches]
        local_tokens = sum((mb["labels"] != IGNORE_INDEX).sum() for mb in microbatches)
        global_tokens = dist_sum(local_tokens.to(torch.float64), self._loss_group())
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        model = self.model_parts[0]
        for mb in microbatches:
            with self._loss_parallel():
                logits = self.forward(model, mb)
                loss = self.loss_fn(logits, mb["labels"], mb.get("loss_weights")) / global_tokens.to(torch.float32)
                del logits
                loss.backward()
            loss_sum += loss.detach().to(torch.float64)
        loss = dist_sum(loss_sum, self._loss_group())
        params = [p for m in self.model_parts for p in m.parameters()]
        grad_norm = clip_grad_norm_(params, self.job_config.training.max_norm)
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
            f"global batch {self.global_batch} x {c.training.seq_len} tokens, {accumulation} accumulation step(s), "
            f"{self.dp_degree} data-parallel rank(s)"
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
                    with self._loss_parallel():
                        val_loss, val_tokens = self.validator.validate(self.model_parts[0], self.forward)
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
    """``--check``: :func:`validate_job` for the launch's world size and device, in this one process."""
    init_logger()
    world_size = flags.world_size or required_world_size(config)
    device = dry_run.target_accelerator(flags.device) if flags.device else describe_accelerator(local_device())
    validate_job(config, parallel_dims_of(config, world_size), device)
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
