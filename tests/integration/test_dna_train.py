"""End to end on the bundled DNA sample: train llama3 (vocab 512) from FASTA and from its memmap, then score."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import REPO, TINY, run_cli, torchrun_losses
from torchtitan_hyena import preprocess
from torchtitan_hyena.components.datasets.dna import iter_fasta

pytestmark = pytest.mark.slow

DNA = REPO / "tests" / "assets" / "dna_sample"


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_on_fasta_and_memmap_then_score(tmp_path):
    memmap = tmp_path / "memmap"
    for split in ("train", "test"):
        preprocess.main(["--input", str(DNA / f"{split}.fasta"), "--split", split, "--output_dir", str(memmap)])
    common = [*TINY, "--model.vocab_size", "512", "--training.shuffle", "true", "--validation.enable", "true",
              "--validation.freq", "10", "--validation.steps", "2"]  # fmt: skip
    fasta_run = [*common, "--training.dataset", "dna", "--training.dataset_path", str(DNA),
                 "--checkpoint.enable", "true", "--job.dump_folder", str(tmp_path / "fasta")]  # fmt: skip
    memmap_run = [*common, "--training.dataset", "memmap", "--training.dataset_path", str(memmap),
                  "--job.dump_folder", str(tmp_path / "memmap_run")]  # fmt: skip
    from_fasta, from_memmap = torchrun_losses(1, [fasta_run, memmap_run], tmp_path)
    assert len(from_fasta) == 10 and from_fasta[-1] < 0.5 * from_fasta[0]  # about 6.7 -> 1.4
    assert from_memmap == from_fasta  # the same windows, labels and weights in the same steps
    val = [read_jsonl(tmp_path / run / "validation.jsonl")[-1] for run in ("fasta", "memmap_run")]
    assert val[0] == val[1] and val[0]["validation_loss"] < from_fasta[0]

    # Score the bundled test records, cut to 120-400 bases (different lengths exercise batching and padding;
    # whole records would cost ~10 s of CPU per run), as FASTA and as the same token ids.
    ckpt = tmp_path / "fasta" / "checkpoint" / "step-10"
    records = []
    for i, r in enumerate(iter_fasta(DNA / "test.fasta")):
        soft_masked = re.search(rb"[acgt]", r.sequence)
        start = max(0, soft_masked.start() - 50) if soft_masked else 0  # keep some soft-masked bases
        records.append(r._replace(sequence=r.sequence[start : start + 120 + 70 * i]))
    fasta = tmp_path / "records.fasta"
    lines = (f">{r.name} cut\n{r.sequence[:60].decode()}\n{r.sequence[60:].decode()}\n" for r in records)
    fasta.write_text("".join(lines))
    out_fasta, out_tokens, tokens = tmp_path / "fasta.jsonl", tmp_path / "tokens.jsonl", tmp_path / "in.jsonl"
    proc = run_cli(["--checkpoint", str(ckpt), "--fasta", str(fasta), "--prepend_bos",
                    "--output", str(out_fasta), "--batch_size", "2"], "torchtitan_hyena.score")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(c in r.sequence for r in records for c in b"acgt")  # soft-masked bases are uppercased for scoring
    tokens.write_text("".join(json.dumps({"tokens": [0, *r.sequence.upper()]}) + "\n" for r in records))
    proc = run_cli(["--checkpoint", str(ckpt), "--tokens", str(tokens), "--output", str(out_tokens),
                    "--batch_size", "2"], "torchtitan_hyena.score")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored, reference = read_jsonl(out_fasta), read_jsonl(out_tokens)
    assert [row["id"] for row in scored] == [r.name for r in records]  # input order, record ids
    assert [len(row["logprobs"]) for row in scored] == [len(r.sequence) for r in records]  # BOS: every base
    assert [row["logprobs"] for row in scored] == [row["logprobs"] for row in reference]
    assert all(-20 < lp <= 0 for row in scored for lp in row["logprobs"])
