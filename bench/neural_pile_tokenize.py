"""Neural Pile tokenization throughput: our vectorised reader vs a plain Python-list implementation.

Both produce the same gpt-neuro token stream (prepend a separator row, transpose to time-major,
flatten, pack into seq_len + 1 windows) from the bundled sample (or --dataset_path). Two
comparisons, each measured side by side in one run:

* end to end: dataset rows -> windows (the Python version reads rows as lists, as gpt-neuro does);
* algorithm only: in-memory uint8 arrays -> token stream.

    python bench/neural_pile_tokenize.py [--dataset_path tests/assets/neural_pile_sample] [--seq_lens 2047 131071]

Short windows show our per-window overhead (each window is tokenized on demand from the time bins
it covers); at the Neural Pile training length (131072) that overhead is amortised.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
from tabulate import tabulate

from torchtitan_hyena.components.datasets.base import WindowDataset
from torchtitan_hyena.components.datasets.hf import load_hf_split
from torchtitan_hyena.components.datasets.neural_pile import NeuralPileSource, tokenize_spikes
from torchtitan_hyena.components.tokenizers import SpikeTokenizer


def python_windows(rows: list[list[list[int]]], seq_len: int, sep: int) -> list[list[int]]:
    """gpt-neuro's loop: list rows, zip-transpose, extend a buffer, slice windows off its front."""
    buffer: list[int] = []
    windows = []
    for counts in rows:
        with_sep = [[sep] * len(counts[0]), *counts]
        for column in zip(*with_sep):
            buffer.extend(column)
        while len(buffer) >= seq_len + 1:
            windows.append(buffer[: seq_len + 1])
            buffer = buffer[seq_len + 1 :]
    return windows


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_path", default="tests/assets/neural_pile_sample")
    parser.add_argument("--seq_lens", type=int, nargs="+", default=[2047, 8191, 131071])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/neural_pile_tokenize.json")
    args = parser.parse_args()

    tok = SpikeTokenizer(256)
    ds = load_hf_split(args.dataset_path, "train")
    rows = []
    for seq_len in args.seq_lens:
        windows = WindowDataset(NeuralPileSource(ds, tok, False, 0, "bench"), seq_len, 256, infinite=False)
        n_tokens = len(windows) * (seq_len + 1)
        reference = python_windows(ds["spike_counts"], seq_len, tok.separator)
        assert all(windows.window(i).tolist() == reference[i] for i in range(len(windows)))
        ours = best_of(lambda w=windows: [w.window(i) for i in range(len(w))], args.repeats)
        python = best_of(lambda s=seq_len: python_windows(ds["spike_counts"], s, tok.separator), args.repeats)
        rows.append(
            [f"rows -> windows, seq_len {seq_len}", n_tokens / ours / 1e6, n_tokens / python / 1e6, python / ours]
        )

    arrays = [np.asarray(r, dtype=np.uint8) for r in ds["spike_counts"]]
    lists = [a.tolist() for a in arrays]
    n_tokens = sum(a.shape[1] * (a.shape[0] + 1) for a in arrays)
    ours_alg = best_of(lambda: np.concatenate([tokenize_spikes(a, tok) for a in arrays]), args.repeats)
    python_alg = best_of(lambda: python_windows(lists, 1 << 62, tok.separator), args.repeats)
    rows.append(["arrays -> token stream (algorithm)", n_tokens / ours_alg / 1e6, n_tokens / python_alg / 1e6,
                 python_alg / ours_alg])  # fmt: skip

    print(f"{args.dataset_path}: {n_tokens:,} tokens, best of {args.repeats} (both outputs checked equal)")
    print(tabulate(rows, headers=["path", "ours Mtok/s", "python-list Mtok/s", "speed-up"], floatfmt=".1f"))
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''} (CPU)".strip(),
        "command": "python bench/neural_pile_tokenize.py --seq_lens " + " ".join(map(str, args.seq_lens)),
        "tokens": n_tokens,
        "note": "CPU shared with other jobs while measured; compare the ratios, not absolute rates",
        "results": [dict(zip(["path", "ours_mtok_s", "python_mtok_s", "speedup"], r)) for r in rows],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
