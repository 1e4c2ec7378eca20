"""Bytes each rank sends per training step, by mesh dimension and collective: the planner's traffic model.

Byte counts follow ``distributed/comm_counter.py`` (what the tests count in gloo runs): an all-gather counts this
rank's input shard, a reduce-scatter its full-size input, an all-reduce / all-to-all / send the tensor. The time
model (``step_time.py``) turns them into seconds with each collective's bus factor.

Where they come from:

* **TP / SP, CP** (per block, embedding and head): the model family's ``TrainSpec.traffic_estimator``, built from
  the shared patterns of ``tools/comm_model.py``, each a forward message list and its backward. Blocks that
  activation checkpointing recomputes send their forward messages again in backward.
* **FSDP** (``dp_shard_cp``): every unit all-gathers its shard in forward and, when it resharded after forward,
  again in backward (the root unit never reshards; the head unit only with ``always``); every unit
  reduce-scatters its gradient (fp32 by default) in each backward. Under pipeline parallelism the schedule keeps
  units gathered and reduces once per step.
* **HSDP** (``dp_replicate``): each reduce-scattered gradient shard is then all-reduced over the replicas.
* **PP** (``pp``): each microbatch's stage output forward and its gradient backward, per stage boundary; with tied
  embeddings the first and last stage sum their copies' gradient shards once per step.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable

from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.distributed.pipeline_parallel import stage_count, stage_ids
from torchtitan_hyena.dtypes import DTYPES
from torchtitan_hyena.tools.activation_memory import ActivationInputs
from torchtitan_hyena.tools.comm_model import Bytes
from torchtitan_hyena.tools.dry_run import activation_inputs
from torchtitan_hyena.tools.planner.census import Census
from torchtitan_hyena.tools.planner.memory import fsdp_degree, uses_fsdp


# ---------------------------------------------------------------------------------------------- a step
def traffic_inputs(config: JobConfig) -> ActivationInputs:
    """The per-rank inputs of the families' traffic models (the activation model's, with nothing per pipeline rank,
    so that results can be shared between ranks)."""
    s = activation_inputs(config, 0, (), config.parallelism.pipeline_parallel_degree)
    return dataclasses.replace(s, blocks=None, head=True, in_flight=1.0, ac_mode="none", ac_option="2")


def recomputed(config: JobConfig, blocks: Iterable[int]) -> set[int]:
    """Blocks whose forward (and its collectives) activation checkpointing runs again in backward."""
    ac = config.activation_checkpoint
    if ac.mode == "full":
        return set(blocks)
    if ac.mode == "selective" and ac.selective_ac_option != "op":
        return {b for b in blocks if b % int(ac.selective_ac_option) == 0}
    return set()  # per-op SAC saves the collectives' outputs


def micro_passes(config: JobConfig, dp_degree: int, global_batch: int) -> tuple[int, int]:
    """(forward/backward passes per step, of which pipeline microbatches per pass): gradient accumulation steps
    times pipeline microbatches."""
    p, t = config.parallelism, config.training
    accumulation = max(1, global_batch // (t.local_batch_size * dp_degree))
    microbatches = t.local_batch_size // p.pipeline_parallel_microbatch_size if p.pipeline_parallel_degree > 1 else 1
    return accumulation * microbatches, microbatches


def step_traffic(census: Census, config: JobConfig, pp_rank: int, global_batch: int) -> Bytes:
    """Bytes pipeline rank ``pp_rank``'s (first) rank sends in one training step, by "dimension/op"."""
    p = config.parallelism
    pp = p.pipeline_parallel_degree
    dp = p.data_parallel_replicate_degree * p.data_parallel_shard_degree
    passes, microbatches = micro_passes(config, dp, global_batch)
    blocks, first, last = census.stage_blocks(config, pp_rank)
    out: Bytes = Counter()
    if census.spec.traffic_estimator is not None:
        for key, value in _pass_traffic(census, config, tuple(blocks), first, last).items():
            out[key] += value * passes
    if uses_fsdp(config):
        out += _fsdp_traffic(census, config, pp_rank, passes if pp == 1 else passes // microbatches)
    if pp > 1:
        out += _pipeline_traffic(census, config, pp_rank, passes)
    return +out


def _pass_traffic(census: Census, config: JobConfig, blocks: tuple[int, ...], first: bool, last: bool) -> Bytes:
    """TP/CP bytes of one forward + backward of ``blocks`` (and the embedding / head when held), from the family's
    estimator; the search asks for the same inputs many times, so results are kept on the census."""
    inputs = traffic_inputs(config)
    again = tuple(sorted(recomputed(config, blocks)))
    key = ("pass", inputs, blocks, first, last, again)
    if key not in census.cache:
        if ("model", inputs) not in census.cache:
            census.cache["model", inputs] = census.spec.traffic_estimator(census.model_args, inputs)
        model = census.cache["model", inputs]
        total: Bytes = Counter()
        for b in blocks:
            m = model.blocks[b]
            total += m.forward + m.backward + (m.forward if b in again else Counter())
        for held, m in ((first, model.first), (last, model.last)):
            if held:
                total += m.forward + m.backward
        census.cache[key] = total
    return census.cache[key]


def _fsdp_traffic(census: Census, config: JobConfig, pp_rank: int, reductions: int) -> Bytes:
    """FSDP / HSDP collectives of one step (see module doc); ``reductions``: backward passes that reduce."""
    p = config.parallelism
    fsdp, replicate = fsdp_degree(config), p.data_parallel_replicate_degree
    policy = p.fsdp_reshard_after_forward
    pipeline = p.pipeline_parallel_degree > 1
    shard_dim = "dp_shard_cp" if fsdp > 1 else None
    reduce_bytes = DTYPES[config.training.mixed_precision_reduce].itemsize
    out: Bytes = Counter()
    for index, shard, trained in _unit_shards(census, config, pp_rank):
        unit = census.units[index]
        if pipeline:
            gathers = 1 if policy != "always" else 2 * reductions
        elif unit.root or (unit.last and policy != "always") or policy == "never":
            gathers = reductions
        else:
            gathers = 2 * reductions
        if shard_dim is not None:
            out[f"{shard_dim}/all_gather"] += gathers * shard * unit.gather_itemsize
            out[f"{shard_dim}/reduce_scatter"] += reductions * trained * fsdp * reduce_bytes
        if replicate > 1:
            out["dp_replicate/all_reduce"] += reductions * trained * reduce_bytes
    return out


def _unit_shards(census: Census, config: JobConfig, pp_rank: int) -> list[tuple[int, int, int]]:
    """(unit, elements of this rank's shard, of which trainable) of every FSDP unit on pipeline rank ``pp_rank``."""
    tp, fsdp = config.parallelism.tensor_parallel_degree, fsdp_degree(config)
    params = census.rank_params(config, pp_rank)
    key = ("unit shards", id(params), tp, fsdp)
    if key not in census.cache:
        units: dict[int, list[int]] = {}
        for q in params:
            n = q.local_numel(tp, fsdp)
            entry = units.setdefault(q.unit, [0, 0])
            entry[0] += n
            entry[1] += n if q.trainable else 0
        census.cache[key] = [(i, s, t) for i, (s, t) in units.items()]
    return census.cache[key]


def _pipeline_traffic(census: Census, config: JobConfig, pp_rank: int, passes: int) -> Bytes:
    """Stage outputs forward and their gradients backward, for every stage boundary this rank sends across."""
    p = config.parallelism
    stages = stage_count(p, census.n_layers)
    mine = stage_ids(pp_rank, p.pipeline_parallel_degree, stages)
    x = traffic_inputs(config)
    activation = x.tokens * census.model_args.dim / x.tp * x.act_bytes
    sends = sum(s < stages - 1 for s in mine) + sum(s > 0 for s in mine)
    out = Counter({"pp/send": sends * passes * activation})
    if census.tied and (0 in mine or stages - 1 in mine):  # the tied copies' gradients, summed once per step
        tp, fsdp = p.tensor_parallel_degree, fsdp_degree(config)
        out["pp/all_reduce"] = sum(q.local_numel(tp, fsdp) * q.itemsize for q in census.params if q.top in census.tied)
    return out
