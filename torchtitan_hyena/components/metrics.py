"""Per-step metrics: a console line, ``metrics.jsonl`` and tensorboard (rank 0 writes)."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from torchtitan_hyena.tools.logging import logger


def memory_gib(device: torch.device) -> float:
    """Peak memory: allocator reserved bytes on GPUs, process max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsProcessor:
    def __init__(
        self,
        *,
        dump_folder: Path,
        enable_tensorboard: bool,
        tb_folder: str,
        is_writer: bool,
        flops_per_token: float,
        peak_flops: float | None,
        world_size: int,
        device: torch.device,
        total_steps: int,
        constants: dict[str, Any] | None = None,
    ) -> None:
        """``constants``: fields every record carries (LoRA: trainable and total parameters)."""
        self.is_writer = is_writer
        self.constants = dict(constants or {})
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.device = device
        self.total_steps = total_steps
        self.start = time.perf_counter()
        self._last_time = self.start
        self._last_tokens = 0
        self._steps_since = 0
        self.writer = None
        self.jsonl = None
        if is_writer:
            dump_folder.mkdir(parents=True, exist_ok=True)
            self.jsonl = (dump_folder / "metrics.jsonl").open("a")
            if enable_tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(dump_folder / tb_folder))

    def reset_timer(self, tokens_seen: int) -> None:
        """Start the throughput window (after a resume, or after the first compiled step)."""
        self._last_time = time.perf_counter()
        self._last_tokens = tokens_seen
        self._steps_since = 0

    def step_done(self) -> None:
        self._steps_since += 1

    def log(self, step: int, loss: float, grad_norm: float, lr: float, tokens_seen: int) -> dict[str, Any]:
        now = time.perf_counter()
        dt = max(now - self._last_time, 1e-9)
        tps = (tokens_seen - self._last_tokens) / dt
        step_time = dt / max(self._steps_since, 1)
        mfu = None
        if self.peak_flops is not None:
            mfu = 100.0 * self.flops_per_token * tps / (self.peak_flops * self.world_size)
        record = {
            "step": step,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_sec": tps,
            "tokens_per_sec_per_device": tps / self.world_size,
            "mfu": mfu,
            "memory_gib": memory_gib(self.device),
            "elapsed_s": now - self.start,
            "eta_s": step_time * (self.total_steps - step),
            **self.constants,
        }
        self.reset_timer(tokens_seen)
        if self.is_writer:
            mfu_text = "n/a" if mfu is None else f"{mfu:.1f}%"
            logger.info(
                f"step {step:>6}  loss {loss:8.4f}  grad_norm {grad_norm:8.4f}  lr {lr:.3e}  "
                f"tok/s {tps:10.0f}  mfu {mfu_text}  mem {record['memory_gib']:.2f}GiB  "
                f"eta {_hms(record['eta_s'])}"
            )
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            if self.writer is not None:
                for key, value in record.items():
                    if key != "step" and value is not None:
                        self.writer.add_scalar(f"train/{key}", value, step)
        return record

    def log_validation(self, step: int, loss: float, tokens: int) -> None:
        if not self.is_writer:
            return
        logger.info(f"validation  step {step:>6}  loss {loss:8.4f}  tokens {tokens}")
        path = Path(self.jsonl.name).with_name("validation.jsonl")
        with path.open("a") as f:
            f.write(json.dumps({"step": step, "validation_loss": loss, "tokens": tokens}) + "\n")
        if self.writer is not None:
            self.writer.add_scalar("validation/loss", loss, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
