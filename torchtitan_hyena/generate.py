"""Generate continuations of prompts from a checkpoint, with cached decode state.

    python -m torchtitan_hyena.generate --checkpoint DIR --max_new_tokens N --output OUT.jsonl \\
        (--prompt_tokens IN.jsonl | --prompt ACGT... [--prompt ...] | --fasta IN.fasta) \\
        [--temperature 1.0] [--top_k 0] [--top_p 1.0] [--seed 0] [--eod_id ID] \\
        [--batch_size 8] [--dtype float32] [--device auto]

``DIR`` is a step folder (training checkpoint or converter output) with ``model_args.json``. Token
prompts are lines ``{"tokens": [ids...]}``; ``--prompt`` and ``--fasta`` take DNA (or any printable
ASCII) text for byte-tokenized models such as Evo 2. Output line i belongs to prompt i: ``"tokens"``
holds the generated ids only (not the prompt), ``"text"`` their bytes for text prompts, ``"id"`` the
FASTA record id, ``"stop"`` why it ended (``eod`` or ``max_new_tokens``). The EOD token ends a
sequence and is not part of it; it is the byte tokenizer's EOD (0) for text prompts, ``--eod_id`` for
token prompts (none by default). ``--temperature 0`` is greedy. The output file appears only when
complete.

Prompts of different lengths share a batch: one prefill through the ordinary forward, then one step per
token from the decode state (KV cache, FIR tails, Hyena-LI modes; ``models/common/decode.py``). A
prompt's tokens do not depend on the batch it shares: samples come from its own seeded generator.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from torchtitan_hyena.build import load_model
from torchtitan_hyena.components.sampling import Sampling, sample_next, sequence_generators
from torchtitan_hyena.components.tokenizers import ByteTokenizer
from torchtitan_hyena.dtypes import DTYPES
from torchtitan_hyena.errors import UserError, run_cli
from torchtitan_hyena.models.common.decode import DecodeCache
from torchtitan_hyena.protocols.model import read_model_args
from torchtitan_hyena.score import batches_by_length, read_token_lines, resolve_device, write_jsonl_atomic
from torchtitan_hyena.tools.outputs import check_writable_file


@dataclass
class Completion:
    tokens: list[int]  # generated ids, without the prompt and without the EOD that ended them
    stopped_at_eod: bool


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling | None = None,
    eod_id: int | None = None,
    batch_size: int = 8,
) -> list[Completion]:
    """Continue every prompt by up to ``max_new_tokens`` tokens, stopping a sequence at ``eod_id``.

    Batches group prompts of similar length; the result is in input order and equals generating each
    prompt alone (prompt i samples from the generator of (``sampling.seed``, i)). Default: ``Sampling()``.
    """
    sampling = sampling or Sampling()
    if any(not p for p in prompts):
        raise UserError("an empty prompt has nothing to continue; give every prompt at least one token")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[Completion | None] = [None] * len(prompts)
    try:
        for indices in batches_by_length([len(p) for p in prompts], batch_size):
            batch = [prompts[i] for i in indices]
            generators = sequence_generators(sampling.seed, indices)
            completions = generate_batch(model, batch, max_new_tokens, sampling, generators, eod_id, device)
            for i, completion in zip(indices, completions):
                results[i] = completion
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def generate_batch(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling,
    generators: list[torch.Generator],
    eod_id: int | None,
    device: torch.device,
) -> list[Completion]:
    """One prefill of the right-padded prompts, then one cached step per new token until all rows stop."""
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt)
    cache = DecodeCache(lengths.to(device), capacity=int(lengths.max()) + max_new_tokens)
    logits = model(tokens.to(device), cache=cache)[:, -1]
    out = [Completion([], False) for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        next_ids = sample_next(logits, sampling, generators)
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            if token == eod_id:
                out[row].stopped_at_eod = done[row] = True
            else:
                out[row].tokens.append(token)
                done[row] = len(out[row].tokens) == max_new_tokens
        if all(done):
            break
        logits = model(next_ids[:, None], cache=cache)[:, -1]
    return out


# ---------------------------------------------------------------------------------------------------- CLI
def text_tokens(text: str, where: str) -> list[int]:
    """Byte tokens of a text prompt; printable ASCII only, as the DNA data pipeline takes."""
    bad = next((c for c in text if not 32 <= ord(c) <= 126), None)
    if bad is not None:
        raise UserError(
            f"{where} holds {bad!r} (U+{ord(bad):04X}); the byte tokenizer takes printable ASCII text such as "
            "DNA letters; give other ids with --prompt_tokens"
        )
    if not text:
        raise UserError(f"{where} is empty; a prompt needs at least one character")
    return ByteTokenizer().encode(text).tolist()


def decode_bytes(tokens: list[int]) -> str:
    """Text of byte tokens; ids the byte tokenizer never produces (>= 256) become U+FFFD, as bad UTF-8 does."""
    return bytes(t if t < 256 else 0xFF for t in tokens).decode("utf-8", errors="replace")


def read_prompts(args: argparse.Namespace) -> tuple[list[list[int]], list[str] | None, bool]:
    """(token lists, FASTA record ids or None, whether the prompts are text) from the CLI arguments."""
    if args.prompt_tokens is not None:
        if not Path(args.prompt_tokens).is_file():
            raise UserError(f"--prompt_tokens {args.prompt_tokens} does not exist or is not a file")
        prompts = read_token_lines(args.prompt_tokens)
        for lineno, prompt in enumerate(prompts, start=1):
            if not prompt:
                raise UserError(f"{args.prompt_tokens}: prompt {lineno} is empty; give at least one token")
        if not prompts:
            raise UserError(f"{args.prompt_tokens} holds no prompt")
        return prompts, None, False
    if args.fasta is not None:
        from torchtitan_hyena.components.datasets.dna import iter_fasta

        records = list(iter_fasta(args.fasta))
        names = [r.name for r in records]
        return [text_tokens(r.sequence.decode("ascii"), f"FASTA record {r.name!r}") for r in records], names, True
    return [text_tokens(p, f"--prompt {i + 1}") for i, p in enumerate(args.prompt)], None, True


def check_prompts(checkpoint: str, prompts: list[list[int]], max_new_tokens: int, text: bool) -> None:
    """Ids within the vocabulary, lengths within the model's positions, text only for byte models."""
    _, _, values = read_model_args(checkpoint)
    vocab, positions = values.get("vocab_size"), values.get("max_seq_len")
    top = max(max(p) for p in prompts)
    if vocab is not None and top >= vocab:
        raise UserError(f"prompt token {top} is >= the model's vocab_size {vocab}")
    longest = max(len(p) for p in prompts)
    if positions is not None and longest + max_new_tokens > positions:
        if longest > positions:
            raise UserError(f"a prompt of {longest} tokens is beyond the model's {positions} positions; shorten it")
        raise UserError(
            f"a prompt of {longest} tokens plus --max_new_tokens {max_new_tokens} is beyond the model's "
            f"{positions} positions; use --max_new_tokens {positions - longest} or less"
        )
    job_config = Path(checkpoint) / "job_config.json"
    if text and job_config.is_file():
        dataset = json.loads(job_config.read_text()).get("training", {}).get("dataset")
        if dataset == "neural_pile":
            raise UserError("this model was trained on Neural Pile spike counts, not bytes; use --prompt_tokens")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m torchtitan_hyena.generate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="step folder with model_args.json")
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--prompt_tokens", help='jsonl prompts, one {"tokens": [...]} per line')
    inputs.add_argument("--prompt", action="append", help="a text (DNA) prompt for byte models; repeatable")
    inputs.add_argument("--fasta", help="FASTA prompts (DNA, byte tokenizer), one per record")
    p.add_argument("--output", required=True, help="jsonl output, one line per prompt in input order")
    p.add_argument("--max_new_tokens", type=int, required=True, help="tokens to generate per prompt (at most)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy (default 1)")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="sample within the top-p probability mass (1: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; prompt i draws from (seed, i)")
    p.add_argument("--eod_id", type=int, default=None, help="token that ends a sequence (text prompts: 0; -1: none)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per batch")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype (default float32)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.max_new_tokens <= 0:
        raise UserError(f"--max_new_tokens must be positive, got {args.max_new_tokens}")
    if args.batch_size <= 0:
        raise UserError(f"--batch_size must be positive, got {args.batch_size}")
    if args.eod_id is not None and args.eod_id < -1:
        raise UserError(f"--eod_id must be a token id, or -1 for none; got {args.eod_id}")
    check_writable_file(args.output, "--output")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    prompts, names, text = read_prompts(args)
    check_prompts(args.checkpoint, prompts, args.max_new_tokens, text)
    eod_id = args.eod_id if args.eod_id is not None else ByteTokenizer.eod_id if text else None
    device = resolve_device(args.device)
    model = load_model(args.checkpoint, device, DTYPES[args.dtype])
    completions = generate(
        model, prompts, args.max_new_tokens, sampling, None if eod_id == -1 else eod_id, args.batch_size
    )
    rows = []
    for i, completion in enumerate(completions):
        row: dict = {"id": names[i]} if names is not None else {}
        row["tokens"] = completion.tokens
        if text:
            row["text"] = decode_bytes(completion.tokens)
        row["stop"] = "eod" if completion.stopped_at_eod else "max_new_tokens"
        rows.append(row)
    write_jsonl_atomic(args.output, rows)


if __name__ == "__main__":
    run_cli(main)
