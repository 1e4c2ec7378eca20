"""Measurement core of the convolution benchmarks, shared by ``bench/conv.py``, ``bench/li_fftconv_memory.py`` and
the device self-test (``tools/selftest``), so the numbers they report are measured one way.

* The Hyena convolutions (featurizer, SE, MR) at a shape, by implementation: the Triton kernels, ``F.conv1d`` (the
  torch reference) and an FFT conv; forward, backward and total times, the achieved bandwidth of the minimal HBM
  traffic (featurizer: 2 tensors forward, 3 backward; gated SE/MR: 4 forward, 7 backward), its fraction of
  ``torch.clone`` on the same shape, and the Triton speed-ups over the others.
* The Hyena-LI modal FFT convolution: its inputs, the three implementations (Triton pipeline, torch chunked op,
  vortex-style reference) and peak device memory over a call.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch

from torchtitan_hyena.ops import conv, fftconv

# Filter taps, gating, impulse-response order (flip) and D term; gated filters have 16 channels per group (Evo 2 7B).
OPS = {
    "featurizer": dict(taps=3, gated=False, flip=False, skip=False),
    "se": dict(taps=7, gated=True, flip=False, skip=False),
    "mr": dict(taps=128, gated=True, flip=True, skip=True),
}
CONV_IMPLS = ("triton", "conv1d", "fft")
LI_IMPLS = ("chunked", "triton", "reference")

Timer = Callable[[Callable[[], object]], float]


def op_channels(name: str, dim: int) -> int:
    """Channels of the operator's tensors at model width ``dim`` (the featurizer convolves q, k and v at once)."""
    return dim if OPS[name]["gated"] else 3 * dim


def fft_causal_conv(x: torch.Tensor, weight: torch.Tensor, flip: bool) -> torch.Tensor:
    """Depthwise causal conv by FFT with n = 2L in fp32 (``docs/stripedhyena2.md`` §3); weight (C, K)."""
    L = x.shape[1]
    h = (weight if flip else weight.flip(-1)).float()  # impulse response, h[:, 0] = lag 0
    n = 2 * L
    y = torch.fft.irfft(torch.fft.rfft(x.float().transpose(1, 2), n=n) * torch.fft.rfft(h, n=n), n=n)[..., :L]
    return y.transpose(1, 2)


def fft_gated_conv(q, k, v, h, skip, flip) -> torch.Tensor:
    s = k.float() * v.float()
    y = fft_causal_conv(s, conv.expand_groups(h, q.shape[-1]), flip)
    if skip is not None:
        y = y + skip.float() * s
    return (q.float() * y).to(q.dtype)


def make_op(name: str, impl: str, B: int, L: int, D: int, dtype: torch.dtype, device: torch.device):
    """(inputs requiring grad, forward closure) of operator ``name`` through implementation ``impl``."""
    spec = OPS[name]
    torch.manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    if not spec["gated"]:
        x, w = rand(B, L, op_channels(name, D)), rand(op_channels(name, D), spec["taps"], scale=0.5)
        fn = {
            "triton": lambda: conv.causal_conv(x, w, impl="triton"),
            "conv1d": lambda: conv.causal_conv(x, w, impl="torch"),
            "fft": lambda: fft_causal_conv(x, w, flip=False).to(dtype),
        }[impl]
        return [x, w], fn
    q, k, v = rand(B, L, D), rand(B, L, D), rand(B, L, D)
    h = rand(D // 16, spec["taps"], scale=spec["taps"] ** -0.5)
    skip = rand(D) if spec["skip"] else None
    args = (q, k, v, h, skip, spec["flip"])
    fn = {
        "triton": lambda: conv.gated_causal_conv(*args, impl="triton"),
        "conv1d": lambda: conv.gated_causal_conv(*args, impl="torch"),
        "fft": lambda: fft_gated_conv(*args),
    }[impl]
    return [t for t in (q, k, v, h, skip) if t is not None], fn


def timer(device: torch.device, reps: int = 5, warmup: int = 1) -> Timer:
    """Median milliseconds of a closure: ``triton.testing.do_bench`` on GPUs (clears L2 between runs), else the
    median of ``reps`` timed calls after ``warmup`` untimed ones."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_time(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu_time


def measure(name: str, impl: str, B: int, L: int, D: int, dtype: torch.dtype, device: torch.device, bench) -> dict:
    """Forward, backward and total milliseconds and GB/s of one operator and implementation."""
    inputs, fwd = make_op(name, impl, B, L, D, dtype, device)
    y = fwd()
    dy = torch.randn_like(y)
    bwd_ms = bench(functools.partial(torch.autograd.grad, y, inputs, dy, retain_graph=True))
    y = None  # free the graph before timing the forward
    fwd_ms = bench(fwd)
    total_ms = bench(lambda: torch.autograd.grad(fwd(), inputs, dy))
    tensors = (2, 3) if not OPS[name]["gated"] else (4, 7)
    C = op_channels(name, D)
    nbytes = [t * B * L * C * dtype.itemsize for t in (*tensors, sum(tensors))]
    row = {"op": name, "L": L, "impl": impl, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "total_ms": total_ms}
    for key, ms, n in zip(("fwd", "bwd", "total"), (fwd_ms, bwd_ms, total_ms), nbytes):
        row[f"{key}_GBps"] = n / ms / 1e6
    return row


def clone_gbps(B: int, L: int, C: int, dtype: torch.dtype, device: torch.device, bench) -> float:
    """Bandwidth of ``torch.clone`` (one read, one write) on a (B, L, C) tensor: the practical copy ceiling."""
    x = torch.empty(B, L, C, dtype=dtype, device=device)
    return 2 * x.numel() * dtype.itemsize / bench(lambda: x.clone()) / 1e6


def conv_rows(
    ops: list[str], lengths: list[int], impls: list[str], B: int, D: int, dtype: torch.dtype, device: torch.device,
    bench: Timer,
) -> list[dict]:  # fmt: skip
    """One row per (operator, length, implementation), with its fraction of clone bandwidth and, for Triton rows,
    the speed-ups over the other implementations; a shape that runs out of memory is a row with ``error``."""
    rows, clone = [], {}
    for name in ops:
        for L in lengths:
            C = op_channels(name, D)
            if (C, L) not in clone:
                clone[C, L] = clone_gbps(B, L, C, dtype, device, bench)
            for impl in impls:
                try:
                    row = measure(name, impl, B, L, D, dtype, device, bench)
                except torch.OutOfMemoryError:
                    row = {"op": name, "L": L, "impl": impl, "error": "out of memory"}
                if "error" in row:  # the failed attempt's tensors are released once the exception is gone
                    torch.cuda.empty_cache()
                row["clone_GBps"] = clone[C, L]
                for key in ("fwd", "bwd", "total"):
                    if f"{key}_GBps" in row:
                        row[f"{key}_frac_clone"] = row[f"{key}_GBps"] / clone[C, L]
                rows.append(row)
    _speedups(rows)
    return rows


def _speedups(rows: list[dict]) -> None:
    """Triton time over the other implementations' for the same operator and length (>1: Triton faster)."""
    by_key = {(r["op"], r["L"], r["impl"]): r for r in rows}
    for r in rows:
        if r["impl"] != "triton" or "error" in r:
            continue
        for other in ("conv1d", "fft"):
            o = by_key.get((r["op"], r["L"], other))
            if o and "error" not in o:
                for key in ("fwd", "bwd", "total"):
                    r[f"speedup_{other}_{key}"] = o[f"{key}_ms"] / r[f"{key}_ms"]


# --- Hyena-LI ---------------------------------------------------------------------------------------------------


def li_op(impl: str) -> Callable[..., torch.Tensor]:
    """The modal FFT conv through ``impl``: the torch ``chunked`` op, the ``triton`` pipeline or the vortex-style
    ``reference`` (materialises the (D, modes, L) modal tensor)."""
    if impl == "chunked":
        return lambda *a: conv.gated_modal_conv(*a, impl="torch")
    if impl == "triton":
        return lambda *a: conv.gated_modal_conv(*a, impl="triton")

    def reference(q, k, v, log_poles, residues, skip):
        h = fftconv.modal_filter_reference(log_poles, residues, q.shape[1])
        return fftconv.gated_fft_conv_reference(q, k, v, h, skip)

    return reference


def li_inputs(
    length: int, channels: int, device: torch.device, requires_grad: bool, dtype: torch.dtype = torch.float32,
    modes: int = 16,
) -> list[torch.Tensor]:  # fmt: skip
    """q, k, v (1, length, channels) in ``dtype``, and fp32 log_poles, residues, skip: one Hyena-LI layer's inputs."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, length, channels, generator=g).to(device, dtype) for _ in range(3))
    log_poles = (-torch.rand(channels, modes, generator=g) * 0.01).to(device)
    residues = torch.randn(channels, modes, generator=g).to(device)
    skip = torch.randn(channels, generator=g).to(device)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, log_poles, residues, skip)]


def li_call(op: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor | None) -> None:
    """One forward, and with ``grad`` one backward to every input."""
    with torch.set_grad_enabled(grad is not None):
        y = op(*inputs)
        if grad is not None:
            torch.autograd.grad(y, inputs, grad)


def cuda_peak(fn: Callable[[], object]) -> tuple[int, float]:
    """(bytes allocated at the peak of ``fn`` above what was allocated before it, synchronised wall seconds)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before, start = torch.cuda.memory_allocated(), time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, time.perf_counter() - start
