"""Per-token log-likelihoods from a checkpoint.

    python -m torchtitan_hyena.score --checkpoint DIR --tokens IN.jsonl --output OUT.jsonl [--dtype float32]
    python -m torchtitan_hyena.score --checkpoint DIR --fasta IN.fasta --output OUT.jsonl [--prepend_bos] [--keep_case]

``DIR`` is a step folder (training checkpoint or converter output) with ``model_args.json``.
Input lines are ``{"tokens": [ids...]}``; output line i is ``{"logprobs": [...]}`` holding
``log p(x_t | x_<t)`` for t = 1..len-1 of input line i. Sequences are batched by length and
computed in float32 unless ``--dtype`` says otherwise; the output file appears only when complete.

``--fasta`` scores DNA the way Evo 2 does (``evo2/scoring.py``): each record is byte-tokenized,
right-padded with PAD (1), optionally preceded by EOD (0) as BOS so that its first base is scored
too, and uppercased unless ``--keep_case`` (Evo 2 models only ever saw uppercase inputs and
labels). Output line i is ``{"id": <record id>, "logprobs": [...]}`` for record i.

As evo2's ``score_sequences`` / ``Evo2.forward(return_embeddings=True)`` (``score_outputs.py``): ``--reduce mean|sum``
writes one ``"score"`` per line instead of the log-probabilities; ``--reverse_complement`` (``--fasta``) averages
it with the score of the record's reverse complement; ``--embeddings LAYER[,LAYER] --embeddings_dir DIR`` also
writes the hidden states of those layers, one safetensors file per input line.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Iterable
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from torch import nn

from torchtitan_hyena.build import load_model
from torchtitan_hyena.dtypes import DTYPES
from torchtitan_hyena.errors import UserError, run_cli
from torchtitan_hyena.protocols.model import read_model_args
from torchtitan_hyena.protocols.train_spec import get_train_spec
from torchtitan_hyena.score_outputs import (
    REDUCTIONS,
    HiddenStates,
    reduce_logprobs,
    resolve_layers,
    reverse_complement_tokens,
)
from torchtitan_hyena.tools.outputs import (
    atomic_output_dir,
    atomic_output_file,
    check_writable_dir,
    check_writable_file,
)

# Scoring is single-process on purpose; DCP's note about it is noise here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def read_token_lines(path: str | Path) -> list[list[int]]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--tokens {path} does not exist")
    sequences = []
    with p.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                tokens = json.loads(line)["tokens"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f'{path}:{lineno} is not a JSON object with a "tokens" list') from None
            if not isinstance(tokens, list) or not all(isinstance(t, int) and t >= 0 for t in tokens):
                raise UserError(f"{path}:{lineno}: tokens must be a list of non-negative integers")
            sequences.append(tokens)
    return sequences


def batches_by_length(lengths: list[int], batch_size: int) -> Iterable[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def score_sequences(
    model: nn.Module,
    sequences: list[list[int]],
    device: torch.device,
    batch_size: int = 8,
    pad_id: int = 0,
    hidden: HiddenStates | None = None,
) -> list[list[float]]:
    """``log p(x_t | x_<t)`` for t >= 1 of every sequence. Right-padding never affects real tokens (causal).
    With ``hidden`` the forward also sees the last token and ``hidden`` writes the chosen layers' outputs."""
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    results: list[list[float]] = [[] for _ in sequences]
    for idx in batches_by_length([len(s) for s in sequences], batch_size):
        length = len(sequences[idx[0]])
        if length < (1 if hidden is not None else 2):
            continue
        batch = torch.full((len(idx), length), pad_id, dtype=torch.long)
        for row, i in enumerate(idx):
            batch[row, : len(sequences[i])] = torch.tensor(sequences[i])
        if vocab is not None and int(batch.max()) >= vocab:
            raise UserError(f"token id {int(batch.max())} is >= the model's vocab_size {vocab}")
        batch = batch.to(device)
        with hidden.recording() if hidden is not None else nullcontext():
            logits = model(batch if hidden is not None else batch[:, :-1])[:, : length - 1].float()
        if hidden is not None:
            hidden.save(idx, [len(sequences[i]) for i in idx])
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, batch[:, 1:, None]).squeeze(-1).cpu()
        for row, i in enumerate(idx):
            results[i] = logprobs[row, : len(sequences[i]) - 1].tolist()
    return results


def read_fasta_tokens(path: str | Path, prepend_bos: bool, keep_case: bool) -> tuple[list[str], list[list[int]]]:
    """(record ids, byte-token lists) of a FASTA file, prepared as Evo 2 scoring prepares them."""
    from torchtitan_hyena.components.datasets.dna import iter_fasta
    from torchtitan_hyena.components.tokenizers import ByteTokenizer

    tokenizer = ByteTokenizer()
    bos = [tokenizer.eod_id] if prepend_bos else []
    names, sequences = [], []
    for record in iter_fasta(path):
        names.append(record.name)
        sequence = record.sequence if keep_case else record.sequence.upper()
        sequences.append(bos + tokenizer.encode(sequence).tolist())
    return names, sequences


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> None:
    with atomic_output_file(path) as tmp, tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m torchtitan_hyena.score", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="step folder with model_args.json")
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--tokens", help='jsonl input, one {"tokens": [...]} per line')
    inputs.add_argument("--fasta", help="FASTA input (DNA, byte tokenizer), one output line per record")
    p.add_argument("--output", required=True, help='jsonl output, one {"logprobs": [...]} per input line')
    p.add_argument("--prepend_bos", action="store_true", help="--fasta: prepend EOD (0) as BOS to score every base")
    p.add_argument("--keep_case", action="store_true", help="--fasta: score the bytes as written (default uppercases)")
    p.add_argument("--reduce", choices=REDUCTIONS, help='one "score" per line: mean or sum of its log-probabilities')
    p.add_argument(
        "--reverse_complement", action="store_true", help="--fasta with --reduce: average with the reverse complement"
    )
    p.add_argument("--embeddings", help="also write these layers' outputs: block indices or names, comma-separated")
    p.add_argument("--embeddings_dir", help="--embeddings: new folder for one NNNNNN.safetensors per input line")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype (default float32)")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    return p.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but no GPU is visible; use --device cpu")
    return device


def check_output_options(args: argparse.Namespace) -> None:
    """One-line errors for --reduce / --reverse_complement / --embeddings combinations, before any work."""
    if args.reverse_complement and (args.fasta is None or args.reduce is None):
        raise UserError(
            "--reverse_complement averages per-record DNA scores; use it with --fasta and --reduce mean|sum"
        )
    if bool(args.embeddings) != bool(args.embeddings_dir):
        raise UserError("--embeddings LAYER[,LAYER] and --embeddings_dir DIR go together; give both or neither")
    if args.embeddings_dir:
        folder = Path(args.embeddings_dir)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise UserError(f"--embeddings_dir {folder} exists and is not an empty folder; choose a new one")
        check_writable_dir(folder.parent, f"--embeddings_dir {folder}: its folder")


def output_rows(scores: list[list[float]], count: int, reduce: str | None) -> list[dict]:
    """Output lines: log-probabilities, or the ``reduce`` score averaged with that of rows ``count + i`` (the
    reverse complements) when there are any."""
    if reduce is None:
        return [{"logprobs": s} for s in scores]
    values = [reduce_logprobs(s, reduce) for s in scores]
    if len(values) > count:
        pairs = zip(values[:count], values[count:])
        values = [None if f is None or r is None else (f + r) / 2 for f, r in pairs]
    return [{"score": v} for v in values]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.batch_size <= 0:
        raise UserError(f"--batch_size must be positive, got {args.batch_size}")
    check_writable_file(args.output, "--output")
    if args.tokens is not None and (args.prepend_bos or args.keep_case):
        raise UserError("--prepend_bos and --keep_case apply to --fasta input; put a BOS id in the token lists instead")
    check_output_options(args)
    if args.fasta is not None:
        names, sequences = read_fasta_tokens(args.fasta, args.prepend_bos, args.keep_case)
        pad_id = 1  # PAD, as Evo 2 scoring pads; causal, so it never affects real tokens
    else:
        names, sequences, pad_id = None, read_token_lines(args.tokens), 0
    count = len(sequences)
    if args.embeddings and not all(sequences):
        empty = [len(s) for s in sequences].index(0) + 1
        raise UserError(f"input sequence {empty} is empty, so it has nothing to embed; remove it or add --prepend_bos")
    if args.reverse_complement:
        sequences = sequences + [reverse_complement_tokens(s, args.prepend_bos) for s in sequences]
    device = resolve_device(args.device)
    model = load_model(args.checkpoint, device, DTYPES[args.dtype])
    with ExitStack() as stack:  # the embeddings folder and the output appear together, or neither
        hidden = None
        if args.embeddings:
            formats = get_train_spec(read_model_args(args.checkpoint)[0]).state_dict_adapters.values()
            modules = resolve_layers(model, args.embeddings, len(model.layers), formats)
            hidden = HiddenStates(modules, stack.enter_context(atomic_output_dir(args.embeddings_dir)), names, count)
        scores = score_sequences(model, sequences, device, args.batch_size, pad_id, hidden)
        rows = output_rows(scores, count, args.reduce)
        if names is not None:
            rows = [{"id": name, **row} for name, row in zip(names, rows)]
        write_jsonl_atomic(args.output, rows)


if __name__ == "__main__":
    run_cli(main)
