"""Per-block communication of a model family under TP/SP and CP, for the planner (``tools/planner/traffic.py``).

Each model family states the messages its blocks, embedding and head send in one forward and the backward that
follows (``TrainSpec.traffic_estimator``, its ``traffic.py``), built from the patterns here, which mirror the
shared parallel code: Megatron sequence parallelism (``distributed/tensor_parallel.py``), context-parallel
attention, halo exchanges and channel all-to-alls (``distributed/context_parallel``). Byte counts follow
``distributed/comm_counter.py``: an all-gather counts this rank's input shard, a reduce-scatter its full-size
input, an all-reduce, all-to-all or send the tensor it sends.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torchtitan_hyena.distributed.context_parallel.collectives import halo_plan
from torchtitan_hyena.tools.activation_memory import ActivationInputs

Bytes = Counter  # "dimension/op" -> bytes


@dataclass
class Messages:
    """One module's messages in a forward and in the backward that follows it."""

    forward: Bytes = field(default_factory=Counter)
    backward: Bytes = field(default_factory=Counter)

    def __add__(self, other: Messages) -> Messages:
        return Messages(self.forward + other.forward, self.backward + other.backward)


@dataclass
class ModelTraffic:
    blocks: list[Messages]  # per block, in order
    first: Messages  # the embedding (first stage)
    last: Messages  # final norm, head (last stage)


# A model family's estimator (``TrainSpec.traffic_estimator``): (model args, inputs) -> its TP/CP traffic.
TrafficEstimator = Callable[[Any, ActivationInputs], ModelTraffic]


# ---------------------------------------------------------------------------------------------- shared patterns
def gather(dim: str, shard_bytes: float, degree: int) -> Messages:
    """An all-gather of ``shard_bytes`` per rank whose backward reduce-scatters the gathered gradient."""
    if degree == 1:
        return Messages()
    return Messages(
        Counter({f"{dim}/all_gather": shard_bytes}), Counter({f"{dim}/reduce_scatter": shard_bytes * degree})
    )


def scatter(dim: str, full_bytes: float, degree: int) -> Messages:
    """A reduce-scatter of ``full_bytes`` per rank whose backward all-gathers the gradient shard."""
    if degree == 1:
        return Messages()
    return Messages(Counter({f"{dim}/reduce_scatter": full_bytes}), Counter({f"{dim}/all_gather": full_bytes / degree}))


def sequence_parallel_block(s: ActivationInputs, dim: int, norms: int = 2) -> Messages:
    """A pre-norm block under Megatron TP with sequence parallelism (``distributed/tensor_parallel.py``): the
    mixer and the MLP each all-gather their sequence-sharded input and reduce-scatter their output; the norms'
    weight gradients (partial on each rank, fp32) are all-reduced."""
    if s.tp == 1:
        return Messages()
    full = s.tokens * dim * s.act_bytes
    m = gather("tp", full / s.tp, s.tp) + scatter("tp", full, s.tp)
    m = m + gather("tp", full / s.tp, s.tp) + scatter("tp", full, s.tp)
    m.backward["tp/all_reduce"] += norms * dim * 4
    return m


def attention_cp(s: ActivationInputs, kv_dim: int) -> Messages:
    """Context-parallel attention (``distributed/context_parallel/attention.py``) on this rank's ``kv_dim / tp``
    K/V channels: all-gather K/V once (backward: reduce-scatter their gradients), or pass K/V around a ring (cp - 1
    sends forward; backward sends K/V and their gradients around again)."""
    if s.cp == 1:
        return Messages()
    kv = 2 * s.tokens * kv_dim / s.tp * s.act_bytes
    if s.cp_rotate == "allgather":
        return gather("cp", kv, s.cp)
    return Messages(Counter({"cp/send": (s.cp - 1) * kv}), Counter({"cp/send": 2 * (s.cp - 1) * kv}))


def channel_all_to_all(s: ActivationInputs, channels: int) -> Messages:
    """A long convolution run on channel shards of the whole sequence: its input to channels and its output back
    to sequence shards, forward and backward (``context_parallel/convolution.py``)."""
    if s.cp == 1:
        return Messages()
    x = s.tokens * channels / s.tp * s.act_bytes
    return Messages(Counter({"cp/all_to_all": 2 * x}), Counter({"cp/all_to_all": 2 * x}))


def halo(s: ActivationInputs, channels: int, width: int) -> Messages:
    """A causal FIR's halo of ``width`` positions on ``channels / tp`` channels: the positions each rank sends on
    average (``halo_plan``), forward, and their gradients back."""
    if s.cp == 1 or width == 0:
        return Messages()
    chunk = s.seq_len // (2 * s.cp)
    plan = halo_plan(s.cp, chunk, width)
    positions = sum(t.length for t in plan if t.src_rank != t.dst_rank) / s.cp
    x = (s.tokens // (2 * chunk)) * positions * channels / s.tp * s.act_bytes
    return Messages(Counter({"cp/send": x}), Counter({"cp/send": x}))


def vocab_parallel_embedding(s: ActivationInputs, dim: int) -> Messages:
    """A row-wise (vocabulary-sharded) embedding whose partial outputs are reduce-scattered into sequence shards."""
    return scatter("tp", s.tokens * dim * s.act_bytes, s.tp)


def replicated_embedding(s: ActivationInputs, dim: int) -> Messages:
    """A replicated embedding cut into sequence shards: no forward traffic; backward gathers the gradient."""
    if s.tp == 1:
        return Messages()
    return Messages(backward=Counter({"tp/all_gather": s.tokens * dim * s.act_bytes / s.tp}))


def vocab_parallel_head(s: ActivationInputs, dim: int, vocab: int) -> Messages:
    """A column-wise head: the final norm's sequence shards are gathered; without loss parallel the vocabulary
    shards of the logits are gathered too (their gradient is only sliced)."""
    if s.tp == 1:
        return Messages()
    m = gather("tp", s.tokens * dim * s.act_bytes / s.tp, s.tp)
    m.backward["tp/all_reduce"] += dim * 4  # the final norm's weight gradient
    if not s.loss_parallel:
        m.forward["tp/all_gather"] += s.tokens * vocab / s.tp * s.act_bytes
    return m


def replicated_head(s: ActivationInputs, dim: int) -> Messages:
    """A replicated (tied) head: the final norm's output is gathered whole; its gradient is only sliced."""
    if s.tp == 1:
        return Messages()
    return Messages(
        forward=Counter({"tp/all_gather": s.tokens * dim * s.act_bytes / s.tp}),
        backward=Counter({"tp/all_reduce": dim * 4}),  # the final norm's weight gradient
    )
