"""Scoring CLI: FASTA input preparation and one-line errors (the end-to-end run: integration/test_dna_train.py)."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from torchtitan_hyena import score
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.score_outputs import reduce_logprobs, reverse_complement_tokens

DNA = REPO / "tests" / "assets" / "dna_sample"


def test_fasta_tokens_like_evo2_scoring(tmp_path):
    fasta = tmp_path / "x.fa"
    fasta.write_text(">r1 desc\nACgt\nN\n>r2\nTT\n")
    names, seqs = score.read_fasta_tokens(fasta, prepend_bos=False, keep_case=False)
    assert names == ["r1", "r2"] and seqs == [[65, 67, 71, 84, 78], [84, 84]]
    _, seqs = score.read_fasta_tokens(fasta, prepend_bos=True, keep_case=True)
    assert seqs == [[0, 65, 67, 103, 116, 78], [0, 84, 84]]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--fasta", "missing.fa"], "FASTA file missing.fa does not exist"),
        (["--fasta", str(DNA / "test.fasta"), "--device", "warp9"], "--device warp9 is not a device"),
        (["--tokens", "t.jsonl", "--prepend_bos"], "--prepend_bos and --keep_case apply to --fasta input"),
        (["--fasta", str(DNA / "test.fasta"), "--batch_size", "0"], "--batch_size must be positive"),
        (["--fasta", str(DNA / "test.fasta"), "--reverse_complement"], "use it with --fasta and --reduce mean|sum"),
        (["--tokens", "t.jsonl", "--reduce", "sum", "--reverse_complement"], "use it with --fasta and --reduce"),
        (["--fasta", str(DNA / "test.fasta"), "--embeddings", "3"], "and --embeddings_dir DIR go together"),
        (
            ["--fasta", str(DNA / "test.fasta"), "--embeddings", "3", "--embeddings_dir", str(DNA)],
            "not an empty folder",
        ),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, args, fragment):
    with pytest.raises(UserError) as e:
        score.main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "o.jsonl"), *args])
    assert fragment in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="is a folder; give a file name"):
        score.main(["--checkpoint", str(tmp_path), "--fasta", str(DNA / "test.fasta"), "--output", str(tmp_path)])


def test_exactly_one_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        score.main(["--checkpoint", ".", "--output", "o", "--tokens", "a", "--fasta", "b"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_reverse_complements_and_reductions():
    assert reverse_complement_tokens(list(b"ACgtN"), bos=False) == list(b"NacGT")
    assert reverse_complement_tokens([0, *b"RYKMBVDHSW"], bos=True) == [0, *b"WSDHBVKMRY"]
    assert reduce_logprobs([-1.0, -2.0], "mean") == -1.5 and reduce_logprobs([-1.0, -2.0], "sum") == -3.0
    assert reduce_logprobs([], "mean") is None and reduce_logprobs([], "sum") == 0.0


def test_empty_record_has_nothing_to_embed(tmp_path):
    (tmp_path / "x.fa").write_text(">a\nACGT\n>b\n\n")
    with pytest.raises(UserError, match="input sequence 2 is empty, so it has nothing to embed"):
        score.main(["--checkpoint", str(tmp_path), "--fasta", str(tmp_path / "x.fa"), "--output", str(tmp_path / "o"),
                    "--embeddings", "0", "--embeddings_dir", str(tmp_path / "emb")])  # fmt: skip
