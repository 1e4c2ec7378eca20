"""The parallelization steps every model family applies the same way: AC -> compile -> FSDP."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.distributed.activation_checkpoint import apply_ac
from torchtitan_hyena.distributed.compile import apply_compile
from torchtitan_hyena.distributed.fsdp import apply_fsdp
from torchtitan_hyena.distributed.parallel_dims import ParallelDims


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
    apply_ac(layers, ac.mode, ac.selective_ac_option)
    mesh = parallel_dims.fsdp_mesh()
    if job_config.compile.enable and "model" in job_config.compile.components:
        apply_compile(layers, job_config.compile.backend, fullgraph=not (fp32_units and mesh is not None))
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
