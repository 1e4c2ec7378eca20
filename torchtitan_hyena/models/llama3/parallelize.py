"""Apply parallelisms to Llama 3, in TorchTitan's order: TP -> CP -> AC -> compile -> FSDP."""

from __future__ import annotations

from torch import nn

from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.distributed.parallelize_common import apply_ac_compile_fsdp
from torchtitan_hyena.errors import ConfigError


def parallelize_llama(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    """Parallelize a meta-device Llama 3 model in place and return it."""
    if parallel_dims.tp_enabled:
        raise ConfigError("tensor parallelism is not available for llama3 in this build; set tensor_parallel_degree 1")
    if parallel_dims.cp_enabled:
        raise ConfigError("context parallelism is not available in this build; set context_parallel_degree 1")
    apply_ac_compile_fsdp(
        model,
        model.layers,
        parallel_dims,
        job_config,
        first_units=[model.tok_embeddings],
        last_unit=[model.norm, model.output],
    )
    return model
