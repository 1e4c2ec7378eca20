"""Activation memory per rank, the dry run's model of it: the shared inputs, result and arithmetic.

Each model family estimates the bytes autograd saves per token and layer (its ``activations.py``, registered as
``TrainSpec.activation_estimator``); :func:`with_checkpointing` turns them into what one rank holds under the
activation-checkpointing mode, and finds the peak. The estimates are checked against the tensors autograd saves on
CPU (the dry-run tests).

Under pipeline parallelism a rank holds some blocks (``ActivationInputs.blocks``), the head only on the last stage,
and the activations of several microbatches at once (``in_flight``, see :func:`in_flight_microbatches`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ActivationInputs:
    """What one rank's activation memory (and its TP/CP traffic, ``tools/comm_model.py``) depends on, besides the
    model's shape."""

    microbatch: int  # sequences per forward/backward
    seq_len: int  # global sequence length
    tp: int
    cp: int
    act_bytes: int  # bytes per activation element (the compute dtype)
    ac_mode: str
    ac_option: str
    loss_parallel: bool
    cp_rotate: str = "allgather"  # allgather keeps the whole sequence's K/V per attention layer, ring one block
    cp_mr_method: str = "halo"  # hyena: Hyena-MR by halo exchange or all-to-all
    blocks: tuple[int, ...] | None = None  # pipeline: the blocks this rank holds (None: all)
    head: bool = True  # pipeline: this rank holds the last stage (final norm, head, loss)
    in_flight: float = 1.0  # pipeline: microbatches whose saved activations are alive at once

    @property
    def tokens(self) -> int:
        """Tokens of one microbatch on this rank, before TP splits them."""
        return self.microbatch * self.seq_len // self.cp


@dataclass(frozen=True)
class ActivationEstimate:
    saved: int  # tensors autograd keeps from forward to backward (all layers + head), at the end of forward
    peak: int  # the most alive at once: the layers' saved tensors plus the loss, or plus a recomputed block


# A model family's estimator (``TrainSpec.activation_estimator``): (model args, inputs) -> estimate.
ActivationEstimator = Callable[[Any, ActivationInputs], ActivationEstimate]


def norm_bytes(h: int) -> float:
    return 2 * 4 * h + 4  # RMSNorm keeps its input and normalised output in fp32, plus rstd


def with_checkpointing(
    s: ActivationInputs, layers: list[tuple[float, float]], block_input: float, head_saved: float, vocab: float, f: int
) -> ActivationEstimate:
    """Combine per-layer bytes per token, ``(full, kept by per-op SAC)``, according to the AC mode, add the head,
    and find the peak: the saved tensors plus the loss, or plus one recomputed block and its live gradients."""
    t, p, h = s.tp, s.act_bytes, block_input * s.tp / s.act_bytes
    tokens = s.tokens
    if s.blocks is not None:
        layers = [layers[i] for i in s.blocks]
    if not s.head:
        head_saved, vocab = 0.0, 0.0
    worst = max(full for full, _ in layers)
    if s.ac_mode == "none":
        per_layer, recompute = sum(full for full, _ in layers), 0.0
    elif s.ac_mode == "full":
        per_layer, recompute = len(layers) * block_input, worst
    elif s.ac_option == "op":
        per_layer, recompute = sum(op for _, op in layers), worst
    else:
        every = int(s.ac_option)
        per_layer = sum(block_input if i % every == 0 else full for i, (full, _) in enumerate(layers))
        recompute = worst
    head_transient = (p + 4 + 4) * vocab  # logits, their fp32 copy, its gradient
    block_transient = recompute + p * (2 * f / t + 2 * h)  # recomputed block, live gradients
    # The head's tensors are freed by the time the last block's backward (and recompute) starts. Other in-flight
    # microbatches (pipeline) keep what their forward saved.
    earlier = (s.in_flight - 1) * (per_layer + head_saved)
    peak = earlier + per_layer + max(head_saved + head_transient, block_transient)
    saved = s.in_flight * (per_layer + head_saved)
    return ActivationEstimate(saved=int(tokens * saved), peak=int(tokens * peak))


def in_flight_microbatches(schedule: str, pp_rank: int, pp: int, microbatches: int, stages_per_rank: int) -> float:
    """Microbatches whose forward activations a pipeline rank holds at its peak, in units of all its blocks.

    GPipe runs every forward before the first backward; 1F1B keeps ``pp - rank`` in flight (warm-up forwards, then
    one forward per backward); Interleaved1F1B warms up ``(v - 1) * pp + 2 * (pp - 1 - rank)`` stage chunks (torch's
    schedule with ``v`` stages per rank and at least ``pp`` microbatches), each chunk a ``1 / v`` share of the blocks.
    """
    if schedule == "GPipe":
        return float(microbatches)
    if schedule == "1F1B":
        return float(min(microbatches, pp - pp_rank))
    v = stages_per_rank
    chunks = min(microbatches * v, (v - 1) * min(microbatches, pp) + 2 * (pp - 1 - pp_rank) + 1)
    return chunks / v
