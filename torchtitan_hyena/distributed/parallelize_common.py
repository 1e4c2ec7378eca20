"""What every model family does the same way: validate parallelism options, then AC -> compile -> FSDP."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.distributed.activation_checkpoint import apply_ac
from torchtitan_hyena.distributed.compile import apply_compile
from torchtitan_hyena.distributed.fsdp import apply_fsdp
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.errors import ConfigError


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


def apply_ac_compile_fsdp(
    model: nn.Module,
    layers: nn.ModuleDict,
    parallel_dims: ParallelDims,
    job_config: JobConfig,
    *,
    first_units: Sequence[nn.Module | None],
    last_unit: Sequence[nn.Module | None],
    fp32_units: Sequence[nn.Module] = (),
) -> None:
    """Activation checkpointing and torch.compile per block of ``layers``, then FSDP/HSDP when data
    (or context) parallel, sharding ``first_units`` (e.g. the embedding), each (wrapped) block, then
    ``last_unit`` (final norm + head) as one unit; ``fp32_units`` keep fp32 parameters (see apply_fsdp)."""
    ac = job_config.activation_checkpoint
    compiled = job_config.compile.enable and "model" in job_config.compile.components
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
        fullgraph = not ((fp32_units and mesh is not None) or parallel_dims.cp_enabled)
        apply_compile(layers, job_config.compile.backend, fullgraph=fullgraph)
    if ac_outside:
        apply_ac(layers, ac.mode, ac.selective_ac_option)
    if mesh is None:
        return
    t = job_config.training
    apply_fsdp(
        model,
        mesh,
        param_dtype=t.mixed_precision_param,
        reduce_dtype=t.mixed_precision_reduce,
        reshard_after_forward=job_config.parallelism.fsdp_reshard_after_forward,
        cpu_offload=t.enable_cpu_offload,
        units=[*first_units, *layers.values()],
        last_unit=last_unit,
        fp32_units=fp32_units,
    )
