"""Benchmark the Hyena causal convolutions: Triton kernels vs ``F.conv1d`` (the torch reference) vs FFT conv.

    python bench/conv.py                                   # GPU: (1, 8k..131k, 4096), bf16, featurizer/SE/MR
    python bench/conv.py --lengths 8192,32768 --ops mr --dtype float32

For each operator, length and implementation it reports forward, backward and total (fwd + bwd) times, the
achieved bandwidth of the minimal HBM traffic (featurizer: 2 tensors fwd, 3 bwd; gated SE/MR: 4 fwd, 7 bwd) and
its fraction of ``torch.clone`` bandwidth on the same shape, and the Triton speedups over ``F.conv1d`` and FFT.
On CPU only the reference paths run (Triton needs a GPU), at smaller default sizes; with TRITON_INTERPRET=1 the
Triton path runs under the interpreter, which checks the script, not the speed. Results go to
``bench/results/conv_<device>_<dtype>.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan_hyena.ops import conv

RESULTS = Path(__file__).resolve().parent / "results"
# Filter taps, gating, impulse-response order (flip) and D term; gated filters have 16 channels per group (Evo 2 7B).
OPS = {
    "featurizer": dict(taps=3, gated=False, flip=False, skip=False),
    "se": dict(taps=7, gated=True, flip=False, skip=False),
    "mr": dict(taps=128, gated=True, flip=True, skip=True),
}


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
    """(inputs requiring grad, forward closure, channels of the operator's tensors)."""
    spec = OPS[name]
    torch.manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    if not spec["gated"]:
        C = 3 * D
        x, w = rand(B, L, C), rand(C, spec["taps"], scale=0.5)
        fn = {
            "triton": lambda: conv.causal_conv(x, w, impl="triton"),
            "conv1d": lambda: conv.causal_conv(x, w, impl="torch"),
            "fft": lambda: fft_causal_conv(x, w, flip=False).to(dtype),
        }[impl]
        return [x, w], fn, C
    q, k, v = rand(B, L, D), rand(B, L, D), rand(B, L, D)
    h = rand(D // 16, spec["taps"], scale=spec["taps"] ** -0.5)
    skip = rand(D) if spec["skip"] else None
    args = (q, k, v, h, skip, spec["flip"])
    fn = {
        "triton": lambda: conv.gated_causal_conv(*args, impl="triton"),
        "conv1d": lambda: conv.gated_causal_conv(*args, impl="torch"),
        "fft": lambda: fft_gated_conv(*args),
    }[impl]
    return [t for t in (q, k, v, h, skip) if t is not None], fn, D


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of a closure: ``triton.testing.do_bench`` on GPUs (clears L2 between runs)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_time(fn: Callable[[], object], reps: int = 5) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu_time


def measure(name: str, impl: str, B: int, L: int, D: int, dtype: torch.dtype, device: torch.device, bench) -> dict:
    inputs, fwd, C = make_op(name, impl, B, L, D, dtype, device)
    y = fwd()
    dy = torch.randn_like(y)
    bwd_ms = bench(functools.partial(torch.autograd.grad, y, inputs, dy, retain_graph=True))
    y = None  # free the graph before timing the forward
    fwd_ms = bench(fwd)
    total_ms = bench(lambda: torch.autograd.grad(fwd(), inputs, dy))
    tensors = (2, 3) if not OPS[name]["gated"] else (4, 7)
    nbytes = [t * B * L * C * dtype.itemsize for t in (*tensors, sum(tensors))]
    row = {"op": name, "L": L, "impl": impl, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "total_ms": total_ms}
    for key, ms, n in zip(("fwd", "bwd", "total"), (fwd_ms, bwd_ms, total_ms), nbytes):
        row[f"{key}_GBps"] = n / ms / 1e6
    return row


def clone_gbps(B: int, L: int, C: int, dtype: torch.dtype, device: torch.device, bench) -> float:
    x = torch.empty(B, L, C, dtype=dtype, device=device)
    return 2 * x.numel() * dtype.itemsize / bench(lambda: x.clone()) / 1e6


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="8192,16384,32768,65536,131072" if gpu else "1024,4096")
    p.add_argument("--dim", type=int, default=4096 if gpu else 256, help="model width D (featurizer: 3D channels)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--ops", default="featurizer,se,mr")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/conv_<device>_<dtype>)")
    args = p.parse_args()

    device = torch.device("cuda" if gpu else "cpu")
    dtype = getattr(torch, args.dtype)
    bench = timer(device)
    impls = ["conv1d", "fft"]
    if gpu:
        impls.insert(0, "triton")
        device_name = torch.cuda.get_device_name()
    else:
        from torchtitan_hyena.ops import triton_conv

        device_name = "cpu"
        if triton_conv.INTERPRETED:
            impls.insert(0, "triton")
            print("CPU: Triton runs under TRITON_INTERPRET=1; its times check the script, not the kernels' speed")
        else:
            print("CPU: Triton kernels need a GPU; running the reference paths only (F.conv1d and FFT)")

    rows, clone = [], {}
    for name in args.ops.split(","):
        for L in (int(s) for s in args.lengths.split(",")):
            C = 3 * args.dim if not OPS[name]["gated"] else args.dim
            clone[C, L] = clone_gbps(args.batch, L, C, dtype, device, bench)
            for impl in impls:
                try:
                    row = measure(name, impl, args.batch, L, args.dim, dtype, device, bench)
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
    _print(rows)
    meta = {
        "device": device_name,
        "torch": torch.__version__,
        "hip": torch.version.hip,
        "triton": _triton_version(),
        "dtype": args.dtype,
        "batch": args.batch,
        "dim": args.dim,
        "reference_only": "triton" not in impls,
        "host_cpus": os.cpu_count(),
        "host_load_avg_1m": os.getloadavg()[0],  # CPU timings are only as good as the machine is idle
    }
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    out = args.out or RESULTS / f"conv_{slug}_{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


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


def _print(rows: list[dict]) -> None:
    cols = [
        ("op", "op"), ("L", "L"), ("impl", "impl"), ("fwd ms", "fwd_ms"), ("bwd ms", "bwd_ms"),
        ("total ms", "total_ms"), ("fwd GB/s", "fwd_GBps"), ("bwd GB/s", "bwd_GBps"),
        ("fwd/clone", "fwd_frac_clone"), ("total/clone", "total_frac_clone"),
        ("x conv1d fwd", "speedup_conv1d_fwd"), ("x conv1d bwd", "speedup_conv1d_bwd"),
        ("x conv1d total", "speedup_conv1d_total"), ("x fft total", "speedup_fft_total"), ("error", "error"),
    ]  # fmt: skip
    table = [[r.get(key, "") for _, key in cols] for r in rows]
    print(tabulate(table, headers=[h for h, _ in cols], floatfmt=".3g"))


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    main()
