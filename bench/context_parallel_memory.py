"""Per-rank peak memory and communication of one StripedHyena 2 layer under context parallelism, on CPU (gloo).

    python bench/context_parallel_memory.py [--length 32768] [--dim 256] [--heads 4] [--degrees 1,2,4]

For each CP degree one torchrun job (that many ranks, one thread each) builds single-layer models of each kind
-- Hyena-LI (``H``, all-to-all), Hyena-MR (``D``, halo or all-to-all), Hyena-SE (``S``, halo) and attention (``*``,
all-gather or ring) -- wired exactly as ``parallelize`` wires them, and runs forward + backward of the layer on
this rank's L / cp tokens. Peak memory is measured as in ``li_fftconv_memory.py``: the kernel's peak-RSS counter is
reset (``/proc/self/clear_refs`` = 5), and the peak (VmHWM) minus the RSS before the pass is what the pass needed
(activations, temporaries, communication buffers, parameter gradients), with ``MALLOC_MMAP_THRESHOLD_`` so that RSS
follows frees. The table shows the largest rank; "vs cp 1" is cp-1 peak / this peak (goal: about cp).
"sent MiB" is what one rank sends for the layer's forward + backward (``track_communication``); the last rows
sum it over the debug model's layout (``SDH*SDH*``), i.e. the CP traffic of one training step per sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# (layer kind, context-parallel method); the method is ignored at cp 1.
CASES = [("H", "alltoall"), ("D", "halo"), ("D", "alltoall"), ("S", "halo"), ("*", "allgather"), ("*", "ring")]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _layer(kind: str, method: str, dim: int, heads: int, cp):
    """A one-layer StripedHyena with its layer wired for CP as parallelize_hyena does it."""
    import dataclasses

    from torchtitan_hyena.models.hyena.args import HyenaArgs
    from torchtitan_hyena.models.hyena.model import StripedHyena
    from torchtitan_hyena.models.hyena.parallelize import apply_cp

    args = HyenaArgs(dim=dim, layout=kind, n_heads=heads, ffn_hidden_dim=2 * dim, filter_groups=16, vocab_size=256,
                     conv_impl="torch")  # fmt: skip
    model = StripedHyena(args)
    model.init_weights(seed=0)
    if cp is not None:
        rotate = method if kind == "*" else "allgather"
        apply_cp(model, dataclasses.replace(cp, rotate_method=rotate, mr_method=method if kind == "D" else "halo"))
    return model


def _pass(model, seq: int, rank: int, degree: int) -> dict:
    """Forward + backward of the model's one layer on this rank's tokens: (peak MiB, MiB sent)."""
    import torch
    import torch.distributed as dist

    from torchtitan_hyena.distributed.context_parallel.collectives import track_communication
    from torchtitan_hyena.distributed.context_parallel.layout import local_positions
    from torchtitan_hyena.models.common.rope import rope_tables

    torch.manual_seed(rank)
    x = torch.randn(1, seq // degree, model.args.dim, requires_grad=True)
    grad = torch.randn_like(x)
    cos, sin = rope_tables(model.rope_inv_freq, local_positions(seq, rank, degree))
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    with track_communication() as sent:
        model.layers["0"](x, cos, sin).backward(grad)
    return {"peak_mib": (_status("VmHWM") - before) / 2**20, "sent_mib": sum(sent.values()) / 2**20}


def worker(length: int, dim: int, heads: int, out: str) -> None:
    import torch.distributed as dist

    from torchtitan_hyena.distributed.context_parallel.layout import ContextParallel

    dist.init_process_group("gloo")
    rank, degree = dist.get_rank(), dist.get_world_size()
    cp = ContextParallel(dist.group.WORLD, rank, degree) if degree > 1 else None
    rows = []
    for kind, method in CASES:
        if cp is None and (kind, method) in (("D", "alltoall"), ("*", "ring")):
            continue  # same as the other method without CP
        model = _layer(kind, method, dim, heads, cp)
        _pass(model, 2 * degree * 64, rank, degree)  # warm-up: library code, FFT plans, thread pools are not data
        rows.append({"kind": kind, "method": method if cp is not None else "-", **_pass(model, length, rank, degree)})
    everyone = [None] * degree
    dist.all_gather_object(everyone, rows)
    if rank == 0:
        keys = ("peak_mib", "sent_mib")
        worst = [{**r, **{k: max(o[i][k] for o in everyone) for k in keys}} for i, r in enumerate(rows)]
        Path(out).write_text(json.dumps(worst))
    dist.destroy_process_group()


def measure(degree: int, length: int, dim: int, heads: int) -> list[dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(degree),
               __file__, "--worker", str(length), str(dim), str(heads), str(out)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        return [{"cp": degree, **r} for r in json.loads(out.read_text())]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--degrees", default="1,2,4")
    args = p.parse_args()
    rows = [r for d in map(int, args.degrees.split(",")) for r in measure(d, args.length, args.dim, args.heads)]
    base = {r["kind"]: r["peak_mib"] for r in rows if r["cp"] == 1}
    for r in rows:
        r["vs_cp1"] = base[r["kind"]] / r["peak_mib"] if r["kind"] in base else None
    # CP traffic of one debug-model step (SDH*SDH*, default methods: MR halo, attention all-gather) per sequence.
    step = []
    for d in sorted({r["cp"] for r in rows if r["cp"] > 1}):
        per = {(r["kind"], r["method"]): r["sent_mib"] for r in rows if r["cp"] == d}
        mib = 2 * (per[("S", "halo")] + per[("D", "halo")] + per[("H", "alltoall")] + per[("*", "allgather")])
        step.append({"cp": d, "layout": "SDH*SDH*", "sent_mib_per_rank": mib})
    from tabulate import tabulate

    cols = ["cp", "kind", "method", "peak_mib", "vs_cp1", "sent_mib"]
    print(f"one layer, forward + backward, L = {args.length}, dim {args.dim}, {args.heads} heads, fp32, per rank")
    print(tabulate([[r[c] for c in cols] for r in rows], headers=[*cols[:4], "vs cp 1", "sent MiB"], floatfmt=".2f"))
    print(tabulate([[s["cp"], s["layout"], s["sent_mib_per_rank"]] for s in step],
                   headers=["cp", "model", "CP MiB sent per rank per sequence-step"], floatfmt=".2f"))  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "context_parallel_memory.json"
    settings = {"length": args.length, "dim": args.dim, "heads": args.heads, "dtype": "float32", "device": "cpu"}
    out.write_text(json.dumps({"settings": settings, "rows": rows, "step": step}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
