"""Peak memory of the Hyena-LI FFT convolution on CPU: chunked modal op vs the vortex reference.

    python bench/li_fftconv_memory.py [--length 131072] [--channels 256]

Each measurement runs in a fresh subprocess: inputs are allocated and touched, the kernel's peak-RSS
counter is reset (``/proc/self/clear_refs`` = 5, Linux >= 4.0) and the op runs; the peak (VmHWM) minus
the RSS before the op, plus the inputs, is the memory the op needed. ``MALLOC_MMAP_THRESHOLD_`` makes
glibc return freed blocks, so RSS follows the allocations. "ratio" divides that by the bytes of the op's
own inputs and outputs (forward: q, k, v, y; forward+backward adds dy, dq, dk, dv); the target is <= 2.
Time is process CPU time (one thread by default), which a shared machine disturbs less than wall time.
The reference materialises the (D, 16, L) modal tensor, as vortex does, so it runs at a shorter length.
Both ops are warmed up on a short input first, so library code and FFT caches are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(impl: str, length: int, channels: int, backward: bool) -> dict:
    import torch

    from torchtitan_hyena.ops.fftconv import gated_fft_conv_reference, gated_modal_fft_conv, modal_filter_reference

    torch.manual_seed(0)
    # Warm up first: the first FFT/exp calls map library code and caches, which is not the op's data.
    small = [torch.randn(1, 1024, channels, requires_grad=True) for _ in range(3)]
    y = gated_modal_fft_conv(*small, -torch.ones(channels, 16), torch.ones(channels, 16), torch.ones(channels))
    y.sum().backward()
    del small, y
    q, k, v = (torch.randn(1, length, channels, requires_grad=backward) for _ in range(3))
    log_poles = (-torch.rand(channels, 16) * 0.01).requires_grad_(backward)
    residues = torch.randn(channels, 16, requires_grad=backward)
    skip = torch.randn(channels, requires_grad=backward)
    grad = torch.randn(1, length, channels) if backward else None
    tensor_bytes = q.numel() * 4
    io_bytes = tensor_bytes * (8 if backward else 4)
    inputs = tensor_bytes * (4 if backward else 3)

    def run():
        if impl == "chunked":
            y = gated_modal_fft_conv(q, k, v, log_poles, residues, skip)
        else:
            y = gated_fft_conv_reference(q, k, v, modal_filter_reference(log_poles, residues, length), skip)
        if backward:
            return y, torch.autograd.grad(y, [q, k, v, log_poles, residues, skip], grad)
        return y, None

    with torch.set_grad_enabled(backward):
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
        t0 = time.process_time()
        out = run()
        seconds = time.process_time() - t0
        peak = _status("VmHWM")
    del out
    op_bytes = peak - before + inputs
    return {
        "impl": impl,
        "length": length,
        "channels": channels,
        "pass": "forward+backward" if backward else "forward",
        "io_mib": io_bytes / 2**20,
        "peak_mib": op_bytes / 2**20,
        "ratio": op_bytes / io_bytes,
        "cpu_seconds": seconds,
    }


def measure(impl: str, length: int, channels: int, backward: bool) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--worker", impl, str(length), str(channels), str(int(backward))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--reference_length", type=int, default=32768, help="the reference needs (D, 16, L) fp32")
    args = p.parse_args()
    rows = []
    for length in sorted({args.reference_length, args.length}):
        for backward in (False, True):
            rows.append(measure("chunked", length, args.channels, backward))
    for backward in (False, True):
        rows.append(measure("reference", args.reference_length, args.channels, backward))
    from tabulate import tabulate

    cols = ["impl", "length", "channels", "pass", "io_mib", "peak_mib", "ratio", "cpu_seconds"]
    print(tabulate([[r[c] for c in cols] for r in rows], headers=cols, floatfmt=".2f"))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "li_fftconv_memory.json"
    out.write_text(json.dumps({"rows": rows, "target_ratio": 2.0}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        impl, length, channels, backward = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), bool(int(sys.argv[5]))
        print(json.dumps(worker(impl, length, channels, backward)))
    else:
        main()
