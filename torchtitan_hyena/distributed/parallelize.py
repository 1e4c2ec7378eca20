"""The parallelize skeleton every model family shares, in TorchTitan's order: TP -> CP -> AC -> compile -> FSDP.

A family contributes a :class:`ParallelizePlan` (how its modules split under tensor parallelism, where context
parallelism enters, which modules are FSDP units); :func:`parallelize` applies it with everything that is the same
for every family. It runs on the meta-device model after float8, with the context parallelism built once by the
set-up (``build.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from torchtitan_hyena.components.lora import shard_adapters
from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.distributed.activation_checkpoint import apply_ac
from torchtitan_hyena.distributed.compile import apply_compile, compiles_model
from torchtitan_hyena.distributed.context_parallel import ContextParallel
from torchtitan_hyena.distributed.float8 import is_tensorwise
from torchtitan_hyena.distributed.fsdp import apply_fsdp
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.distributed.pipeline_parallel import PipelinePlan
from torchtitan_hyena.distributed.tensor_parallel import maybe_enable_async_tp
from torchtitan_hyena.errors import ConfigError


@dataclass(frozen=True)
class TPOptions:
    """What a family's tensor-parallel plan needs from the job config."""

    loss_parallel: bool  # keep the logits vocab-sharded for the cross entropy
    float8_tensorwise: bool  # TP collectives may travel in float8
    compiled: bool  # the blocks will be torch.compile'd


@dataclass(frozen=True)
class FSDPUnits:
    """How a model splits into units: ``layers`` (each one an AC/compile/FSDP unit), ``first`` (e.g. the
    embedding) and ``last`` (final norm + head) sharded as units of their own, ``fp32`` modules that keep fp32
    parameters under mixed precision (see ``apply_fsdp``)."""

    layers: nn.ModuleDict
    first: Sequence[nn.Module | None] = ()
    last: Sequence[nn.Module | None] = ()
    fp32: Sequence[nn.Module] = ()


@dataclass(frozen=True)
class ParallelizePlan:
    """The model-specific part of parallelization.

    ``apply_tp(model, tp_mesh, options)`` shards the model's modules over ``tp_mesh``; ``apply_cp(model, cp)``
    makes the sequence-mixing modules work on context-parallel shards; ``fsdp_units(model)`` names the units;
    ``pipeline`` says what each pipeline stage holds. Under pipeline parallelism each function gets one stage: a
    copy of the model whose other stages' modules are None (``distributed/pipeline_parallel.py``).
    """

    apply_tp: Callable[[nn.Module, DeviceMesh, TPOptions], None]
    apply_cp: Callable[[nn.Module, ContextParallel], None]
    fsdp_units: Callable[[nn.Module], FSDPUnits]
    pipeline: PipelinePlan = PipelinePlan()


def validate_parallelism(job_config: JobConfig, parallel_dims: ParallelDims) -> None:
    """Options that need a parallelism the layout does not have (checked before any model is built)."""
    p, t = job_config.parallelism, job_config.training
    if p.enable_loss_parallel and not parallel_dims.tp_enabled:
        raise ConfigError(
            "parallelism.enable_loss_parallel needs tensor_parallel_degree > 1; set enable_loss_parallel false"
        )
    if p.enable_async_tensor_parallel and not parallel_dims.tp_enabled:
        raise ConfigError("parallelism.enable_async_tensor_parallel needs tensor_parallel_degree > 1; set it false")
    fsdp = parallel_dims.dp_replicate > 1 or parallel_dims.fsdp_enabled
    if t.enable_cpu_offload and not fsdp:
        raise ConfigError(
            "training.enable_cpu_offload offloads FSDP shards and needs data parallelism "
            "(data_parallel_shard_degree or data_parallel_replicate_degree > 1); set it false"
        )


def parallelize(
    model: nn.Module,
    parallel_dims: ParallelDims,
    job_config: JobConfig,
    cp: ContextParallel | None,
    plan: ParallelizePlan,
) -> nn.Module:
    """Apply TP, CP, activation checkpointing, compile and FSDP/HSDP to the meta-device ``model`` in place."""
    compiled = compiles_model(job_config.compile)
    if parallel_dims.tp_enabled:
        tp_mesh = parallel_dims.get_mesh("tp")
        p = job_config.parallelism
        frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
        plan.apply_tp(model, tp_mesh, TPOptions(p.enable_loss_parallel, is_tensorwise(job_config.float8), compiled))
        shard_adapters(model, tp_mesh)  # LoRA adapters, sharded like their base layers (none without LoRA)
        # Frozen weights (LoRA) stay frozen: torch's parallel styles wrap each shard in a new nn.Parameter, which
        # requires grad by default, so every plan (ours and torch's Colwise/Rowwise styles) would unfreeze them.
        for name, param in model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
        maybe_enable_async_tp(p.enable_async_tensor_parallel, compiled, tp_mesh)
    if cp is not None:
        plan.apply_cp(model, cp)
    apply_ac_compile_fsdp(model, plan.fsdp_units(model), parallel_dims, job_config)
    return model


def apply_ac_compile_fsdp(
    model: nn.Module, units: FSDPUnits, parallel_dims: ParallelDims, job_config: JobConfig
) -> None:
    """Activation checkpointing and torch.compile per block of ``units.layers``, then FSDP/HSDP when data (or
    context) parallel, sharding ``units.first``, each (wrapped) block, then ``units.last`` as one unit."""
    ac = job_config.activation_checkpoint
    compiled = compiles_model(job_config.compile)
    layers = units.layers
    # TorchTitan checkpoints inside the compiled block. With TP (DTensor) blocks, torch 2.13's AOTAutograd fails
    # to save the DeviceMesh across a traced layer checkpoint, so whole-block AC then wraps the compiled block
    # (same memory: only block inputs are kept). Per-op SAC stays inside: its policy must see the aten ops.
    ac_outside = (
        compiled and parallel_dims.tp_enabled and not (ac.mode == "selective" and ac.selective_ac_option == "op")
    )
    mesh = parallel_dims.fsdp_mesh()
    if not ac_outside:
        apply_ac(layers, ac.mode, ac.selective_ac_option)
    if compiled:
        # Graph breaks: nested FSDP units (fp32 filters) and the eager context-parallel regions.
        fullgraph = not ((units.fp32 and mesh is not None) or parallel_dims.cp_enabled)
        apply_compile(layers, job_config.compile.backend, fullgraph=fullgraph)
    if ac_outside:
        apply_ac(layers, ac.mode, ac.selective_ac_option)
    if mesh is None:
        return
    t = job_config.training
    reshard = job_config.parallelism.fsdp_reshard_after_forward
    if reshard == "default" and parallel_dims.pp_enabled:
        reshard = "never"  # TorchTitan's default under PP: no re-gather of every unit for each microbatch
    apply_fsdp(
        model,
        mesh,
        param_dtype=t.mixed_precision_param,
        reduce_dtype=t.mixed_precision_reduce,
        reshard_after_forward=reshard,
        cpu_offload=t.enable_cpu_offload,
        units=[u for u in (*units.first, *layers.values()) if u is not None],
        last_unit=units.last,
        fp32_units=units.fp32,
    )
