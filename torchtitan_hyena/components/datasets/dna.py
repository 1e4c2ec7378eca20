"""DNA (and byte-level text) documents from FASTA or jsonl files, tokenized as bytes on the fly.

A FASTA record (``>id description`` then sequence lines, any line length) or a jsonl line
(``{"text": ...}``) is one document. Documents are tokenized with the byte tokenizer, each followed
by EOD (savanna's ``--append-eod``), and concatenated into a :class:`DocumentStream` that packs
windows across documents and shuffles documents per epoch. Files may be gzip-compressed.

``training.dataset_path`` is a file, a path with ``{split}`` in it (``data/{split}.fa``), or a
folder holding one ``<split>.<ext>`` per split (``train.fasta``, ``test.fasta``, ...). Large
corpora are better preprocessed once into a memory-mapped file (``python -m torchtitan_hyena.preprocess``).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np

from torchtitan_hyena.components.datasets.documents import DocumentStream
from torchtitan_hyena.components.tokenizers import ByteTokenizer
from torchtitan_hyena.errors import UserError

FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".fas", ".ffn", ".frn")
JSONL_SUFFIXES = (".jsonl",)
TEXT_KEY = "text"


class FastaRecord(NamedTuple):
    name: str  # the header up to its first whitespace
    sequence: bytes


def open_maybe_gzip(path: Path) -> IO[bytes]:
    """Open ``path`` for binary reading, decompressing when it starts with the gzip magic bytes."""
    with path.open("rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else path.open("rb")


def _check_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {path} does not exist or is not a file")
    return p


def _check_printable(path: Path, where: str, data: bytes) -> None:
    codes = np.frombuffer(data, dtype=np.uint8)
    bad = (codes < 32) | (codes > 126)
    if bad.any():
        raise UserError(
            f"{path}: {where} holds byte {int(codes[np.argmax(bad)])} (not printable ASCII); is this a FASTA file?"
        )


def iter_fasta(path: str | Path) -> Iterator[FastaRecord]:
    """Records of a FASTA file in order, sequence lines joined.

    Lines lose trailing whitespace (as Biopython's parser does, so tags with spaces belong inside a
    line); empty and ``;`` comment lines are skipped.
    """
    p = _check_file(path, "FASTA file")
    name: str | None = None
    chunks: list[bytes] = []
    try:
        with open_maybe_gzip(p) as f:
            for lineno, raw in enumerate(f, start=1):
                if raw.startswith(b">"):
                    if name is not None:
                        yield _record(p, name, chunks)
                    header = raw[1:].decode("utf-8", errors="replace").split()
                    name = header[0] if header else ""
                    chunks = []
                    continue
                line = raw.rstrip()
                if not line or line.startswith(b";"):
                    continue
                if name is None:
                    raise UserError(f"{p}:{lineno}: sequence data before the first '>' header; is this a FASTA file?")
                chunks.append(line)
    except (OSError, EOFError) as e:
        raise UserError(f"could not read {p} ({type(e).__name__}: {e})") from None
    if name is None:
        raise UserError(f"{p} holds no FASTA record (no line starts with '>')")
    yield _record(p, name, chunks)


def _record(path: Path, name: str, chunks: list[bytes]) -> FastaRecord:
    sequence = b"".join(chunks)
    _check_printable(path, f"record {name!r}", sequence)
    return FastaRecord(name, sequence)


def iter_jsonl(path: str | Path, key: str = TEXT_KEY) -> Iterator[bytes]:
    """The UTF-8 bytes of ``line[key]`` for every non-empty line of a jsonl file."""
    p = _check_file(path, "jsonl file")
    try:
        with open_maybe_gzip(p) as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    text = json.loads(raw)[key]
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError):
                    text = None
                if not isinstance(text, str):
                    raise UserError(f'{p}:{lineno} is not a JSON object with a "{key}" string')
                yield text.encode("utf-8")
    except (OSError, EOFError) as e:
        raise UserError(f"could not read {p} ({type(e).__name__}: {e})") from None


def file_format(path: str | Path) -> str:
    """``fasta`` or ``jsonl`` from the file name (a trailing ``.gz`` is ignored)."""
    name = Path(path).name.lower().removesuffix(".gz")
    if name.endswith(FASTA_SUFFIXES):
        return "fasta"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise UserError(
        f"cannot tell the format of {path}: FASTA files end in {', '.join(FASTA_SUFFIXES)}, jsonl files in .jsonl "
        "(optionally .gz)"
    )


def iter_documents(path: str | Path, fmt: str | None = None, key: str = TEXT_KEY) -> Iterator[bytes]:
    """The raw bytes of every document (FASTA record sequence or jsonl text) of one file."""
    fmt = fmt or file_format(path)
    if fmt == "fasta":
        return (record.sequence for record in iter_fasta(path))
    return iter_jsonl(path, key)


def tokenize_documents(
    documents: Iterable[bytes], tokenizer: ByteTokenizer, source: str, append_eod: bool = True
) -> Iterator[np.ndarray]:
    """Byte tokens of each non-empty document, EOD-terminated; ids reserved for EOD/PAD are rejected."""
    reserved = max(tokenizer.eod_id, tokenizer.pad_id)
    for i, doc in enumerate(documents):
        tokens = tokenizer.encode(doc)
        if len(tokens) == 0:
            continue
        if tokens.min() <= reserved:
            raise UserError(
                f"{source}: document {i} holds byte {int(tokens.min())}, reserved for EOD ({tokenizer.eod_id}) / "
                f"PAD ({tokenizer.pad_id}); strip control characters from the data"
            )
        yield np.append(tokens, np.uint8(tokenizer.eod_id)) if append_eod else tokens


def split_file(path: str, split: str) -> Path:
    """The file holding ``split`` under ``training.dataset_path`` (see the module docstring)."""
    if "{split}" in path:
        return _check_file(path.replace("{split}", split), f"split {split!r}:")
    p = Path(path)
    if p.is_file():
        if split != "train":
            raise UserError(
                f"training.dataset_path {path} is a single file, so it has no {split!r} split; give a folder holding "
                f"train.fasta and {split}.fasta, or a path with {{split}} in it"
            )
        return p
    if not p.is_dir():
        raise UserError(f"training.dataset_path {path} does not exist; give a FASTA/jsonl file or a folder of them")
    found = [
        f
        for f in sorted(p.iterdir())
        if f.is_file()
        and f.name.lower().removesuffix(".gz").startswith(f"{split}.")
        and f.name.lower().removesuffix(".gz").endswith(FASTA_SUFFIXES + JSONL_SUFFIXES)
    ]
    if len(found) != 1:
        listing = ", ".join(f.name for f in found) if found else "none"
        raise UserError(
            f"folder {path} must hold exactly one file for split {split!r} ({split}.fasta, {split}.jsonl, ...); "
            f"found {listing}"
        )
    return found[0]


def load_dna_source(path: str, split: str, tokenizer: ByteTokenizer, seed: int, shuffle: bool) -> DocumentStream:
    """The ``dna`` dataset: one split's documents tokenized in memory, EOD after each."""
    if not isinstance(tokenizer, ByteTokenizer):
        raise UserError("training.dataset 'dna' needs the byte tokenizer; do not override it")
    file = split_file(path, split)
    docs = list(tokenize_documents(iter_documents(file), tokenizer, str(file)))
    if not docs:
        raise UserError(f"{file} holds no non-empty document")
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    return DocumentStream(np.concatenate(docs), offsets, f"{file}", shuffle, seed)
