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
import json
import os
import re
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan_hyena.tools.conv_bench import conv_rows, timer

RESULTS = Path(__file__).resolve().parent / "results"


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

    lengths = [int(s) for s in args.lengths.split(",")]
    rows = conv_rows(args.ops.split(","), lengths, impls, args.batch, args.dim, dtype, device, bench)
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
