"""Apply parallelisms to Llama 3, in TorchTitan's order: TP -> CP -> AC -> compile -> FSDP."""

from __future__ import annotations

from torch import nn

from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.distributed.activation_checkpoint import apply_ac
from torchtitan_hyena.distributed.compile import apply_compile
from torchtitan_hyena.distributed.fsdp import apply_fsdp
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.errors import ConfigError


def parallelize_llama(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    """Parallelize a meta-device Llama 3 model in place and return it."""
    if parallel_dims.tp_enabled:
        raise ConfigError("tensor parallelism is not available for llama3 in this build; set tensor_parallel_degree 1")
    if parallel_dims.cp_enabled:
        raise ConfigError("context parallelism is not available in this build; set context_parallel_degree 1")
    ac = job_config.activation_checkpoint
    apply_ac(model.layers, ac.mode, ac.selective_ac_option)
    if job_config.compile.enable and "model" in job_config.compile.components:
        apply_compile(model.layers, job_config.compile.backend)
    dp_mesh = parallel_dims.fsdp_mesh()
    if dp_mesh is not None:
        t = job_config.training
        apply_fsdp(
            model,
            dp_mesh,
            param_dtype=t.mixed_precision_param,
            reduce_dtype=t.mixed_precision_reduce,
            reshard_after_forward=job_config.parallelism.fsdp_reshard_after_forward,
            cpu_offload=t.enable_cpu_offload,
            units=[model.tok_embeddings, *model.layers.values()],
            last_unit=[model.norm, model.output],
        )
    return model
