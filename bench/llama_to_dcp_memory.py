"""Peak memory of llama_to_dcp on a synthetic ~1 GB Llama checkpoint, vs its largest layer and vs loading everything.

    python bench/llama_to_dcp_memory.py [--sources meta-1 meta-2 hf]

A random bf16 checkpoint (8 layers of dim 2048) is written to a temporary folder in Meta format
(params.json + consolidated.NN.pth, 1 or 2 model-parallel shards) or HF format (config.json +
model.safetensors), then each converter runs in its own subprocess:

* ``streaming``: ``llama_to_dcp`` (memory-mapped shards / safe_open, one tensor materialized at a time);
* ``load-everything``: load every file into memory, merge, ``dcp.save`` the whole state dict.

Peak RSS is the child's ``VmHWM``; ``net`` subtracts the RSS after imports and torch's one-time
meta-kernel set-up (the same for both converters): what the conversion itself costs. The bound is
the bytes of one transformer layer (the largest tensor set of a layer); the goal is a net peak
<= 1.3x that bound.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure the checkout this file belongs to, installed or not
PARAMS = {"dim": 2048, "n_layers": 8, "n_heads": 16, "n_kv_heads": 4, "vocab_size": 16384, "multiple_of": 256,
          "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}  # fmt: skip
_COLUMN = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight", "tok_embeddings.weight")
_ROW = ("wo.weight", "w2.weight")


def split_dim(key: str) -> int | None:
    """Meta model parallelism: rows of column-parallel weights (and Llama 3's vocab), columns of row-parallel ones."""
    return 0 if key.endswith(_COLUMN) else 1 if key.endswith(_ROW) else None


def proc_status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries that over exec from the
    parent, so a child would report the parent's footprint."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def make_checkpoint(folder: Path, source: str) -> tuple[int, int]:
    """Random checkpoint in ``source`` format (Meta shards split like Meta's model-parallel files, or HF);
    returns (total bytes, largest layer bytes)."""
    from safetensors.torch import save_file

    from torchtitan_hyena.convert.llama import expected_shapes
    from torchtitan_hyena.models.llama3.state_dict_adapter import HFAdapter, MetaAdapter, to_hf_name

    folder.mkdir(parents=True)
    args = MetaAdapter.args_from_config(PARAMS)
    shards = int(source.split("-")[1]) if source.startswith("meta-") else 1
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    total, layer = 0, {}
    torch.manual_seed(0)
    for key, shape in expected_shapes(args).items():
        t = torch.randn(shape, dtype=torch.bfloat16)
        total += t.nbytes
        if key.startswith("layers."):
            layer[key.split(".")[1]] = layer.get(key.split(".")[1], 0) + t.nbytes
        dim = split_dim(key)
        pieces = [t] * shards if dim is None else t.chunk(shards, dim)
        for part, piece in zip(parts, pieces):
            part[key] = piece.clone()
    if source == "hf":
        (folder / "config.json").write_text(json.dumps(HFAdapter(args).config(torch.bfloat16)))
        save_file({to_hf_name(k): t for k, t in parts[0].items()}, folder / "model.safetensors", {"format": "pt"})
    else:
        (folder / "params.json").write_text(json.dumps(PARAMS))
        for i, part in enumerate(parts):
            torch.save(part, folder / f"consolidated.{i:02d}.pth")
    return total, max(layer.values())


def load_everything(input_dir: Path, output_dir: Path) -> None:
    """The straightforward converter: every file in memory, merged, saved in one dcp.save (no q/k work: memory only)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from torchtitan_hyena.models.llama3.state_dict_adapter import from_hf_name

    if (input_dir / "model.safetensors").exists():
        shards = [{from_hf_name(k): t for k, t in load_file(input_dir / "model.safetensors").items()}]
    else:
        shards = [torch.load(p, weights_only=True) for p in sorted(input_dir.glob("consolidated.*.pth"))]
    merged = {}
    for key in shards[0]:
        if key in ("tok_embeddings.weight", "output.weight"):
            continue
        dim = split_dim(key)
        merged[key] = shards[0][key] if dim is None or len(shards) == 1 else torch.cat([s[key] for s in shards], dim)
    dcp.save(merged, checkpoint_id=str(output_dir), no_dist=True)


def child(kind: str, input_dir: Path, output_dir: Path) -> None:
    """Run one converter and print {baseline, peak, seconds} as JSON (measured in this process only)."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed.checkpoint  # noqa: F401  (imports of both converters belong to the baseline)

    from torchtitan_hyena.convert.llama import expected_shapes, llama_to_dcp
    from torchtitan_hyena.models.llama3.args import Llama3Args

    # The first model built on the meta device loads torch's meta kernels (~100 MiB, whatever the model size).
    expected_shapes(Llama3Args(dim=64, n_layers=1, n_heads=4))
    baseline = proc_status_mib("VmRSS")
    t0 = time.perf_counter()
    if kind == "streaming":
        llama_to_dcp(input_dir, output_dir)
    else:
        load_everything(input_dir, output_dir)
    seconds = time.perf_counter() - t0
    peak = proc_status_mib("VmHWM")
    print(json.dumps({"baseline_mib": baseline, "peak_mib": peak, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", nargs="+", default=["meta-1", "meta-2", "hf"], help="meta-N (N shards) or hf")
    parser.add_argument("--out", default="bench/results/llama_to_dcp_memory.json")
    parser.add_argument("--child", choices=("streaming", "load-everything"), help=argparse.SUPPRESS)
    parser.add_argument("--input_dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.input_dir, args.output_dir)
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="llama_to_dcp_bench-") as tmp:
        for source in args.sources:
            src = Path(tmp) / source
            total, layer = make_checkpoint(src, source)
            for kind in ("streaming", "load-everything"):
                out = Path(tmp) / f"out-{source}-{kind}"
                cmd = [sys.executable, __file__, "--child", kind, "--input_dir", str(src), "--output_dir", str(out)]
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                net, layer_mib = r["peak_mib"] - r["baseline_mib"], layer / 2**20
                rows.append({"source": source, "converter": kind, "checkpoint_mib": total / 2**20,
                             "largest_layer_mib": layer_mib, "baseline_mib": r["baseline_mib"],
                             "peak_mib": r["peak_mib"], "net_peak_mib": net, "net_peak_over_layer": net / layer_mib,
                             "seconds": r["seconds"]})  # fmt: skip
                shutil.rmtree(out)
            shutil.rmtree(src)

    from tabulate import tabulate

    headers = ["source", "converter", "ckpt MiB", "layer MiB", "baseline MiB", "peak MiB", "net MiB", "net/layer", "s"]
    print(f"synthetic checkpoint {PARAMS['n_layers']} x dim {PARAMS['dim']} bf16; goal: net peak <= 1.3x layer")
    print(tabulate([list(r.values()) for r in rows], headers=headers, floatfmt=".2f"))
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''} (CPU), torch {torch.__version__}".strip(),
        "command": "python bench/llama_to_dcp_memory.py --sources " + " ".join(args.sources),
        "params": PARAMS,
        "note": "net = peak RSS (VmHWM) - RSS after imports; CPU shared with other jobs: seconds are indicative",
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
