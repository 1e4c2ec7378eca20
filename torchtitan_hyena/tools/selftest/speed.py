"""Kernel speed: the Triton convolutions' bandwidth as a fraction of ``torch.clone`` on the same bytes and their
speed-ups over ``F.conv1d`` and FFT (``bench/conv.py``'s measurement), and the Hyena-LI convolution's time and peak
memory for one layer (``bench/li_fftconv_memory.py``'s), Triton pipeline and torch chunked op side by side."""

from __future__ import annotations

import functools

import torch

from torchtitan_hyena.tools.conv_bench import (
    CONV_IMPLS,
    Timer,
    conv_rows,
    cuda_peak,
    li_call,
    li_inputs,
    li_op,
)
from torchtitan_hyena.tools.selftest.plan import Plan
from torchtitan_hyena.tools.selftest.report import Report

MIB = 2**20
DTYPE = torch.bfloat16  # the activations' dtype in training
DTYPE_NAME = str(DTYPE).removeprefix("torch.")


def conv_speed(report: Report, plan: Plan, device: torch.device, bench: Timer) -> None:
    rows = conv_rows(list(plan.speed_ops), list(plan.speed_lengths), list(CONV_IMPLS), 1, plan.speed_dim, DTYPE,
                     device, bench)  # fmt: skip
    for row in rows:
        report.add("kernel speed", {"D": plan.speed_dim, "dtype": DTYPE_NAME, **row})


def li_speed(report: Report, plan: Plan, device: torch.device, bench: Timer) -> None:
    """Forward and forward+backward time, and the peak memory of forward+backward (GPU allocator; none on CPU) with
    the bytes of the op's inputs, outputs and gradients for scale, per length and implementation."""
    for length in plan.li_speed_lengths:
        for impl in ("triton", "chunked"):
            row = {"impl": impl, "L": length, "D": plan.speed_dim, "dtype": DTYPE_NAME}
            try:
                row.update(_li_measure(impl, length, plan.speed_dim, device, bench))
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            if "error" in row:  # the failed attempt's tensors are released once the exception is gone
                torch.cuda.empty_cache()
            report.add("LI conv", row)


def _li_measure(impl: str, length: int, channels: int, device: torch.device, bench: Timer) -> dict[str, float]:
    op = li_op(impl)
    inputs = li_inputs(length, channels, device, requires_grad=True, dtype=DTYPE)
    grad = torch.randn_like(inputs[0])
    forward = [t.detach() for t in inputs]
    fwd_ms = bench(functools.partial(li_call, op, forward, None))
    total_ms = bench(functools.partial(li_call, op, inputs, grad))
    activation_bytes = inputs[0].numel() * inputs[0].element_size()
    row = {"fwd_ms": fwd_ms, "fwd_bwd_ms": total_ms, "io_mib": 8 * activation_bytes / MIB}  # q k v y dy dq dk dv
    if device.type == "cuda":
        peak, _ = cuda_peak(functools.partial(li_call, op, inputs, grad))
        row["peak_mib"] = (peak + 4 * activation_bytes) / MIB  # plus the inputs and dy, allocated before
    return row
