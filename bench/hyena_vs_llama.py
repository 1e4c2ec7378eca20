"""Training-step time of the StripedHyena 2 debug stack vs a same-width Llama, side by side, vs length.

    python bench/hyena_vs_llama.py [--lengths 2048,8192,16384] [--repeats 1] [--device cpu] [--threads 1]

Both models: width 256, 8 layers, 4 heads of 64, MLP width 512, vocab 256. Hyena is the ``debugmodel``
flavor (SDH*SDH*: 2 attention layers of 8); Llama has attention in every layer. One step = forward,
cross-entropy, backward on one sequence (batch 1), fp32, after a warm-up step at the same length;
the best of ``--repeats`` is kept. On CPU the time is process CPU time with ``--threads`` threads
(1 by default: on a shared machine CPU time is what a busy neighbour does not distort; on an idle
machine it equals wall time); on GPUs it is synchronised wall time. "growth" is the step time
relative to the shortest length (the token count grows with L too).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one


def build(family: str, device: torch.device) -> torch.nn.Module:
    from torchtitan_hyena.models.hyena import hyena_flavors
    from torchtitan_hyena.models.hyena.model import StripedHyena
    from torchtitan_hyena.models.llama3.args import Llama3Args
    from torchtitan_hyena.models.llama3.model import Transformer

    if family == "hyena":
        args = copy.deepcopy(hyena_flavors["debugmodel"])
        args.conv_impl = "auto"
        model = StripedHyena(args)
    else:  # same width, depth, heads and MLP width; attention in every layer
        args = Llama3Args(dim=256, n_layers=8, n_heads=4, n_kv_heads=4, vocab_size=256, ffn_dim_multiplier=0.75)
        assert args.ffn_hidden_dim == 512
        model = Transformer(args)
    model.to(device)
    model.init_weights(buffer_device=device, seed=0)
    return model


def step_seconds(model: torch.nn.Module, length: int, repeats: int, device: torch.device) -> float:
    tokens = torch.randint(0, 256, (1, length + 1), device=device)

    clock = time.process_time if device.type == "cpu" else time.perf_counter

    def step() -> None:
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        step()
        best = min(best, clock() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="2048,8192,16384")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    models = {f: build(f, device) for f in ("hyena", "llama")}
    nparams = {f: sum(q.numel() for q in m.parameters()) for f, m in models.items()}
    rows = []
    for length in lengths:
        times = {f: step_seconds(m, length, args.repeats, device) for f, m in models.items()}
        rows.append({"length": length, "hyena_s": times["hyena"], "llama_s": times["llama"]})
        print(f"L={length}: hyena {times['hyena']:.3f}s llama {times['llama']:.3f}s", flush=True)
    for r in rows:
        r["llama_over_hyena"] = r["llama_s"] / r["hyena_s"]
        r["hyena_growth"] = r["hyena_s"] / rows[0]["hyena_s"]
        r["llama_growth"] = r["llama_s"] / rows[0]["llama_s"]
    from tabulate import tabulate

    cols = ["length", "hyena_s", "llama_s", "llama_over_hyena", "hyena_growth", "llama_growth"]
    print(tabulate([[r[c] for c in cols] for r in rows], headers=cols, floatfmt=".3f"))
    clock = "process CPU time" if device.type == "cpu" else "wall time"
    info = {"device": str(device), "threads": torch.get_num_threads(), "clock": clock, "torch": torch.__version__}
    info["params"] = nparams
    print(f"params: hyena {nparams['hyena']:,}, llama {nparams['llama']:,}; {info['threads']} threads, {clock}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "hyena_vs_llama.json"
    out.write_text(json.dumps({"rows": rows, **info}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
