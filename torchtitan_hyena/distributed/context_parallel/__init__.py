"""Context parallelism (CP): one sequence split over ``parallelism.context_parallel_degree`` ranks.

Built from ``torch.distributed`` collectives with autograd, so it runs on every backend (NCCL/RCCL, gloo on CPU)
and with every attention kernel. The pieces:

* ``layout``: the load-balanced sharding (rank r holds chunks r and 2N-1-r of 2N); the trainer shards each batch
  (inputs, labels, loss weights) and passes the tokens' global positions to the model (RoPE).
* ``attention``: the model's inner attention replaced by all-gather or ring attention (both model families).
* ``convolution``: halo exchange for FIR convolutions, sequence <-> channel all-to-all for long convolutions.
* ``collectives``: the autograd-aware collectives underneath, with communication accounting.

The set-up (``build.py``) builds one :class:`ContextParallel` and hands it to the model family's parallelize plan
(after TP, before AC/compile/FSDP) and to the trainer (batch sharding); FSDP then shards parameters over
``dp_shard x cp`` and sums the gradients of the CP ranks. CP regions run eagerly: they are graph breaks under
torch.compile, and blocks compile without ``fullgraph`` when CP is on.
"""

from __future__ import annotations

from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.distributed.context_parallel.layout import ContextParallel
from torchtitan_hyena.distributed.parallel_dims import ParallelDims

__all__ = ["ContextParallel", "build_context_parallel"]


def build_context_parallel(parallel_dims: ParallelDims, job_config: JobConfig) -> ContextParallel | None:
    """This rank's CP group and options, or None when ``context_parallel_degree`` is 1 (mesh already built)."""
    if not parallel_dims.cp_enabled:
        return None
    mesh = parallel_dims.get_mesh("cp")
    p = job_config.parallelism
    return ContextParallel(
        group=mesh.get_group(),
        rank=mesh.get_local_rank(),
        degree=mesh.size(),
        rotate_method=p.context_parallel_rotate_method,
        mr_method=p.context_parallel_mr_method,
    )
