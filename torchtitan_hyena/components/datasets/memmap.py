"""Pre-tokenized, memory-mapped data: the format large runs train from instead of re-tokenizing.

One split of a dataset folder is three files, written by ``python -m torchtitan_hyena.preprocess``:

* ``<split>.bin``: every document's tokens back to back (``uint8`` or ``uint16``), opened as a
  ``np.memmap`` so that only the pages a window touches are read;
* ``<split>.index.npy``: int64 document offsets (``n + 1`` of them; document i is
  ``bin[index[i]:index[i + 1]]``, EOD included for DNA/text);
* ``<split>.json``: metadata (tokenizer, vocabulary, dtype, EOD id, counts, how it was made).

The metadata file is renamed into place last, so a split without it is incomplete and is refused.
Training reads a split as a :class:`DocumentStream`: windows pack across documents, documents are
shuffled per epoch with the training seed, and the order is the same as on-the-fly sources'.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from torchtitan_hyena.components.datasets.documents import DocumentStream
from torchtitan_hyena.components.tokenizers import ByteTokenizer, SpikeTokenizer
from torchtitan_hyena.errors import UserError

FORMAT = "torchtitan_hyena.memmap"
VERSION = 1
TOKENIZERS: dict[str, type] = {"byte": ByteTokenizer, "spikes": SpikeTokenizer}
DTYPES = {"uint8": np.uint8, "uint16": np.uint16}


def split_paths(folder: str | Path, split: str) -> dict[str, Path]:
    folder = Path(folder)
    return {"bin": folder / f"{split}.bin", "index": folder / f"{split}.index.npy", "meta": folder / f"{split}.json"}


def tokenizer_name(tokenizer: Any) -> str:
    for name, cls in TOKENIZERS.items():
        if isinstance(tokenizer, cls):
            return name
    raise UserError(f"tokenizer {type(tokenizer).__name__} cannot be stored in memmap metadata")


def choose_dtype(tokenizer: Any, requested: str = "auto") -> str:
    """``uint8`` when every id the tokenizer emits fits in a byte (bytes, spikes), else ``uint16``."""
    top = tokenizer.max_token_id
    if requested == "auto":
        return "uint8" if top <= np.iinfo(np.uint8).max else "uint16"
    if requested not in DTYPES:
        raise UserError(f"dtype {requested!r} is not one of auto, {', '.join(DTYPES)}")
    if top > np.iinfo(DTYPES[requested]).max:
        raise UserError(f"token ids up to {top} do not fit in {requested}; use --dtype uint16 or auto")
    return requested


def read_meta(folder: str | Path, split: str) -> dict[str, Any]:
    """The metadata of one split, with one-line errors for anything missing or foreign."""
    path = split_paths(folder, split)["meta"]
    if not path.is_file():
        if not Path(folder).is_dir():
            raise UserError(f"training.dataset_path {folder} does not exist; run python -m torchtitan_hyena.preprocess")
        found = sorted(p.stem for p in Path(folder).glob("*.json"))
        raise UserError(
            f"memmap folder {folder} has no split {split!r} ({path.name} missing; splits: {', '.join(found) or 'none'})"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is not {FORMAT} metadata; write the folder with python -m torchtitan_hyena.preprocess")
    if meta.get("version") != VERSION or meta.get("tokenizer") not in TOKENIZERS or meta.get("dtype") not in DTYPES:
        raise UserError(
            f"{path}: unsupported version/tokenizer/dtype "
            f"({meta.get('version')}, {meta.get('tokenizer')}, {meta.get('dtype')}); re-run preprocess"
        )
    return meta


def tokenizer_of(folder: str | Path, split: str) -> Any:
    """The tokenizer a split was written with (the ``memmap`` dataset's tokenizer)."""
    meta = read_meta(folder, split)
    return TOKENIZERS[meta["tokenizer"]](meta["vocab_size"])


def load_memmap_source(path: str, split: str, tokenizer: Any, seed: int, shuffle: bool) -> DocumentStream:
    """The ``memmap`` dataset: one split of a preprocessed folder as a document stream."""
    meta = read_meta(path, split)
    if tokenizer is not None and tokenizer != tokenizer_of(path, split):
        raise UserError(
            f"split {split!r} of {path} was written with the {meta['tokenizer']} tokenizer "
            f"(vocab {meta['vocab_size']}), unlike the training split; preprocess every split the same way"
        )
    files = split_paths(path, split)
    dtype = np.dtype(DTYPES[meta["dtype"]])
    size = files["bin"].stat().st_size if files["bin"].is_file() else -1
    if size != meta["num_tokens"] * dtype.itemsize:
        raise UserError(
            f"{files['bin']} holds {size} bytes, not the {meta['num_tokens']} {meta['dtype']} tokens its metadata "
            "lists; the file is truncated or foreign, re-run preprocess"
        )
    try:
        offsets = np.load(files["index"], mmap_mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"could not read {files['index']} ({e}); re-run preprocess") from None
    tokens = np.memmap(files["bin"], dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    return DocumentStream(tokens, offsets, f"{path}:{split}", shuffle, seed)


class MemmapWriter:
    """Streams documents into one split under temporary names; :meth:`close` publishes it.

    Used as a context manager: if the block raises, the partial files are removed and nothing
    half-written is left under the final names.
    """

    def __init__(self, folder: str | Path, split: str, tokenizer: Any, dtype: str, info: dict[str, Any]) -> None:
        self.paths = split_paths(folder, split)
        self.tmp = {k: p.with_name(p.name + ".partial") for k, p in self.paths.items()}
        self.tokenizer = tokenizer
        self.dtype = DTYPES[dtype]
        self.meta = {
            "format": FORMAT,
            "version": VERSION,
            "split": split,
            "tokenizer": tokenizer_name(tokenizer),
            "vocab_size": tokenizer.vocab_size,
            "dtype": dtype,
            "eod_id": getattr(tokenizer, "eod_id", None),
            "pad_id": getattr(tokenizer, "pad_id", None),
            **info,
        }
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._bin = self.tmp["bin"].open("wb")
        self._offsets = [0]

    def add(self, tokens: np.ndarray) -> None:
        """Append one document (skipped when empty)."""
        if len(tokens):
            tokens.astype(self.dtype, copy=False).tofile(self._bin)
            self._offsets.append(self._offsets[-1] + len(tokens))

    @property
    def num_documents(self) -> int:
        return len(self._offsets) - 1

    def close(self) -> dict[str, Any]:
        """Write the index and metadata and rename all three files into place; returns the metadata."""
        self._bin.close()
        with self.tmp["index"].open("wb") as f:
            np.save(f, np.asarray(self._offsets, dtype=np.int64))
        self.meta.update(num_documents=self.num_documents, num_tokens=self._offsets[-1])
        self.tmp["meta"].write_text(json.dumps(self.meta, indent=2) + "\n")
        self.paths["meta"].unlink(missing_ok=True)  # an older split of this name is incomplete from here on
        for key in ("bin", "index", "meta"):  # metadata last: it marks the split complete
            os.replace(self.tmp[key], self.paths[key])
        return self.meta

    def __enter__(self) -> MemmapWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is not None:
            self._bin.close()
            for p in self.tmp.values():
                p.unlink(missing_ok=True)
