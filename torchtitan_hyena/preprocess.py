"""Tokenize a corpus once into memory-mapped files that ``training.dataset = "memmap"`` trains from.

    python -m torchtitan_hyena.preprocess --input genomes.fasta [more.fa.gz ...] --output_dir data/dna \\
        [--test_fraction 0.01] [--reverse_complement] [--to_upper] [--no_eod] [--dtype auto]
    python -m torchtitan_hyena.preprocess --input docs.jsonl --output_dir data/text [--jsonl_key text]
    python -m torchtitan_hyena.preprocess --input eminorhan/neural-pile-primate --split train --output_dir data/np

FASTA records and jsonl texts become byte-token documents, each followed by EOD (savanna's
``--append-eod``; ``--no_eod`` turns it off). Neural Pile rows become the same spike-token stream as
the on-the-fly ``neural_pile`` dataset (no EOD: the separator token already structures it), one
document per row. Each split is written as ``<split>.bin`` + ``<split>.index.npy`` + ``<split>.json``
(see ``components/datasets/memmap.py``) in a temporary folder, moved into place only when complete. The output
folder must be new or empty, or hold only other splits written the same way (one split per run, as Neural Pile
splits are added); ``--overwrite`` replaces it.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from torchtitan_hyena.components.datasets.dna import file_format, iter_documents, tokenize_documents
from torchtitan_hyena.components.datasets.hf import looks_like_repo_id
from torchtitan_hyena.components.datasets.memmap import MemmapWriter, choose_dtype, read_meta, split_paths
from torchtitan_hyena.components.tokenizers import ByteTokenizer, SpikeTokenizer
from torchtitan_hyena.errors import UserError, run_cli
from torchtitan_hyena.tools.outputs import atomic_output_dir, check_writable_dir, staging_dir

FORMATS = ("auto", "fasta", "jsonl", "neural_pile")
TEST_SPLIT = "test"


def _complement_table() -> np.ndarray:
    """Byte -> IUPAC complement (case kept); bytes without a complement map to themselves."""
    table = np.arange(256, dtype=np.uint8)
    for a, b in ("AT", "CG", "RY", "KM", "BV", "DH"):
        for x, y in ((a, b), (a.lower(), b.lower())):
            table[ord(x)], table[ord(y)] = ord(y), ord(x)
    return table


COMPLEMENT = _complement_table()


def reverse_complement(sequence: bytes) -> bytes:
    """Reverse complement of a DNA sequence; a record holding a control tag ('|') cannot be flipped."""
    if b"|" in sequence:
        raise UserError("--reverse_complement: a record holds a control tag ('|'); tags cannot be reverse-complemented")
    return COMPLEMENT[np.frombuffer(sequence, dtype=np.uint8)[::-1]].tobytes()


def detect_format(inputs: list[str], fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if Path(inputs[0]).is_dir():
        return "neural_pile"
    try:
        return file_format(inputs[0])
    except UserError:
        if looks_like_repo_id(inputs[0]):
            return "neural_pile"
        raise


def document_groups(args: argparse.Namespace, fmt: str) -> Iterator[list[bytes]]:
    """Each input document (case transform applied), with its reverse complement when requested."""
    for path in args.input:
        if args.format == "auto" and file_format(path) != fmt:
            raise UserError(f"--input {path} is not a {fmt} file like {args.input[0]}; give one format per run")
        for doc in iter_documents(path, fmt, args.jsonl_key):
            doc = doc.upper() if args.to_upper else doc
            yield [doc, reverse_complement(doc)] if args.reverse_complement else [doc]


def write_bytes(args: argparse.Namespace, fmt: str, folder: Path) -> list[dict]:
    """FASTA/jsonl inputs -> the ``--split`` split (and a held-out ``test`` split with --test_fraction)."""
    tokenizer = ByteTokenizer()
    dtype = choose_dtype(tokenizer, args.dtype)
    info = {
        "input_format": fmt,
        "inputs": [str(p) for p in args.input],
        "append_eod": not args.no_eod,
        "to_upper": args.to_upper,
        "reverse_complement": args.reverse_complement,
    }
    splits = [args.split] + ([TEST_SPLIT] if args.test_fraction > 0 else [])
    rng = np.random.default_rng(args.seed)
    source = ", ".join(args.input)
    with ExitStack() as stack:
        writers = [stack.enter_context(MemmapWriter(folder, s, tokenizer, dtype, info)) for s in splits]
        for group in document_groups(args, fmt):  # a record and its reverse complement share a split
            target = writers[-1] if len(writers) > 1 and rng.random() < args.test_fraction else writers[0]
            for tokens in tokenize_documents(group, tokenizer, source, not args.no_eod):
                target.add(tokens)
        for w, split in zip(writers, splits):
            if w.num_documents == 0:
                raise UserError(f"{source} gives no non-empty document for split {split!r}")
        return [w.close() for w in writers]


def write_neural_pile(args: argparse.Namespace, folder: Path) -> list[dict]:
    """One Neural Pile split -> memmap rows in dataset order, tokenized exactly as ``neural_pile`` does."""
    from torchtitan_hyena.components.datasets.hf import load_hf_split
    from torchtitan_hyena.components.datasets.neural_pile import NeuralPileSource, tokenize_spikes

    if len(args.input) != 1 or args.test_fraction or args.reverse_complement or args.to_upper or args.no_eod:
        raise UserError(
            "Neural Pile input takes one dataset and its own splits (--split); --test_fraction, --reverse_complement, "
            "--to_upper and --no_eod apply to FASTA/jsonl only"
        )
    tokenizer = SpikeTokenizer(256)
    path = args.input[0]
    dataset = load_hf_split(path, args.split)
    source = NeuralPileSource(dataset, tokenizer, False, 0, f"{path}:{args.split}")
    info = {"input_format": "neural_pile", "inputs": [path], "append_eod": False}
    with MemmapWriter(folder, args.split, tokenizer, choose_dtype(tokenizer, args.dtype), info) as writer:
        for row in range(len(dataset)):
            writer.add(tokenize_spikes(source.row_counts(row), tokenizer))
        return [writer.close()]


def adds_to_existing(out: Path, splits: list[str], tokenizer: str, overwrite: bool) -> bool:
    """Whether the splits join an existing folder of other complete splits (made with the same tokenizer).

    False for a new or empty folder, or with ``overwrite`` (the folder is replaced); anything else already in
    the folder, or a split of the same name, is refused: mixing two runs' files would be a silently different
    dataset.
    """
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return False
    names = {p.name for p in out.iterdir()}
    complete = {n[: -len(".json")] for n in names if n.endswith(".json")}
    complete = {s for s in complete if {p.name for p in split_paths(out, s).values()} <= names}
    owned = {p.name for s in complete for p in split_paths(out, s).values()}
    fix = "pass --overwrite to replace the whole folder, or choose another --output_dir"
    if names - owned:
        raise UserError(f"--output_dir {out} holds {sorted(names - owned)[0]}, which is no preprocessed split; {fix}")
    clash = sorted(set(splits) & complete)
    if clash:
        raise UserError(f"--output_dir {out} already holds split {clash[0]!r}; {fix}")
    for split in sorted(complete):
        if read_meta(out, split)["tokenizer"] != tokenizer:
            raise UserError(f"--output_dir {out} holds split {split!r} of another tokenizer; {fix}")
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m torchtitan_hyena.preprocess", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--input", nargs="+", required=True, help="FASTA/jsonl files (.gz ok), or a Neural Pile dataset")
    add("--output_dir", required=True, help="folder for <split>.bin, <split>.index.npy, <split>.json")
    add("--format", default="auto", choices=FORMATS, help="input format (auto: by suffix; folder = Neural Pile)")
    add("--split", default="train", help="split to write (and, for Neural Pile, to read)")
    add("--test_fraction", type=float, default=0.0, help=f"FASTA/jsonl: share of documents held out as {TEST_SPLIT!r}")
    add("--seed", type=int, default=0, help="seed of the --test_fraction draw")
    add("--dtype", default="auto", choices=("auto", "uint8", "uint16"), help="token dtype (auto: by tokenizer)")
    add("--no_eod", action="store_true", help="FASTA/jsonl: do not end each document with EOD (0)")
    add("--to_upper", action="store_true", help="FASTA/jsonl: store uppercase (drops soft-masking)")
    add("--reverse_complement", action="store_true", help="FASTA: also store each record's reverse complement")
    add("--jsonl_key", default="text", help="jsonl: the field holding each document's text")
    add("--overwrite", action="store_true", help="replace a non-empty --output_dir (default: refuse it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not 0.0 <= args.test_fraction < 1.0:
        raise UserError(f"--test_fraction must be in [0, 1), got {args.test_fraction}")
    if args.test_fraction > 0 and args.split == TEST_SPLIT:
        raise UserError(f"--split {TEST_SPLIT} collides with the held-out split of --test_fraction; pick another name")
    check_writable_dir(args.output_dir, "--output_dir")
    fmt = detect_format(args.input, args.format)
    if args.reverse_complement and fmt != "fasta":
        raise UserError("--reverse_complement applies to DNA (FASTA) input only")
    splits = [args.split] + ([TEST_SPLIT] if args.test_fraction > 0 else [])
    tokenizer = "spikes" if fmt == "neural_pile" else "byte"
    out = Path(args.output_dir)
    start = time.perf_counter()
    write = write_neural_pile if fmt == "neural_pile" else lambda a, folder: write_bytes(a, fmt, folder)
    if adds_to_existing(out, splits, tokenizer, args.overwrite):
        with staging_dir(out) as tmp:
            metas = write(args, tmp)
            for f in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".json"):  # metadata last: marks a split complete
                os.replace(f, out / f.name)
    else:
        with atomic_output_dir(out, args.overwrite) as tmp:
            metas = write(args, tmp)
    for meta in metas:
        print(
            f"{args.output_dir}/{meta['split']}: {meta['num_documents']} documents, {meta['num_tokens']} "
            f"{meta['dtype']} tokens ({meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}, "
            f"EOD {'appended' if meta['append_eod'] else 'none'})"
        )
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_cli(main)
