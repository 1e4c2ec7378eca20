"""Step time of a layout, term by term (README "Layout planner" explains each):

* **compute** = training FLOPs of the rank's share (its blocks and head, ``tokens / (cp x tp)`` tokens each, plus
  one more forward of every block that activation checkpointing recomputes) / (peak x efficiency); fp32 compute
  runs ``fp32_slowdown`` times slower.
* **communication**: each collective's bytes (``traffic.py``) on the wire, ``bytes x factor / bus bandwidth`` with
  nccl-tests' factors (all-gather (n-1), reduce-scatter (n-1)/n, all-reduce 2(n-1)/n, all-to-all (n-1)/n, send 1)
  plus a latency per call; a dimension's bandwidth is the intra-node figure while its groups fit in a node (mesh
  order pp, dp_replicate, dp_shard, cp, tp: the inner dimensions' ranks are neighbours) and the inter-node one
  otherwise.
* **overlap**: FSDP/HSDP collectives are prefetched and overlap compute (only what exceeds the compute shows,
  plus the first unit's gather); TP/SP, CP and pipeline sends are on the critical path (async TP hides half of the
  TP time).
* **pipeline bubble**: the stage time times ``(m + pp - 1) / m`` for ``m`` microbatches (``(m + (pp-1)/v) / m``
  with ``v`` stages per rank, interleaved).
"""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.distributed.pipeline_parallel import LOOPED, stage_count
from torchtitan_hyena.tools.planner.census import Census
from torchtitan_hyena.tools.planner.profiles import Profile
from torchtitan_hyena.tools.planner.traffic import micro_passes, recomputed, step_traffic

OVERLAPPED = ("dp_shard_cp", "dp_replicate")
ASYNC_TP_HIDDEN = 0.5


@dataclass(frozen=True)
class StepTime:
    compute: float
    exposed_comm: float  # communication on the critical path
    overlapped_comm: float  # FSDP/HSDP time (hidden up to the compute time)
    bubble: float  # pipeline idle time
    seconds: float  # the step
    comm_bytes: dict[str, float]  # per "dimension/op", the fullest pipeline rank's


def bus_factor(op: str, n: int) -> float:
    return {"all_gather": n - 1, "reduce_scatter": (n - 1) / n, "all_reduce": 2 * (n - 1) / n}.get(
        op, (n - 1) / n if op == "all_to_all" else 1.0
    )


def dimension_sizes(config: JobConfig) -> dict[str, tuple[int, int]]:
    """(group size, ranks spanned = size x the inner dimensions' sizes) of every mesh dimension."""
    p = config.parallelism
    tp, cp, shard = p.tensor_parallel_degree, p.context_parallel_degree, p.data_parallel_shard_degree
    replicate, pp = p.data_parallel_replicate_degree, p.pipeline_parallel_degree
    inner_replicate = shard * cp * tp
    return {
        "tp": (tp, tp),
        "cp": (cp, cp * tp),
        "dp_shard_cp": (shard * cp, shard * cp * tp),
        "dp_replicate": (replicate, replicate * inner_replicate),
        "pp": (pp, pp * replicate * inner_replicate),
    }


def comm_seconds(config: JobConfig, profile: Profile, traffic: dict[str, float]) -> dict[str, float]:
    """Seconds of each dimension's collectives for ``traffic`` bytes."""
    sizes = dimension_sizes(config)
    out: dict[str, float] = {}
    for key, nbytes in traffic.items():
        dim, op = key.split("/")
        n, span = sizes.get(dim, (2, 2))
        gbps = profile.intra_node_gbps if span <= profile.gpus_per_node else profile.inter_node_gbps
        out[dim] = out.get(dim, 0.0) + nbytes * bus_factor(op, max(n, 2)) / (gbps * 1e9)
    return out


def step_time(census: Census, config: JobConfig, profile: Profile, global_batch: int) -> StepTime:
    """The slowest pipeline rank's step (see module doc)."""
    p, t = config.parallelism, config.training
    pp, tp, cp = p.pipeline_parallel_degree, p.tensor_parallel_degree, p.context_parallel_degree
    dp = p.data_parallel_replicate_degree * p.data_parallel_shard_degree
    passes, microbatches = micro_passes(config, dp, global_batch)
    rate = profile.peak_tflops * 1e12 * profile.efficiency
    if t.mixed_precision_param == "float32":
        rate /= profile.fp32_slowdown
    microbatch = p.pipeline_parallel_microbatch_size if pp > 1 else t.local_batch_size
    tokens = passes * microbatch * t.seq_len / (cp * tp)  # per rank per step
    worst: StepTime | None = None
    for rank in range(pp):
        blocks, _, last = census.stage_blocks(config, rank)
        again = recomputed(config, blocks)
        flops = sum(census.layer_flops[b] * (4 / 3 if b in again else 1) for b in blocks)
        flops += census.head_flops if last else 0.0
        compute = flops * tokens / rate
        traffic = step_traffic(census, config, rank, global_batch)
        seconds = comm_seconds(config, profile, traffic)
        # latency: a block's TP/CP collectives are about 4 forward and 4 backward calls per pass
        latency = len(blocks) * passes * 8 * profile.latency_us * 1e-6 if tp * cp > 1 else 0.0
        exposed = sum(v for d, v in seconds.items() if d not in OVERLAPPED) + latency
        if p.enable_async_tensor_parallel:
            exposed -= ASYNC_TP_HIDDEN * seconds.get("tp", 0.0)
        overlapped = sum(v for d, v in seconds.items() if d in OVERLAPPED)
        first_gather = overlapped / max(1, len(blocks) * passes)
        busy = compute + exposed + max(0.0, overlapped - compute) + first_gather
        bubble = 0.0
        if pp > 1:
            v = stage_count(p, census.n_layers) // pp if p.pipeline_parallel_schedule in LOOPED else 1
            bubble = busy * ((pp - 1) / v) / microbatches
        step = StepTime(compute, exposed, overlapped, bubble, busy + bubble, dict(traffic))
        if worst is None or step.seconds > worst.seconds:
            worst = step
    assert worst is not None
    return worst
