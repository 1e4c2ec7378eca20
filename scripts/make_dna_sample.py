"""Generate the bundled DNA sample in tests/assets/dna_sample ({train,test}.fasta).

Each record is synthetic DNA with the structure a genome language model meets in Evo 2's data:

* background sequence from one shared order-3 Markov chain (transition rows ~ Dirichlet(0.5)), so
  there is real, learnable context dependence (the loss falls well below log 4);
* interspersed repeats: copies of a small library of repeat elements (5% point mutations), and
  microsatellites (short tandem repeats), both **soft-masked in lowercase** as RepeatMasker does;
* occasional runs of ``N`` (assembly gaps);
* control tags: some records start with a phylogenetic tag ``|d__...;p__...;...;s__...|`` and a few
  contain ``#`` (contig split) or ``@`` (splice split) marks.

Records are written as multi-line FASTA (60 or 70 bases per line) with ``>id description`` headers.

    python scripts/make_dna_sample.py [--out tests/assets/dna_sample] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

BASES = np.frombuffer(b"ACGT", dtype=np.uint8)
ORDER = 3
LINEAGES = [
    "d__Bacteria;p__Pseudomonadota;c__Gammaproteobacteria;o__Enterobacterales;f__Enterobacteriaceae;"
    "g__Escherichia;s__Escherichia coli",
    "d__Bacteria;p__Bacillota;c__Bacilli;o__Bacillales;f__Bacillaceae;g__Bacillus;s__Bacillus subtilis",
    "d__Archaea;p__Methanobacteriota;c__Methanobacteria;o__Methanobacteriales;f__Methanobacteriaceae;"
    "g__Methanobrevibacter;s__Methanobrevibacter smithii",
    "d__Eukaryota;p__Chordata;c__Mammalia;o__Primates;f__Hominidae;g__Homo;s__Homo sapiens",
]


class MarkovChain:
    def __init__(self, rng: np.random.Generator) -> None:
        self.cdf = np.cumsum(rng.dirichlet(np.full(4, 0.5), size=4**ORDER), axis=1)

    def sample(self, rng: np.random.Generator, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        out[:ORDER] = rng.integers(0, 4, ORDER)
        draws = rng.random(length)
        for i in range(ORDER, length):
            context = out[i - 3] * 16 + out[i - 2] * 4 + out[i - 1]
            out[i] = min(int(np.searchsorted(self.cdf[context], draws[i])), 3)
        return out


def mutate(rng: np.random.Generator, seq: np.ndarray, rate: float = 0.05) -> np.ndarray:
    hit = rng.random(len(seq)) < rate
    out = seq.copy()
    out[hit] = rng.integers(0, 4, int(hit.sum()))
    return out


def make_record(rng: np.random.Generator, chain: MarkovChain, repeats: list[np.ndarray]) -> bytes:
    length = int(rng.integers(1500, 4500))
    parts: list[bytes] = []
    if rng.random() < 0.3:
        parts.append(f"|{LINEAGES[int(rng.integers(len(LINEAGES)))]}|".encode())
    total = 0
    while total < length:
        kind = rng.random()
        if kind < 0.12:
            piece = BASES[mutate(rng, repeats[int(rng.integers(len(repeats)))])].tobytes().lower()
        elif kind < 0.18:
            unit = BASES[rng.integers(0, 4, int(rng.integers(2, 5)))].tobytes()
            piece = (unit * int(rng.integers(6, 20))).lower()
        elif kind < 0.20:
            piece = b"N" * int(rng.integers(10, 60))
        elif kind < 0.22:
            piece = b"#" if rng.random() < 0.5 else b"@"
        else:
            piece = BASES[chain.sample(rng, int(rng.integers(150, 600)))].tobytes()
        parts.append(piece)
        total += len(piece)
    return b"".join(parts)


def write_fasta(path: Path, records: list[bytes], split: str) -> None:
    """Multi-line FASTA; a leading tag gets a line of its own so that no line ends in one of its spaces."""
    lines = []
    for i, seq in enumerate(records):
        width = 60 if i % 2 else 70
        lines.append(f">{split}_{i:03d} synthetic order-{ORDER} Markov DNA, soft-masked repeats, len={len(seq)}")
        if seq.startswith(b"|"):
            tag_end = seq.index(b"|", 1) + 1
            lines.append(seq[:tag_end].decode())
            seq = seq[tag_end:]
        lines.extend(seq[j : j + width].decode() for j in range(0, len(seq), width))
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/assets/dna_sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_records", type=int, default=40)
    parser.add_argument("--test_records", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    chain = MarkovChain(rng)
    repeats = [chain.sample(rng, int(rng.integers(100, 300))) for _ in range(8)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.train_records), ("test", args.test_records)):
        records = [make_record(rng, chain, repeats) for _ in range(n)]
        write_fasta(out / f"{split}.fasta", records, split)
        codes = np.frombuffer(b"".join(records), dtype=np.uint8)
        lower = np.mean((codes >= ord("a")) & (codes <= ord("z")))
        print(f"{split}: {n} records, {len(codes)} characters, {lower:.1%} lowercase")


if __name__ == "__main__":
    main()
