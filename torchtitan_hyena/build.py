"""The one set-up path: from a job config (or a checkpoint) to a model ready to run.

    parse (``ConfigManager``: types, choices, config-only checks)
    -> validate: the model family exists, then the layout and device, then the family's own checks, then the
       run's files (output folders writable, the checkpoint to seed from of this family and safe to read)
    -> process group (joined only once the job is valid), device mesh, warm-up of every mesh group
    -> context parallelism (built once) -> meta model -> float8 -> pipeline stages (when pipeline parallel)
    -> the family's parallelize plan (per stage) -> init (or load)

The trainer, ``evaluate`` and the dry run call :func:`setup` then :func:`build_model`; ``--check`` calls
:func:`validate` alone; scoring, generation and the converters rebuild a model from a checkpoint's
``model_args.json`` with :func:`load_model` or ask for its tensor shapes with :func:`model_shapes`. A model family
plugs in through its ``TrainSpec`` (``protocols/train_spec.py``; README "Adding a model family").
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from torchtitan_hyena.components.checkpoint import (
    PARTIAL_SEED_FIX,
    check_model_family,
    load_model_weights,
    step_folders,
)
from torchtitan_hyena.components.dcp_reader import read_dcp_metadata
from torchtitan_hyena.components.lora import (
    apply_lora,
    init_adapters,
    parameter_counts,
    parameter_summary,
    refuse_unmerged,
)
from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.config.job_config import Model
from torchtitan_hyena.distributed.compile import compiles_model
from torchtitan_hyena.distributed.context_parallel import ContextParallel, build_context_parallel
from torchtitan_hyena.distributed.float8 import Accelerator, convert_to_float8, describe_accelerator, validate_float8
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.distributed.parallelize import parallelize, validate_parallelism
from torchtitan_hyena.distributed.pipeline_parallel import (
    Pipeline,
    head_cost,
    split_stage,
    stage_ids,
    stage_ranges,
    tied_group,
    validate_pipeline,
)
from torchtitan_hyena.distributed.tensor_parallel import maybe_loss_parallel
from torchtitan_hyena.distributed.utils import init_distributed, local_device
from torchtitan_hyena.distributed.warmup import warm_up
from torchtitan_hyena.dtypes import DTYPES
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.models.common.init import init_param_, uniform
from torchtitan_hyena.models.common.precision import cast_model_
from torchtitan_hyena.protocols.model import MODEL_ARGS_FILE, BaseModelArgs, read_model_args
from torchtitan_hyena.protocols.train_spec import TrainSpec, available, get_flavor_args, get_train_spec
from torchtitan_hyena.tools.logging import logger
from torchtitan_hyena.tools.outputs import check_writable_dir

_ALWAYS_READ = frozenset({"name", "flavor"})  # model.* keys every family reads


# ---------------------------------------------------------------------------------------------- validation
def validate_layout(job_config: JobConfig, parallel_dims: ParallelDims, accelerator: Accelerator) -> None:
    """Checks that need the parallel degrees and the device (the dry run passes the target device's)."""
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
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if job_config.model.conv_impl == "triton" and accelerator.kind == "cpu" and not interpreted:
        raise ConfigError(
            "model.conv_impl = triton needs a GPU; on CPU use auto or torch (or set TRITON_INTERPRET=1 before start-up "
            "to run the Triton interpreter, slow, for tests)"
        )


def check_model_keys(spec: TrainSpec, model_config: Model) -> None:
    """A ``model.*`` key the family does not read must keep its default: a set value would be silently ignored."""
    reads = spec.args_cls.config_keys | _ALWAYS_READ
    default = Model()
    for f in dataclasses.fields(Model):
        value = getattr(model_config, f.name)
        if f.name in reads or value == getattr(default, f.name):
            continue
        users = [n for n in available() if n != spec.name and f.name in get_train_spec(n).args_cls.config_keys]
        raise ConfigError(
            f"model.{f.name} = {value!r} is {' / '.join(users) or 'no family'}'s option and model.name "
            f"{spec.name!r} does not read it; remove it or set model.name to {' / '.join(users) or 'a family'}"
        )


def model_args_from_config(spec: TrainSpec, job_config: JobConfig) -> BaseModelArgs:
    """The flavor's args with the job config's values: the family's own config checks run here."""
    check_model_keys(spec, job_config.model)
    return get_flavor_args(spec, job_config.model.flavor).with_config(job_config)


def validate_files(job_config: JobConfig) -> None:
    """The run's output folders can be written, and the checkpoint it seeds from (not on a resume, which ignores
    the seed, except under LoRA, whose resume reads its frozen base weights from it again) is of this model family
    and safe to read: refused before any rank builds anything."""
    c = job_config
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
    if seed and (c.lora.enable or not (c.checkpoint.enable and step_folders(dump / c.checkpoint.folder))):
        check_model_family(Path(seed), c.model.name)
        read_dcp_metadata(seed)


# ---------------------------------------------------------------------------------------------- set-up
@dataclass
class Setup:
    """What the layout decides for a run: family, model args, mesh, device, context parallelism; and how a batch
    runs on it (:meth:`prepare_batch`, :meth:`forward`, :meth:`loss_parallel`, :meth:`loss_group`)."""

    config: JobConfig
    spec: TrainSpec
    model_args: BaseModelArgs
    parallel_dims: ParallelDims
    device: torch.device
    cp: ContextParallel | None

    @property
    def global_batch(self) -> int:
        t = self.config.training
        return t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size * self.parallel_dims.dp_degree

    def loss_group(self) -> dist.ProcessGroup | None:
        """The ranks whose tokens one loss averages over (data x context parallel)."""
        mesh = self.parallel_dims.get_mesh("dp_cp")
        return None if mesh is None else mesh.get_group()

    def pp_group(self) -> dist.ProcessGroup | None:
        """The pipeline ranks of this rank's stage chain (None without pipeline parallelism)."""
        mesh = self.parallel_dims.get_mesh("pp")
        return None if mesh is None else mesh.get_group()

    def loss_parallel(self) -> contextlib.AbstractContextManager:
        """Loss parallel (vocab-sharded logits) around forward, loss and backward when enabled (TP only)."""
        return maybe_loss_parallel(self.config.parallelism.enable_loss_parallel)

    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Under context parallelism, this rank's tokens of the batch and their global ``positions``."""
        return batch if self.cp is None else self.cp.shard_batch(batch)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the mixed-precision dtype when no FSDP wrapper casts (one rank, TP/PP only)."""
        dtype = self.config.training.mixed_precision_param
        if self.parallel_dims.fsdp_mesh() is not None or dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[dtype])

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of a prepared batch (see :meth:`autocast`)."""
        with self.autocast():
            return model(batch["input"], batch.get("positions"))


def validate(
    job_config: JobConfig, parallel_dims: ParallelDims, accelerator: Accelerator, *, files: bool = True
) -> BaseModelArgs:
    """Every check that needs no process group, data or model, in order: the layout and the device, the model
    family's own, then (``files``) the run's files; returns the model's args. (The config-only checks ran when the
    config was parsed.) Each rank runs it before joining the process group, and ``--check`` before a launcher
    starts any rank, so a bad job is one line, before any work."""
    spec = get_train_spec(job_config.model.name)
    validate_layout(job_config, parallel_dims, accelerator)
    model_args = model_args_from_config(spec, job_config)
    t = job_config.training
    n_layers = len(model_args.layer_flops(t.seq_len))
    v = job_config.validation
    validate_pipeline(job_config.parallelism, n_layers, t.local_batch_size, v.local_batch_size if v.enable else 0)
    if spec.validate_fn is not None:
        spec.validate_fn(model_args, parallel_dims, job_config)
    if files:
        validate_files(job_config)
    return model_args


def setup(job_config: JobConfig, *, target: Accelerator | None = None) -> Setup:
    """Validate the job, join the process group, build the mesh, warm up its groups, build the context parallelism.

    ``target``: plan for that device instead of running here (the dry run, on its fake process group: a CPU meta
    model, judged by the target's float8 support; no files checked, no warm-up).
    """
    # Known before joining the process group, so every rank rejects a bad job alike and none waits for another.
    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    parallel_dims = ParallelDims.from_config(job_config.parallelism, world_size)
    device = torch.device("cpu") if target is not None else local_device()
    accelerator = target or describe_accelerator(device)
    model_args = validate(job_config, parallel_dims, accelerator, files=target is None)
    if not dist.is_initialized():
        init_distributed(job_config.comm.init_timeout_seconds, job_config.comm.trace_buf_size)
    parallel_dims.build_mesh(device.type)
    if target is None:
        warm_up(parallel_dims, device, job_config.comm.warmup_timeout_seconds)
    cp = build_context_parallel(parallel_dims, job_config)
    return Setup(job_config, get_train_spec(job_config.model.name), model_args, parallel_dims, device, cp)


def build_tokenizer(s: Setup) -> Any:
    """The data's tokenizer (None for mock data), checked against the model's vocabulary."""
    tokenizer = s.spec.build_tokenizer_fn(s.config)
    vocab = s.model_args.vocab_size
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise ConfigError(
            f"model.vocab_size {vocab} is smaller than the {s.config.training.dataset} vocabulary "
            f"({tokenizer.vocab_size}); set model.vocab_size >= {tokenizer.vocab_size}"
        )
    return tokenizer


def build_dataloader(s: Setup, tokenizer: Any, *, validation: bool = False) -> Any:
    """This rank's training loader (infinite, shuffled as configured) or validation loader (one pass)."""
    c, pd = s.config, s.parallel_dims
    kwargs = dict(tokenizer=tokenizer, vocab_size=s.model_args.vocab_size, dp_rank=pd.dp_rank(), dp_degree=pd.dp_degree)
    if validation:
        v = c.validation
        local = v.local_batch_size if v.local_batch_size > 0 else c.training.local_batch_size
        return s.spec.build_dataloader_fn(
            c, split=v.dataset_split, local_batch=local, global_batch=local * pd.dp_degree, shuffle=False,
            infinite=False, **kwargs,
        )  # fmt: skip
    t = c.training
    return s.spec.build_dataloader_fn(
        c, split=t.dataset_split, local_batch=t.local_batch_size, global_batch=s.global_batch, shuffle=t.shuffle,
        infinite=True, **kwargs,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- models
class BuiltModel(NamedTuple):
    model_parts: list[nn.Module]  # the whole model, or this rank's pipeline stages
    nparams: int  # whole model, before sharding
    flops_per_token: float  # training FLOPs per token, for MFU
    pipeline: Pipeline | None  # the stages' schedule (pipeline parallel, materialized models only)

    @property
    def model(self) -> nn.Module:
        """The model of a run without pipeline parallelism."""
        if len(self.model_parts) != 1 or self.pipeline is not None:
            raise ConfigError("this tool runs whole models; set parallelism.pipeline_parallel_degree 1")
        return self.model_parts[0]


def meta_model(spec: TrainSpec, args: BaseModelArgs) -> nn.Module:
    with torch.device("meta"):
        return spec.model_cls(args)


def build_model(s: Setup, *, materialize: bool = True, all_stages: bool = False) -> BuiltModel:
    """Meta model -> float8 or LoRA -> pipeline stages -> the family's parallelize plan -> (``materialize``) allocate
    and initialize (every stage draws its tensors as the whole model would, by name). ``all_stages``: every pipeline
    stage in order, not only this rank's (the dry run sizes each pipeline rank; meta models only)."""
    c, t, pd = s.config, s.config.training, s.parallel_dims
    model = meta_model(s.spec, s.model_args)
    if c.float8.enable:  # module swaps happen on the meta model, before parallelization
        convert_to_float8(model, c.float8, tp_degree=pd.tp, compiled=compiles_model(c.compile))
    nparams, flops = s.model_args.get_nparams_and_flops(model, t.seq_len)
    logger.info(f"{c.model.name} {c.model.flavor}: {nparams:,} parameters, {flops:.3e} training FLOPs per token")
    if c.lora.enable:
        apply_lora(model, c.lora)
        logger.info(parameter_summary(parameter_counts(model)))
    parts, stages, ranges = [model], [0], [(0, len(model.layers))]
    plan = s.spec.parallelize_plan.pipeline
    if pd.pp_enabled:
        ranges = stage_ranges(c.parallelism, s.model_args.layer_flops(t.seq_len), head_cost(model, plan))
        stages = stage_ids(pd.get_mesh("pp").get_local_rank(), pd.pp, len(ranges))
        stages = list(range(len(ranges))) if all_stages else stages
        parts = [split_stage(model, plan, ranges, i) for i in stages]
        logger.info(f"pipeline stages (blocks [start, stop)): {ranges}; this rank runs stage(s) {stages}")
    parts = [parallelize(part, pd, c, s.cp, s.spec.parallelize_plan) for part in parts]
    pipeline = None
    if materialize:
        for part in parts:
            part.to_empty(device=torch.device("cpu") if t.enable_cpu_offload else s.device)
            with torch.no_grad():
                part.init_weights(buffer_device=s.device if t.enable_cpu_offload else None, seed=t.seed)
                init_lora(part, t.seed)
            part.train()
        if pd.pp_enabled:
            tied = plan.tied(model)
            group = tied_group(pd.world_mesh, pd.pp) if tied else None
            pipeline = Pipeline(
                parts, stages, len(ranges), tied, c.parallelism, t.local_batch_size, s.pp_group(), group, s.device
            )
    return BuiltModel(parts, nparams, flops, pipeline)


def init_lora(model: nn.Module, seed: int) -> None:
    """Fresh LoRA adapters (B = 0), drawn layout-invariantly like every weight; a no-op without LoRA."""
    init_adapters(model, lambda param, fqn, bound: init_param_(param, uniform(bound), seed, fqn))


def model_shapes(name: str, args: BaseModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of the state dict of family ``name``'s model with ``args``, and its shape (built on meta)."""
    return {k: tuple(v.shape) for k, v in meta_model(get_train_spec(name), args).state_dict().items()}


def load_model(checkpoint: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model recorded in ``checkpoint/model_args.json`` with its weights, on one process, in eval mode."""
    path = Path(checkpoint)
    name, _, values = read_model_args(path)
    refuse_unmerged(path)
    spec = get_train_spec(name)
    model = meta_model(spec, spec.args_cls.from_dict(values, str(path / MODEL_ARGS_FILE)))
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    load_model_weights([model], path, fix=PARTIAL_SEED_FIX)
    cast_model_(model, dtype)  # modules marked keep_fp32_params (Hyena-LI filters) stay fp32
    return model.eval()
