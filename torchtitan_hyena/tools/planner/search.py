"""Enumerate layouts for a world size, discard those that cannot run or fit, rank the rest by predicted step time.

A candidate is the job's config with its layout replaced: data-parallel replicate x shard, TP, CP (and its
attention / Hyena-MR methods), PP (schedule, microbatch size; at least one microbatch per stage), activation
checkpointing and the local batch (the global batch stays the job's; gradient accumulation makes up the
difference). It is discarded when the project's own checks reject it (``build.validate``, as a launch would) or
when the dry run's memory model (``memory.py``) exceeds the device; the rest are ranked by ``step_time.py``.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torchtitan_hyena import build
from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.distributed.float8 import Accelerator
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.tools.planner.census import Census
from torchtitan_hyena.tools.planner.memory import peak_memory
from torchtitan_hyena.tools.planner.profiles import Profile
from torchtitan_hyena.tools.planner.step_time import StepTime, step_time

POWERS = (1, 2, 4, 8, 16, 32, 64, 128)
AC_MODES = (("none", "2"), ("selective", "op"), ("full", "2"))
SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B")
MICROBATCHES = (1, 2, 4)  # sequences per pipeline microbatch
NO_FIT = "does not fit"


@dataclass
class Candidate:
    overrides: dict[str, Any]  # "section.key" -> value
    config: JobConfig
    memory: dict[str, int]
    time: StepTime
    tokens_per_s_per_device: float
    mfu: float

    @property
    def layout(self) -> str:
        p = self.config.parallelism
        return (
            f"pp {p.pipeline_parallel_degree} x rep {p.data_parallel_replicate_degree} x shard "
            f"{p.data_parallel_shard_degree} x cp {p.context_parallel_degree} x tp {p.tensor_parallel_degree}"
        )


def with_overrides(config: JobConfig, overrides: dict[str, Any]) -> JobConfig:
    """A copy of ``config`` with ``overrides`` set; the sections it changes are copied, the rest shared."""
    c = copy.copy(config)
    for section in {key.split(".")[0] for key in overrides}:
        setattr(c, section, copy.copy(getattr(config, section)))
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(c, section), name, value)
    return c


def global_batch_of(config: JobConfig, world: int) -> int:
    """The job's global batch in sequences (the hand-set layout's when not given)."""
    t, p = config.training, config.parallelism
    if t.global_batch_size > 0:
        return t.global_batch_size
    shard = p.data_parallel_shard_degree
    if shard == -1:
        rest = p.pipeline_parallel_degree * p.data_parallel_replicate_degree * p.context_parallel_degree
        shard = world // (rest * p.tensor_parallel_degree)
    return t.local_batch_size * shard * p.data_parallel_replicate_degree


def layouts(config: JobConfig, world: int, gpus_per_node: int, n_layers: int) -> Iterator[dict[str, Any]]:
    """Every layout of the search space as config overrides (see module doc)."""
    seq, batch = config.training.seq_len, global_batch_of(config, world)
    for tp, cp, pp in itertools.product(POWERS, POWERS, POWERS):
        if tp > gpus_per_node or world % (tp * cp * pp) or pp > n_layers or seq % (2 * cp):
            continue
        dp = world // (tp * cp * pp)
        if batch % dp:
            continue
        replicas = {1}  # FSDP over all data-parallel ranks, or HSDP with each shard group inside one node
        if gpus_per_node % (tp * cp) == 0:
            replicas.add(dp * tp * cp // gpus_per_node)
        for replicate in sorted(r for r in replicas if r >= 1 and dp % r == 0):
            for (ac, option), local in itertools.product(AC_MODES, POWERS):
                if batch % (local * dp) or local > 8:
                    continue
                base = {
                    "parallelism.data_parallel_replicate_degree": replicate,
                    "parallelism.data_parallel_shard_degree": dp // replicate,
                    "parallelism.tensor_parallel_degree": tp,
                    "parallelism.context_parallel_degree": cp,
                    "parallelism.pipeline_parallel_degree": pp,
                    "activation_checkpoint.mode": ac,
                    "activation_checkpoint.selective_ac_option": option,
                    "training.local_batch_size": local,
                    "training.global_batch_size": batch,
                }
                methods = itertools.product(("allgather", "ring"), ("halo", "alltoall")) if cp > 1 else [(None, None)]
                for rotate, mr in methods:
                    cp_keys = {}
                    if rotate is not None:
                        cp_keys = {
                            "parallelism.context_parallel_rotate_method": rotate,
                            "parallelism.context_parallel_mr_method": mr,
                        }
                    if pp == 1:
                        yield {**base, **cp_keys}
                        continue
                    for schedule, microbatch in itertools.product(SCHEDULES, MICROBATCHES):
                        if local % microbatch or local // microbatch < pp:
                            continue
                        yield {
                            **base,
                            **cp_keys,
                            "parallelism.pipeline_parallel_schedule": schedule,
                            "parallelism.pipeline_parallel_microbatch_size": microbatch,
                            "parallelism.pipeline_parallel_split_points": [],
                            "parallelism.pipeline_parallel_layers_per_stage": -1,
                        }


def evaluate(
    census: Census, config: JobConfig, overrides: dict[str, Any], world: int, profile: Profile, target: Accelerator
) -> Candidate | str:
    """The candidate's predictions, or why it was discarded (the check's one line, or "does not fit: ...")."""
    c = with_overrides(config, {"parallelism.data_parallel_shard_degree": None, **overrides})
    p = c.parallelism
    if p.data_parallel_shard_degree is None:
        p.data_parallel_shard_degree = config.parallelism.data_parallel_shard_degree
    if p.data_parallel_shard_degree == -1:  # the ranks left over, as a launch resolves it
        rest = p.pipeline_parallel_degree * p.data_parallel_replicate_degree * p.context_parallel_degree
        p.data_parallel_shard_degree = max(1, world // (rest * p.tensor_parallel_degree))
    try:
        build.validate(c, ParallelDims.from_config(c.parallelism, world), target, files=False)
    except ConfigError as e:
        return str(e)
    batch = global_batch_of(c, world)
    memory = peak_memory(census, c, profile.device_bytes, batch)
    if memory["total"] > profile.device_bytes:
        return f"{NO_FIT}: {memory['total'] / 2**30:.1f} of {profile.memory_gib:.1f} GiB"
    time = step_time(census, c, profile, batch)
    tokens = batch * c.training.seq_len / time.seconds / world
    mfu = census.flops_per_token * tokens / (profile.peak_tflops * 1e12)
    return Candidate(overrides, c, memory, time, tokens, mfu)


def search(
    census: Census, config: JobConfig, world: int, profile: Profile, target: Accelerator
) -> tuple[list[Candidate], Counter]:
    """Every layout that runs and fits, fastest first, and the count of discarded layouts by reason."""
    kept: dict[tuple, Candidate] = {}
    rejected: Counter = Counter()
    for overrides in layouts(config, world, profile.gpus_per_node, census.n_layers):
        result = evaluate(census, config, overrides, world, profile, target)
        if isinstance(result, str):
            rejected["do not fit in memory" if result.startswith(NO_FIT) else "rejected by the layout checks"] += 1
            continue
        # Options the model does not use (e.g. the Hyena-MR method for Llama) predict the same: keep one.
        key = (result.layout, result.memory["total"], round(result.time.seconds, 9), _pipeline(result.config))
        if key not in kept or _default_first(result, kept[key], config):
            kept[key] = result
    return sorted(kept.values(), key=lambda r: (round(r.time.seconds, 6), r.memory["total"])), rejected


def _pipeline(c: JobConfig) -> str:
    return c.parallelism.pipeline_parallel_schedule if c.parallelism.pipeline_parallel_degree > 1 else ""


def _default_first(new: Candidate, old: Candidate, config: JobConfig) -> bool:
    """Among equivalent layouts prefer the job's own CP methods."""
    p = config.parallelism

    def same(c: Candidate) -> int:
        q = c.config.parallelism
        return (q.context_parallel_rotate_method == p.context_parallel_rotate_method) + (
            q.context_parallel_mr_method == p.context_parallel_mr_method
        )

    return same(new) > same(old)
