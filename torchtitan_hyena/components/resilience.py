"""Surviving a 512-GPU job: stop signals (preemption, time limit) and non-finite losses.

Exit statuses of ``python -m torchtitan_hyena.train`` (documented in the README):

====  =====================================================================================
 0    finished (``training.steps`` or ``training.stop_at_step`` reached)
 2    invalid input (config, paths, checkpoints), before any training
 3    non-finite loss or gradient norm: stopped before the update (``training.on_nonfinite_loss``)
 75   stopped by SIGTERM/SIGUSR1 after saving a checkpoint; rerunning resumes from it (EX_TEMPFAIL)
====  =====================================================================================
"""

from __future__ import annotations

import math
import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

from torchtitan_hyena.components.checkpoint import CheckpointManager, step_folders
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.tools.logging import logger

EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Remembers SIGTERM/SIGUSR1 so the trainer can finish the step, save and exit.

    The handler only sets a flag; ``agreed()`` (called once per step on every rank) all-reduces it,
    so a signal delivered to one rank stops every rank after the same step.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not on the main thread: SIGTERM/SIGUSR1 will not trigger a checkpoint")
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank when any rank has received a stop signal."""
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class NonFiniteLossError(UserError):
    """Training met a NaN/Inf loss or gradient norm and stopped before updating the weights."""

    exit_code = EXIT_NONFINITE


class NonFiniteGuard:
    """``training.on_nonfinite_loss``: stop at the first bad step, or skip up to ``max_skips`` updates.

    Every rank sees the same (all-reduced) loss and gradient norm, so every rank decides alike.
    Skips are counted per job (not checkpointed): a restart starts with a fresh allowance.
    """

    def __init__(self, policy: str, max_skips: int, checkpointer: CheckpointManager) -> None:
        self.policy = policy
        self.max_skips = max_skips
        self.checkpointer = checkpointer
        self.skipped: list[int] = []

    def should_skip(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """False for a finite step; True to skip the update; raises NonFiniteLossError to stop."""
        loss_value, norm_value = torch.stack([loss.double().cpu(), grad_norm.double().cpu()]).tolist()
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            return False
        what = f"loss {loss_value}, grad_norm {norm_value}"
        if self.policy == "skip" and len(self.skipped) < self.max_skips:
            self.skipped.append(step)
            logger.warning(
                f"non-finite {what} at step {step}: update skipped "
                f"({len(self.skipped)} of training.max_nonfinite_skips = {self.max_skips} used)"
            )
            return True
        reason = (
            f"after {len(self.skipped)} skipped steps (training.max_nonfinite_skips = {self.max_skips})"
            if self.policy == "skip"
            else "(training.on_nonfinite_loss = stop)"
        )
        raise NonFiniteLossError(
            f"non-finite {what} at step {step} {reason}: stopped before updating the weights; "
            f"{self.checkpoint_advice(step)} (lower optimizer.lr or tighten training.max_norm if it recurs)"
        )

    def checkpoint_advice(self, bad_step: int) -> str:
        """Which checkpoint to restart from. A finite loss does not make a checkpoint good: the update that
        produced the bad step can already have wrecked the weights saved just before it. So the advice names
        the newest checkpoint whose next step was finite (it ran on those weights without a skip) and warns
        about newer ones."""
        if not self.checkpointer.enabled:
            return "no checkpoint to restart from (checkpoint.enable = false)"
        self.checkpointer.wait()  # a background save of an earlier step
        complete = step_folders(self.checkpointer.folder)
        good = [s for s in complete if s + 1 < bad_step and s + 1 not in self.skipped]
        if not complete:
            return f"no checkpoint yet in {self.checkpointer.folder}"
        newest = max(complete)
        suspect = f"{complete[newest]} may hold the diverged weights (its next step was not finite)"
        if not good:
            return f"no checkpoint is known good: {suspect}; start over or restart from it with care"
        verified = f"the newest checkpoint whose next step was finite is {complete[max(good)]}"
        if max(good) == newest:
            return f"{verified}; a restart resumes from it"
        return f"{suspect}; {verified}: restart with --checkpoint.load_step {max(good)}"
