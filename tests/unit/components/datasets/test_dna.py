"""DNA data: byte tokenizer, FASTA/jsonl reading, the on-the-fly source and Evo 2 loss shaping."""

from __future__ import annotations

import gzip
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from torchtitan_hyena.components.dataloader import build_dataloader, build_tokenizer
from torchtitan_hyena.components.datasets.base import IGNORE_INDEX
from torchtitan_hyena.components.datasets.dna import iter_fasta, iter_jsonl, load_dna_source, split_file
from torchtitan_hyena.components.datasets.dna_targets import ByteTargets, LossShaping, control_tag_mask
from torchtitan_hyena.components.tokenizers import ByteTokenizer
from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.errors import ConfigError, UserError

DNA = REPO / "tests" / "assets" / "dna_sample"
TOK = ByteTokenizer()
W = 0.1


def ids(text: str) -> np.ndarray:
    return np.frombuffer(text.replace("0", "\x00").encode(), dtype=np.uint8)


def one_line_error(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_byte_tokenizer_ids():
    assert TOK.encode("ACGTNacgtn").tolist() == [65, 67, 71, 84, 78, 97, 99, 103, 116, 110]
    assert (TOK.vocab_size, TOK.eod_id, TOK.pad_id, TOK.max_token_id) == (512, 0, 1, 255)
    assert TOK.encode("é").tolist() == [0xC3, 0xA9]  # UTF-8 bytes, like Evo 2's CharLevelTokenizer
    config = SimpleNamespace(training=SimpleNamespace(dataset="dna"))
    assert build_tokenizer(config) == ByteTokenizer(512)


def test_fasta_multiline_headers_blank_lines_and_gzip(tmp_path):
    text = (
        ">seq1 first record, with description\r\nACGT\r\nacgtNN  \n\n>seq2\n\nGGG\n;comment\nccc\n>empty\n>seq3|x\nT\n"
    )
    path = tmp_path / "a.fa"
    path.write_text(text)
    expected = [("seq1", b"ACGTacgtNN"), ("seq2", b"GGGccc"), ("empty", b""), ("seq3|x", b"T")]
    assert [tuple(r) for r in iter_fasta(path)] == expected
    gz = tmp_path / "a.fasta.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    assert [tuple(r) for r in iter_fasta(gz)] == expected


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"ACGT\n>x\nAC\n", "sequence data before the first '>' header"),
        (b"", "holds no FASTA record"),
        (b"\n\n", "holds no FASTA record"),
        (b">x\nAC\x00GT\n", "not printable ASCII"),
        (gzip.compress(b">x\nACGT\n", mtime=0)[:12], "could not read"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "sequence data before the first '>' header"),
    ],
)
def test_bad_fasta_is_a_one_line_error(tmp_path, content, fragment):
    path = tmp_path / "bad.fa"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        list(iter_fasta(path))
    assert fragment in one_line_error(e)
    with pytest.raises(UserError, match="does not exist"):
        list(iter_fasta(tmp_path / "missing.fa"))


def test_jsonl_text_documents(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ACGT"}\n\n{"text": "ttgca", "id": 3}\n')
    assert list(iter_jsonl(path)) == [b"ACGT", b"ttgca"]
    for bad in ('{"txt": "A"}', "[1, 2]", "not json", '{"text": 5}'):
        path.write_text('{"text": "A"}\n' + bad + "\n")
        with pytest.raises(UserError) as e:
            list(iter_jsonl(path))
        assert f'{path}:2 is not a JSON object with a "text" string' == one_line_error(e)


def test_documents_are_joined_with_eod(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "ACGT"}\n{"text": ""}\n{"text": "gg"}\n')
    source = load_dna_source(str(tmp_path), "train", TOK, seed=0, shuffle=False)
    assert source.read(0, 0, source.num_tokens(0)).tolist() == [65, 67, 71, 84, 0, 103, 103, 0]
    shuffled = load_dna_source(str(tmp_path), "train", TOK, seed=1, shuffle=True)
    streams = {tuple(shuffled.read(e, 0, 8).tolist()) for e in range(8)}
    assert streams == {(65, 67, 71, 84, 0, 103, 103, 0), (103, 103, 0, 65, 67, 71, 84, 0)}  # per-document order
    (tmp_path / "train.jsonl").write_text('{"text": "AC\\u0000GT"}\n')
    with pytest.raises(UserError, match="reserved for EOD"):
        load_dna_source(str(tmp_path), "train", TOK, seed=0, shuffle=False)


def test_split_files(tmp_path):
    (tmp_path / "train.fasta").write_text(">a\nAC\n")
    (tmp_path / "test.fa.gz").write_bytes(gzip.compress(b">b\nGT\n"))
    assert split_file(str(tmp_path), "test").name == "test.fa.gz"
    assert split_file(str(tmp_path / "{split}.fasta"), "train").name == "train.fasta"
    assert split_file(str(tmp_path / "train.fasta"), "train").name == "train.fasta"
    with pytest.raises(UserError, match="single file, so it has no 'test' split"):
        split_file(str(tmp_path / "train.fasta"), "test")
    (tmp_path / "train.jsonl").write_text('{"text": "A"}\n')
    with pytest.raises(UserError, match="exactly one file for split 'train'"):
        split_file(str(tmp_path), "train")
    with pytest.raises(UserError, match="does not exist"):
        split_file(str(tmp_path / "nowhere"), "train")


def test_bundled_sample_has_evo2_structure():
    records = list(iter_fasta(DNA / "train.fasta"))
    assert len(records) == 40 and len(list(iter_fasta(DNA / "test.fasta"))) == 5
    stream = b"".join(r.sequence for r in records)
    assert 0.03 < sum(stream.count(c) for c in b"acgt") / len(stream) < 0.15  # soft-masked repeats
    assert stream.count(b"|d__") >= 5 and b"@" in stream and b"#" in stream and b"N" in stream
    assert (DNA / "train.fasta").stat().st_size + (DNA / "test.fasta").stat().st_size < 300_000


def test_control_tag_mask_spans_and_eod_reset():
    cases = {
        "ACGT|d__Bac;p__X|ACgt": "1111" + "0" * 13 + "1111",
        "AC@G#T": "110101",
        "__Bac;p__X|ACGT": "0" * 11 + "1111",  # a tag cut by the window start
        "A|d__y0ACG|T": "100000" + "111111",  # EOD ends the span; it and what follows are kept
        "AC|GT|ACGT": "1" * 10,  # pipes around plain DNA are not a tag
        "|s__Homo sapiens|": "0" * 17,  # spaces mark tags too
    }
    for text, expected in cases.items():
        assert "".join("1" if m else "0" for m in control_tag_mask(ids(text), 0)) == expected, text


def test_uppercase_inputs_and_lowercase_weights_hand_computed():
    item = ByteTargets(LossShaping("weighted", W, False, "none"), 0)(ids("AACCggTT"))
    assert bytes(item["input"].tolist()) == b"AACCGGT"
    assert bytes(item["labels"].tolist()) == b"ACCGGTT"
    assert item["loss_weights"].tolist() == pytest.approx([1, 1, 1, W, W, 1, 1])
    upper = ByteTargets(LossShaping("upper", W, False, "none"), 0)(ids("aCg"))
    assert bytes(upper["labels"].tolist()) == b"CG" and "loss_weights" not in upper
    raw = ByteTargets(LossShaping("none", W, False, "none"), 0)(ids("aCg"))
    assert bytes(raw["input"].tolist()) == b"aC" and bytes(raw["labels"].tolist()) == b"Cg"


def test_weights_renormalized_per_microbatch_hand_computed():
    targets = ByteTargets(LossShaping("normalized_weighted", W, True, "none"), 0)
    a = targets(ids("AACCggTT"))  # weights 1 1 1 .1 .1 1 1: sum 5.2 over 7 labels
    b = targets(ids("ACGT@ACG"))  # '@' label masked: 6 labels, weights 1
    batch = targets.collate([a, b])
    counted = int((batch["labels"] != IGNORE_INDEX).sum())
    assert counted == 13 and batch["labels"][1, 3] == IGNORE_INDEX
    scale = 13 / 11.2
    expected = [[scale, scale, scale, W * scale, W * scale, scale, scale], [scale] * 3 + [0.0] + [scale] * 3]
    assert batch["loss_weights"].tolist() == [pytest.approx(row) for row in expected]
    assert float(batch["loss_weights"].sum()) == pytest.approx(counted)
    alone = targets.collate([a])  # a microbatch is its own unit: 7 / 5.2
    assert alone["loss_weights"][0, 0].item() == pytest.approx(7 / 5.2)
    empty = targets.collate([targets(ids("@@@"))])  # nothing counted: weights stay 0, no division by zero
    assert empty["loss_weights"].sum() == 0


@pytest.mark.parametrize(
    ("mode", "kept"),
    [("none", "1111111"), ("after_eod", "1110111"), ("eod", "1101111"), ("both", "1100111")],
)
def test_eod_loss_mask(mode, kept):
    item = ByteTargets(LossShaping("upper", W, False, mode), 0)(ids("ACG0TAgc"))  # labels C G 0 T A G C
    assert "".join("0" if x == IGNORE_INDEX else "1" for x in item["labels"].tolist()) == kept


def global_batches(dp: int, local: int, steps: int = 2) -> list[dict[str, torch.Tensor]]:
    """Each step's global batch, reassembled from every rank's microbatches (as in unit/components/test_data.py)."""
    per_rank = []
    for rank in range(dp):
        dl = build_dataloader(dataset="dna", path=str(DNA), split="train", tokenizer=TOK, vocab_size=512, seq_len=255,
                              local_batch=local, global_batch=8, dp_rank=rank, dp_degree=dp, seed=0, shuffle=True,
                              infinite=True, loss_shaping=LossShaping())  # fmt: skip
        it = iter(dl)
        per_rank.append([[next(it) for _ in range(dl.accumulation_steps)] for _ in range(steps)])
    keys = per_rank[0][0][0].keys()
    return [{k: torch.cat([mb[k] for r in per_rank for mb in r[s]]) for k in keys} for s in range(steps)]


def test_loss_shaping_reaches_the_loader_and_keeps_layout_invariance():
    reference = global_batches(dp=1, local=2)
    for batch in reference:
        assert set(batch) == {"input", "labels", "loss_weights"}
        assert not ((batch["input"] >= ord("a")) & (batch["input"] <= ord("z"))).any()
        for micro in range(4):  # each microbatch of 2 windows sums to its own label count
            rows = slice(2 * micro, 2 * micro + 2)
            counted = int((batch["labels"][rows] != IGNORE_INDEX).sum())
            assert float(batch["loss_weights"][rows].sum()) == pytest.approx(counted, rel=1e-6)
    for dp in (2, 4):  # the same local batch on more ranks: identical windows, labels and weights per step
        for ours, theirs in zip(global_batches(dp=dp, local=2), reference):
            assert all(torch.equal(ours[k], theirs[k]) for k in theirs), dp


def test_loss_shaping_config_checks():
    with pytest.raises(ConfigError, match="lowercase_loss_reweighting must be in"):
        ConfigManager().parse_args(["--training.lowercase_loss_reweighting", "2"])
    with pytest.raises(ConfigError, match="training.to_upper must be one of"):
        ConfigManager().parse_args(["--training.to_upper", "lower"])


@pytest.mark.parametrize("name", ["evo2_7b_8k", "evo2_1b_8k"])
def test_evo2_configs_parse(name):
    c = ConfigManager().parse_args(["--job.config_file", str(REPO / "train_configs" / f"{name}.toml")])
    assert (c.model.name, c.model.flavor, c.model.vocab_size) == ("hyena", name.removesuffix("_8k"), 512)
    assert (c.training.seq_len, c.training.dataset, c.training.to_upper) == (8192, "memmap", "normalized_weighted")
    assert c.checkpoint.initial_load_path == f"./checkpoints/{name.removesuffix('_8k')}_dcp"
    assert c.checkpoint.initial_load_model_only and c.validation.dataset_split == "test"
