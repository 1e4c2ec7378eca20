"""Peak memory (and, where it means something, time) of the Hyena-LI FFT convolution: the torch chunked op, the
Triton pipeline and the vortex-style reference, side by side at several lengths.

    python bench/li_fftconv_memory.py [--lengths 8192,32768,131072] [--channels 256] [--impls chunked,triton,reference]
        [--block_elements N] [--out PATH]

Each measurement runs in a fresh subprocess. On CPU: inputs are allocated and touched, the kernel's peak-RSS counter
is reset (``/proc/self/clear_refs`` = 5, Linux >= 4.0) and the op runs; the peak (VmHWM) minus the RSS before the op,
plus the inputs, is the memory the op needed. ``MALLOC_MMAP_THRESHOLD_`` makes glibc return freed blocks, so RSS
follows the allocations. On a GPU: ``torch.cuda.max_memory_allocated`` over the op, plus the inputs. "ratio" divides
that by the bytes of the op's own inputs and outputs (forward: q, k, v, y; forward+backward adds dy, dq, dk, dv).

On CPU the Triton kernels run under ``TRITON_INTERPRET=1`` with one large tile per program (same kernels, a launch
configuration no GPU would use, so the interpreter finishes): the peak is then the torch side of the pipeline (FFT
buffers, spectra, outputs) plus a few MiB of interpreter tiles, an upper bound; its time says nothing about speed and
is not reported. CPU time (one thread) is reported for the torch paths. The reference materialises the (D, 16, L)
modal tensor, as vortex does, so it runs only up to ``--reference_max_length``. Every op is warmed up on a short input
first, so library code and FFT plans are not counted. Both FFT paths work over channel blocks of about
``BLOCK_ELEMENTS`` (B x c x L) values per temporary, 2^20 for torch and 2^25 for Triton (``block_channels`` column);
``--block_elements`` sets both, to compare the pipelines at equal blocks. Results:
``bench/results/li_fftconv_memory.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
IMPLS = ("chunked", "triton", "reference")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _interpreter_tiles() -> None:
    """One large tile per program: the interpreter's cost is per program, not per element."""
    import triton

    from torchtitan_hyena.ops import triton_backend as tb

    tiles = {"li_gate": {"BLOCK_T": 4096, "BLOCK_D": 64}, "li_modal": {"BLOCK_T": 4096, "BLOCK_D": 64}}
    tiles |= {"li_gate_bwd": tiles["li_gate"], "li_spectral": {"BLOCK": 1 << 18}}
    for kind, meta in tiles.items():
        configs = [triton.Config(meta, num_warps=4, num_stages=1)]
        tb.CONFIG_BUILDERS[kind] = (lambda *_, c=configs: c, tb.CONFIG_BUILDERS[kind][1])


def worker(impl: str, length: int, channels: int, backward: bool, block_elements: int) -> dict:
    import torch

    from torchtitan_hyena.ops import fftconv, triton_fftconv
    from torchtitan_hyena.tools.conv_bench import cuda_peak, li_call, li_inputs, li_op

    if block_elements:
        fftconv.BLOCK_ELEMENTS = triton_fftconv.BLOCK_ELEMENTS = block_elements

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    interpreted = impl == "triton" and not gpu
    if interpreted:
        _interpreter_tiles()
    op = li_op(impl)

    def make(length: int) -> list[torch.Tensor]:
        return li_inputs(length, channels, device, requires_grad=backward)

    def run(inputs: list[torch.Tensor], grad: torch.Tensor | None) -> None:
        li_call(op, inputs, grad if backward else None)

    def peak_bytes(fn) -> tuple[int, float]:
        """(peak bytes allocated while ``fn`` runs, seconds: CUDA-synchronised wall time or process CPU time)."""
        if gpu:
            return cuda_peak(fn)
        Path("/proc/self/clear_refs").write_text("5")
        before, start = _status("VmRSS"), time.process_time()
        fn()
        return _status("VmHWM") - before, time.process_time() - start

    # Warm-up: library code, FFT plans and caches are not the op's data. Under the interpreter a second short run's
    # peak is the interpreter's own per-program tiles (the op's buffers are tiny there), reported alongside.
    small, ones = make(256), torch.ones(1, 256, channels, device=device)
    run(small, ones)
    warm, _ = peak_bytes(functools.partial(run, small, ones))
    del small, ones
    inputs = make(length)
    grad = torch.randn(1, length, channels, device=device) if backward else None
    tensor_bytes = inputs[0].numel() * 4
    io_bytes = tensor_bytes * (8 if backward else 4)
    input_bytes = tensor_bytes * (4 if backward else 3)
    peak, seconds = peak_bytes(functools.partial(run, inputs, grad))
    op_bytes = peak + input_bytes
    budget = {"chunked": fftconv.BLOCK_ELEMENTS, "triton": triton_fftconv.BLOCK_ELEMENTS}.get(impl)
    return {
        "impl": impl,
        "length": length,
        "channels": channels,
        "pass": "forward+backward" if backward else "forward",
        "io_mib": io_bytes / 2**20,
        "peak_mib": op_bytes / 2**20,
        "ratio": op_bytes / io_bytes,
        "block_channels": fftconv.channel_block(1, length, channels, budget) if budget else channels,
        "seconds": None if interpreted else seconds,
        "interpreter_tiles_mib": warm / 2**20 if interpreted else None,
    }


def measure(impl: str, length: int, channels: int, backward: bool, block_elements: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    if impl == "triton" and not _gpu():
        env["TRITON_INTERPRET"] = "1"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        *(str(int(x)) for x in (length, channels, backward, block_elements)),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="8192,32768,131072")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {', '.join(IMPLS)}")
    p.add_argument("--reference_max_length", type=int, default=32768, help="the reference needs (D, 16, L) fp32")
    p.add_argument("--block_elements", type=int, default=0, help="channel-block budget of both paths (0: defaults)")
    p.add_argument("--out", type=Path, default=RESULTS / "li_fftconv_memory.json")
    args = p.parse_args()
    import torch
    from tabulate import tabulate

    rows = []
    for impl in args.impls.split(","):
        for length in (int(s) for s in args.lengths.split(",")):
            if impl == "reference" and length > args.reference_max_length:
                continue
            for backward in (False, True):
                rows.append(measure(impl, length, args.channels, backward, args.block_elements))
                print(json.dumps(rows[-1]), flush=True)
    cols = [
        "impl",
        "length",
        "block_channels",
        "pass",
        "io_mib",
        "peak_mib",
        "ratio",
        "seconds",
        "interpreter_tiles_mib",
    ]
    print(tabulate([[r[c] for c in cols] for r in rows], headers=cols, floatfmt=".2f", missingval="-"))
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "host": platform.processor() or platform.machine(),
        "host_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "1")),
        "dtype": "float32",
        "batch": 1,
        "modes": 16,
        "block_elements": args.block_elements or "defaults (torch 2^20, triton 2^25)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        impl, (length, channels, backward, block_elements) = sys.argv[2], map(int, sys.argv[3:7])
        print(json.dumps(worker(impl, length, channels, bool(backward), block_elements)))
    else:
        main()
