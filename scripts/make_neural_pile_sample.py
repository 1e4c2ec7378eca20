"""Generate the bundled Neural Pile-format sample in tests/assets/neural_pile_sample.

Spiking model: each session has K slow latent factors (AR(1) processes with a time constant of
tens of 20 ms bins, i.e. shared slow rate fluctuations); neuron i fires Poisson counts with log-rate
``b_i + w_i . z_t`` (b_i gives each neuron its own baseline rate, w_i its coupling to the shared
fluctuations). A model can learn the separator structure, per-neuron rates and the shared latent
state from the recent past, so the loss drops well below the unigram entropy.

Rows follow the Neural Pile schema: ``spike_counts`` uint8 (neurons x time bins) plus string
provenance columns. Files use the Hub layout (``data/{split}-00000-of-00001.parquet``), so
``datasets.load_dataset(folder, split=...)`` reads them like the published datasets.

    python scripts/make_neural_pile_sample.py [--out tests/assets/neural_pile_sample] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def simulate_session(rng: np.random.Generator, neurons: int, bins: int, factors: int = 3) -> np.ndarray:
    tau = rng.uniform(10.0, 40.0, size=factors)
    a = np.exp(-1.0 / tau)
    z = np.zeros((bins, factors))
    noise = rng.normal(size=(bins, factors)) * np.sqrt(1 - a**2)
    for t in range(1, bins):
        z[t] = a * z[t - 1] + noise[t]
    baseline = rng.normal(np.log(0.6), 0.8, size=neurons)
    loadings = rng.normal(0.0, 0.6, size=(neurons, factors))
    rates = np.exp(np.clip(baseline[:, None] + loadings @ z.T, -8.0, 3.0))
    return np.minimum(rng.poisson(rates), 254).astype(np.uint8)


def make_split(rng: np.random.Generator, sessions: int, split: str) -> dict[str, list]:
    rows: dict[str, list] = {
        k: [] for k in ("spike_counts", "subject_id", "session_id", "segment_id", "source_dataset")
    }
    for s in range(sessions):
        neurons = int(rng.integers(16, 65))
        bins = int(rng.integers(400, 1201))
        rows["spike_counts"].append(simulate_session(rng, neurons, bins))
        rows["subject_id"].append(f"sim-{s % 5}")
        rows["session_id"].append(f"{split}-{s}")
        rows["segment_id"].append("0")
        rows["source_dataset"].append("poisson-latent-sim")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/assets/neural_pile_sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_sessions", type=int, default=32)
    parser.add_argument("--test_sessions", type=int, default=4)
    args = parser.parse_args()

    import datasets

    features = datasets.Features(
        {
            "spike_counts": datasets.Sequence(datasets.Sequence(datasets.Value("uint8"))),
            "subject_id": datasets.Value("string"),
            "session_id": datasets.Value("string"),
            "segment_id": datasets.Value("string"),
            "source_dataset": datasets.Value("string"),
        }
    )
    rng = np.random.default_rng(args.seed)
    out = Path(args.out) / "data"
    out.mkdir(parents=True, exist_ok=True)
    for split, sessions in (("train", args.train_sessions), ("test", args.test_sessions)):
        rows = make_split(rng, sessions, split)
        rows["spike_counts"] = [c.tolist() for c in rows["spike_counts"]]
        ds = datasets.Dataset.from_dict(rows, features=features)
        ds.to_parquet(str(out / f"{split}-00000-of-00001.parquet"))
        tokens = sum(len(r) * (len(r[0]) if r else 0) + (len(r[0]) if r else 0) for r in rows["spike_counts"])
        print(f"{split}: {sessions} sessions, {tokens} tokens")


if __name__ == "__main__":
    main()
