"""Peak memory per rank of a layout: the dry run's memory model, by arithmetic on the census.

The terms are the dry run's (``tools/dry_run.py``): parameters, gradients and optimizer state from the sharded
parameter shapes (TP splits a parameter's TP dimension, FSDP then its first dimension, rank 0 holding the largest
shard), FSDP gather/reduce buffers from the gathered unit sizes, activations from the family's own estimator, and
the runtime reserve. Under pipeline parallelism each pipeline rank is sized with its own blocks, head and
microbatches in flight, and the fullest one is the layout's figure. The tests hold these numbers against the dry
run of the same layout and against the tensors small CPU runs actually keep alive.
"""

from __future__ import annotations

from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.distributed.pipeline_parallel import stage_count
from torchtitan_hyena.tools.dry_run import (
    OPTIMIZER_STATES,
    RESERVE_FRACTION,
    activation_inputs,
    fsdp_buffer_bytes,
    peak_bytes,
)
from torchtitan_hyena.tools.planner.census import Census


def fsdp_degree(config: JobConfig) -> int:
    """Ranks one FSDP shard group spans (data-parallel shards x context parallel); 1 without FSDP."""
    p = config.parallelism
    return p.data_parallel_shard_degree * p.context_parallel_degree


def uses_fsdp(config: JobConfig) -> bool:
    p = config.parallelism
    return p.data_parallel_replicate_degree > 1 or fsdp_degree(config) > 1


def rank_memory(
    census: Census, config: JobConfig, pp_rank: int, device_bytes: int, global_batch: int
) -> dict[str, int]:
    """Bytes of each memory term on (the first rank of) pipeline rank ``pp_rank``; ``total`` is their peak
    (``dry_run.peak_bytes``) plus the reserve."""
    p = config.parallelism
    tp, fsdp = p.tensor_parallel_degree, fsdp_degree(config)
    params = census.rank_params(config, pp_rank)
    key = ("shards", id(params), tp, fsdp)
    if key not in census.cache:
        units: dict[int, int] = {}
        for q in params:
            units[q.unit] = units.get(q.unit, 0) + q.tp_numel(tp)
        census.cache[key] = (
            sum(q.local_numel(tp, fsdp) * q.itemsize for q in params),
            sum(q.local_numel(tp, fsdp) * q.itemsize for q in params if q.trainable),
            list(units.values()),
        )
    param_bytes, trained, units = census.cache[key]
    buffers = fsdp_buffer_bytes(config, units) if uses_fsdp(config) else 0
    blocks, _, _ = census.stage_blocks(config, pp_rank)
    n_stages = stage_count(config.parallelism, census.n_layers)
    activations = 0
    if census.spec.activation_estimator is not None:
        inputs = activation_inputs(config, pp_rank, tuple(blocks), n_stages)
        if ("activations", inputs) not in census.cache:
            estimate = census.spec.activation_estimator(census.model_args, inputs)
            census.cache["activations", inputs] = estimate.peak
        activations = census.cache["activations", inputs]
    terms = {
        "parameters": param_bytes,
        "gradients": trained,
        "optimizer": trained * OPTIMIZER_STATES.get(config.optimizer.name, 2),
        "fsdp_buffers": buffers,
        "activations": activations,
        "reserve": int(RESERVE_FRACTION * device_bytes),
    }
    dp = p.data_parallel_replicate_degree * p.data_parallel_shard_degree
    peak = peak_bytes(
        param_bytes, trained, terms["optimizer"], buffers + activations,
        grads_in_peak=global_batch > config.training.local_batch_size * dp,
        offloaded=config.training.enable_cpu_offload,
    )  # fmt: skip
    terms["total"] = peak + terms["reserve"]
    return terms


def peak_memory(census: Census, config: JobConfig, device_bytes: int, global_batch: int) -> dict[str, int]:
    """The fullest pipeline rank's memory terms (see :func:`rank_memory`)."""
    ranks = range(config.parallelism.pipeline_parallel_degree)
    return max((rank_memory(census, config, r, device_bytes, global_batch) for r in ranks), key=lambda m: m["total"])
