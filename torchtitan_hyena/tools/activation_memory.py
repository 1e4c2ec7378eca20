"""Activation memory per rank, the dry run's model of it: the shared inputs, result and arithmetic.

Each model family estimates the bytes autograd saves per token and layer (its ``activations.py``, registered as
``TrainSpec.activation_estimator``); :func:`with_checkpointing` turns them into what one rank holds under the
activation-checkpointing mode, and finds the peak. The estimates are checked against the tensors autograd saves on
CPU (the dry-run tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ActivationInputs:
    """What one rank's activation memory depends on, besides the model's shape."""

    microbatch: int  # sequences per forward/backward
    seq_len: int  # global sequence length
    tp: int
    cp: int
    act_bytes: int  # bytes per activation element (the compute dtype)
    ac_mode: str
    ac_option: str
    loss_parallel: bool
    cp_rotate: str = "allgather"  # allgather keeps the whole sequence's K/V per attention layer, ring one block


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
    tokens = s.microbatch * s.seq_len // s.cp
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
    # The head's tensors are freed by the time the last block's backward (and recompute) starts.
    peak = per_layer + max(head_saved + head_transient, block_transient)
    return ActivationEstimate(saved=int(tokens * (per_layer + head_saved)), peak=int(tokens * peak))
