"""Preprocessed memory-mapped data: the preprocess CLI, stream identity with the on-the-fly sources, order, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import REPO, SAMPLE, run_cli
from torchtitan_hyena import preprocess
from torchtitan_hyena.components.dataloader import build_dataloader
from torchtitan_hyena.components.datasets.base import WindowDataset
from torchtitan_hyena.components.datasets.dna import load_dna_source
from torchtitan_hyena.components.datasets.hf import load_hf_split
from torchtitan_hyena.components.datasets.memmap import load_memmap_source, tokenizer_of
from torchtitan_hyena.components.datasets.neural_pile import NeuralPileSource
from torchtitan_hyena.components.tokenizers import ByteTokenizer, SpikeTokenizer
from torchtitan_hyena.errors import UserError

DNA = REPO / "tests" / "assets" / "dna_sample"
BYTES, SPIKES = ByteTokenizer(), SpikeTokenizer(256)


@pytest.fixture(scope="module")
def np_memmap(tmp_path_factory):
    out = tmp_path_factory.mktemp("np")
    for split in ("train", "test"):
        preprocess.main(["--input", str(SAMPLE), "--split", split, "--output_dir", str(out)])
    return out


@pytest.fixture(scope="module")
def dna_memmap(tmp_path_factory):
    out = tmp_path_factory.mktemp("dna")
    for split in ("train", "test"):
        preprocess.main(["--input", str(DNA / f"{split}.fasta"), "--split", split, "--output_dir", str(out)])
    return out


def test_neural_pile_memmap_is_the_on_the_fly_stream(np_memmap):
    meta = json.loads((np_memmap / "train.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"], meta["eod_id"]) == ("spikes", 256, "uint8", None)
    assert meta["num_documents"] == 32 and (np_memmap / "train.bin").stat().st_size == meta["num_tokens"]
    assert tokenizer_of(np_memmap, "train") == SPIKES
    rows = load_hf_split(str(SAMPLE), "train")
    for shuffle in (False, True):
        live = NeuralPileSource(rows, SPIKES, shuffle, 7, "live")
        mapped = load_memmap_source(str(np_memmap), "train", SPIKES, 7, shuffle)
        n = live.num_tokens(0)
        assert mapped.num_tokens(0) == n == meta["num_tokens"]
        for epoch in (0, 1):
            assert np.array_equal(mapped.read(epoch, 0, n), live.read(epoch, 0, n)), (shuffle, epoch)
        a, b = WindowDataset(live, 511, 256), WindowDataset(mapped, 511, 256)
        for w in (0, 5, len(a) - 1, len(a) + 3):  # the last also crosses into epoch 1
            assert torch.equal(a[w]["input"], b[w]["input"]) and torch.equal(a[w]["labels"], b[w]["labels"])


def test_fasta_memmap_is_the_on_the_fly_stream_with_eod_boundaries(dna_memmap):
    meta = json.loads((dna_memmap / "train.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("byte", 512, "uint8")
    assert (meta["eod_id"], meta["pad_id"], meta["append_eod"], meta["num_documents"]) == (0, 1, True, 40)
    tokens = np.fromfile(dna_memmap / "train.bin", dtype=np.uint8)
    offsets = np.load(dna_memmap / "train.index.npy")
    assert len(offsets) == 41 and offsets[-1] == len(tokens) == meta["num_tokens"]
    assert np.all(tokens[offsets[1:] - 1] == 0) and np.count_nonzero(tokens == 0) == 40  # one EOD per document
    for shuffle in (False, True):
        live = load_dna_source(str(DNA), "train", BYTES, 3, shuffle)
        mapped = load_memmap_source(str(dna_memmap), "train", BYTES, 3, shuffle)
        n = live.num_tokens(0)
        for epoch in (0, 2):
            assert np.array_equal(mapped.read(epoch, 0, n), live.read(epoch, 0, n))


def test_uint16_jsonl_and_options(tmp_path):
    docs = tmp_path / "d.jsonl"
    docs.write_text("\n".join(json.dumps({"seq": s}) for s in ("ACGTn", "ggCA", "TTTT", "ACAC")) + "\n")
    common = ["--input", str(docs), "--jsonl_key", "seq", "--output_dir"]
    preprocess.main([*common, str(tmp_path / "a"), "--dtype", "uint16", "--no_eod", "--to_upper"])
    meta = json.loads((tmp_path / "a" / "train.json").read_text())
    assert meta["dtype"] == "uint16" and (tmp_path / "a" / "train.bin").stat().st_size == 2 * 17
    stream = load_memmap_source(str(tmp_path / "a"), "train", BYTES, 0, False).read(0, 0, 17)
    assert stream.dtype == np.uint16 and bytes(stream.astype(np.uint8)) == b"ACGTNGGCATTTTACAC"

    fasta = tmp_path / "r.fa"
    fasta.write_text(">a\nACGTn\n>b\nRYkm\n")
    preprocess.main(["--input", str(fasta), "--output_dir", str(tmp_path / "rc"), "--reverse_complement"])
    stream = load_memmap_source(str(tmp_path / "rc"), "train", BYTES, 0, False).read(0, 0, 24)
    assert bytes(stream) == b"ACGTn\0nACGT\0RYkm\0kmRY\0"
    fasta.write_text(">a\n|d__Bacteria;s__x|ACGT\n")
    with pytest.raises(UserError, match="tags cannot be reverse-complemented"):
        preprocess.main(["--input", str(fasta), "--output_dir", str(tmp_path / "rc2"), "--reverse_complement"])


def test_test_fraction_holds_out_whole_documents(tmp_path):
    args = ["--input", str(DNA / "train.fasta"), "--test_fraction", "0.25", "--seed", "1", "--output_dir"]
    preprocess.main([*args, str(tmp_path / "a")])
    preprocess.main([*args, str(tmp_path / "b")])
    train, test = (json.loads((tmp_path / "a" / f"{s}.json").read_text()) for s in ("train", "test"))
    assert train["num_documents"] + test["num_documents"] == 40 and 3 <= test["num_documents"] <= 17
    for s in ("train", "test"):  # seeded: the same split twice
        assert (tmp_path / "a" / f"{s}.bin").read_bytes() == (tmp_path / "b" / f"{s}.bin").read_bytes()
    everything = load_dna_source(str(DNA), "train", BYTES, 0, False)
    assert train["num_tokens"] + test["num_tokens"] == everything.num_tokens(0)


def memmap_loader(folder, rank: int, dp: int, local: int, state: dict | None = None):
    dl = build_dataloader(dataset="memmap", path=str(folder), split="train", tokenizer=SPIKES, vocab_size=256,
                          seq_len=63, local_batch=local, global_batch=8, dp_rank=rank, dp_degree=dp, seed=0,
                          shuffle=True, infinite=True)  # fmt: skip
    if state is not None:
        dl.load_state_dict(state)
    return dl


def global_batches(folder, dp: int, local: int, steps: int, state: dict | None = None) -> list[torch.Tensor]:
    per_rank = []
    for r in range(dp):
        dl = memmap_loader(folder, r, dp, local, state)
        it = iter(dl)
        per_rank.append([[next(it)["input"] for _ in range(dl.accumulation_steps)] for _ in range(steps)])
    return [torch.cat([torch.cat(per_rank[r][s]) for r in range(dp)]) for s in range(steps)]


def test_memmap_order_is_layout_invariant_and_resumes_exactly(np_memmap):
    reference = global_batches(np_memmap, dp=1, local=8, steps=5)
    for dp, local in ((2, 2), (4, 1), (8, 1)):
        assert all(torch.equal(a, b) for a, b in zip(global_batches(np_memmap, dp, local, 3), reference)), (dp, local)
    dl = memmap_loader(np_memmap, 0, 1, 2)
    it = iter(dl)
    for _ in range(3 * dl.accumulation_steps):
        next(it)
    state = dl.state_dict()
    assert state == {"windows_consumed": 24}
    resumed = global_batches(np_memmap, 4, 1, 2, state)
    assert all(torch.equal(a, b) for a, b in zip(resumed, reference[3:]))


def test_memmap_errors(np_memmap, dna_memmap, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        tokenizer_of(tmp_path / "nowhere", "train")
    with pytest.raises(UserError, match="has no split 'valid'.*splits: test, train"):
        tokenizer_of(np_memmap, "valid")
    with pytest.raises(UserError, match="written with the spikes tokenizer"):
        load_memmap_source(str(np_memmap), "test", BYTES, 0, False)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("train.json", "train.index.npy"):
        (broken / name).write_bytes((dna_memmap / name).read_bytes())
    (broken / "train.bin").write_bytes((dna_memmap / "train.bin").read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated or foreign"):
        load_memmap_source(str(broken), "train", BYTES, 0, False)
    (broken / "train.json").write_text('{"format": "megatron"}')
    with pytest.raises(UserError, match="is not torchtitan_hyena.memmap metadata"):
        tokenizer_of(broken, "train")


def test_preprocess_leaves_nothing_half_written(tmp_path):
    bad = tmp_path / "bad.fa"
    bad.write_text(">a\nACGT\n>b\nAC\tGT\n")  # the second record is corrupt
    out = tmp_path / "out"
    with pytest.raises(UserError, match="not printable ASCII"):
        preprocess.main(["--input", str(bad), "--output_dir", str(out)])
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--input", "missing.fasta"], "FASTA file missing.fasta does not exist"),
        (["--input", "notes.txt"], "cannot tell the format of notes.txt"),
        (["--input", str(DNA / "train.fasta"), "--test_fraction", "1.5"], "--test_fraction must be in [0, 1)"),
        (["--input", str(SAMPLE), "--test_fraction", "0.1"], "Neural Pile input takes one dataset"),
        (["--input", str(DNA / "train.fasta"), str(SAMPLE / "x.jsonl")], "is not a fasta file"),
    ],
)
def test_preprocess_bad_input_is_one_line(tmp_path, args, fragment):
    with pytest.raises(UserError) as e:
        preprocess.main([*args, "--output_dir", str(tmp_path / "o")])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_preprocess_cli_exit_code(tmp_path):
    proc = run_cli(["--input", str(tmp_path / "none.fa"), "--output_dir", str(tmp_path)], "torchtitan_hyena.preprocess")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: FASTA file") and "Traceback" not in proc.stderr
