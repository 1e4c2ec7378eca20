"""Decode speed with cached state vs recomputing the stateless forward, and per-token cost vs position.

    python bench/generate.py [--lengths 1024,8192] [--positions 512,2048,8192] [--steps 32] [--repeats 3]
        [--device cpu] [--threads 1]
    python bench/generate.py --device cuda --dtype bfloat16 --hyena_flavor evo2_7b --llama_flavor 8B

Part 1, for the debug flavors (``hyena`` debugmodel SDH*SDH*, ``llama3`` debugmodel; random weights, batch 1):
after a prompt of each length, tokens/s of greedy decode (a) with the decode state (one cached step per
token) and (b) recomputing the stateless forward over the prompt and the tokens so far for every token.

Part 2: the time of one cached step at growing positions, for models of 4 blocks of one type (debug width
256): Hyena-SE, -MR and -LI steps cost the same at any position (FIR states and 16 modes per channel),
attention reads a KV cache that grows with the position.

On CPU the time is process CPU time with ``--threads`` threads (1 by default: a busy neighbour on a
shared machine does not distort it); on GPUs it is synchronised wall time. Results go to
``bench/results/generate_<device type>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one

from torchtitan_hyena.models.common.decode import DecodeCache  # noqa: E402
from torchtitan_hyena.models.common.precision import cast_model_  # noqa: E402
from torchtitan_hyena.models.hyena import hyena_flavors  # noqa: E402
from torchtitan_hyena.models.hyena.model import StripedHyena  # noqa: E402
from torchtitan_hyena.models.llama3 import llama3_flavors  # noqa: E402
from torchtitan_hyena.models.llama3.model import Transformer  # noqa: E402

BLOCKS = {"Hyena-SE": "SSSS", "Hyena-MR": "DDDD", "Hyena-LI": "HHHH", "attention": "****"}


def build(family: str, flavor: str, device: torch.device, dtype: torch.dtype, layout: str | None = None):
    if family == "hyena":
        args = copy.deepcopy(hyena_flavors[flavor])
        if layout is not None:
            args.layout = layout
        args.conv_impl = "auto"
        model = StripedHyena(args)
    else:
        model = Transformer(copy.deepcopy(llama3_flavors[flavor]))
    model.to(device)
    with torch.no_grad():
        model.init_weights(buffer_device=device, seed=0)
    return cast_model_(model, dtype).eval()


class Clock:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cpu":
            return time.process_time()
        torch.cuda.synchronize(self.device)
        return time.perf_counter()


def timed(clock: Clock, fn: Callable[[], object]) -> float:
    start = clock()
    fn()
    return clock() - start


@torch.no_grad()
def cached_decode(model, prompt: torch.Tensor, steps: int, clock: Clock, repeats: int) -> tuple[float, float]:
    """(prefill seconds, seconds per cached greedy step: the best of ``repeats`` runs of ``steps`` steps)."""
    capacity = prompt.shape[1] + steps * repeats + 1
    cache = DecodeCache(torch.tensor([prompt.shape[1]], device=prompt.device), capacity)
    box = {}
    prefill = timed(clock, lambda: box.update(logits=model(prompt, cache=cache)))
    token = box["logits"][:, -1].argmax(-1, keepdim=True)
    model(token, cache=cache)  # warm-up step

    def run() -> None:
        nonlocal token
        for _ in range(steps):
            token = model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)

    return prefill, min(timed(clock, run) for _ in range(repeats)) / steps


@torch.no_grad()
def stateless_decode(model, prompt: torch.Tensor, steps: int, clock: Clock) -> float:
    """Seconds per token when every token recomputes the forward over everything before it."""
    tokens = prompt

    def run() -> None:
        nonlocal tokens
        for _ in range(steps):
            token = model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, token], dim=1)

    model(prompt[:, :64])  # warm-up
    return timed(clock, run) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,8192", help="prompt lengths of part 1")
    p.add_argument("--positions", default="512,2048,8192", help="positions of part 2")
    p.add_argument("--steps", type=int, default=32, help="cached steps timed per measurement")
    p.add_argument("--repeats", type=int, default=3, help="cached measurements per point (the best is kept)")
    p.add_argument("--stateless_steps", type=int, default=3, help="stateless tokens timed per prompt length")
    p.add_argument("--hyena_flavor", default="debugmodel")
    p.add_argument("--llama_flavor", default="debugmodel")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    clock = Clock(device)
    torch.manual_seed(0)
    from tabulate import tabulate

    decode = []
    flavors = {"hyena": args.hyena_flavor, "llama3": args.llama_flavor}
    for family, flavor in flavors.items():
        model = build(family, flavor, device, dtype)
        for length in map(int, args.lengths.split(",")):
            prompt = torch.randint(0, 256, (1, length), device=device)
            prefill, cached = cached_decode(model, prompt, args.steps, clock, args.repeats)
            stateless = stateless_decode(model, prompt, args.stateless_steps, clock)
            row = {"model": f"{family} {flavor}", "prompt": length, "prefill_s": prefill,
                   "cached_tokens_per_s": 1 / cached, "stateless_tokens_per_s": 1 / stateless,
                   "speedup": stateless / cached}  # fmt: skip
            decode.append(row)
            print(row, flush=True)
        del model
    print(tabulate([list(r.values()) for r in decode], headers=list(decode[0]), floatfmt=".3g"))

    per_token = []
    positions = list(map(int, args.positions.split(",")))
    for name, layout in BLOCKS.items():
        model = build("hyena", args.hyena_flavor, device, dtype, layout=layout)
        row = {"blocks": f"4 x {name}"}
        for position in positions:
            prompt = torch.randint(0, 256, (1, position), device=device)
            row[f"ms_at_{position}"] = 1e3 * cached_decode(model, prompt, args.steps, clock, args.repeats)[1]
        row["growth"] = row[f"ms_at_{positions[-1]}"] / row[f"ms_at_{positions[0]}"]
        per_token.append(row)
        print(row, flush=True)
        del model
    print(tabulate([list(r.values()) for r in per_token], headers=list(per_token[0]), floatfmt=".3g"))

    cpu = device.type == "cpu"
    hardware = f"{platform.machine()} {platform.processor() or ''} (CPU)" if cpu else torch.cuda.get_device_name(device)
    info = {
        "date": date.today().isoformat(),
        "machine": hardware.strip(),
        "command": "python bench/generate.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "threads": torch.get_num_threads() if cpu else None,
        "clock": "process CPU time" if cpu else "wall time",
        "decode": decode,
        "per_token": per_token,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"generate_{device.type}.json"
    out.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
