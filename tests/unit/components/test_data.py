"""Neural Pile tokenization, packing, layout-invariant order and exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import SAMPLE
from torchtitan_hyena.components.dataloader import build_dataloader, build_source
from torchtitan_hyena.components.datasets.base import WindowDataset
from torchtitan_hyena.components.datasets.hf import load_hf_split
from torchtitan_hyena.components.datasets.mock import MockSource
from torchtitan_hyena.components.datasets.neural_pile import NeuralPileSource, tokenize_spikes
from torchtitan_hyena.components.tokenizers import SpikeTokenizer
from torchtitan_hyena.errors import UserError

TOK = SpikeTokenizer(256)


def gpt_neuro_windows(rows: list[list[list[int]]], seq_len: int, vocab_size: int = 256) -> list[list[int]]:
    """gpt-neuro's algorithm, written plainly from its description: prepend a row of vocab-1, transpose,
    flatten (time-major), append to a token buffer, emit non-overlapping seq_len + 1 windows."""
    buffer: list[int] = []
    windows = []
    for counts in rows:
        t = len(counts[0])
        with_sep = [[vocab_size - 1] * t, *counts]
        for time_bin in range(t):
            for neuron_row in with_sep:
                buffer.append(neuron_row[time_bin])
        while len(buffer) >= seq_len + 1:
            windows.append(buffer[: seq_len + 1])
            buffer = buffer[seq_len + 1 :]
    return windows


@pytest.fixture(scope="module")
def train_split():
    return load_hf_split(str(SAMPLE), "train")


def test_tokenize_small_example():
    counts = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)  # 2 neurons x 3 bins
    assert tokenize_spikes(counts, TOK).tolist() == [255, 1, 4, 255, 2, 5, 255, 3, 6]


def test_counts_are_clipped_below_the_separator():
    counts = np.array([[255, 254, 0]], dtype=np.uint8)
    assert tokenize_spikes(counts, TOK).tolist() == [255, 254, 255, 254, 255, 0]


def test_stream_equals_gpt_neuro_on_bundled_sample(train_split):
    seq_len = 255
    rows = train_split["spike_counts"]
    expected = gpt_neuro_windows(rows, seq_len)
    ours = WindowDataset(NeuralPileSource(train_split, TOK, False, 0, "sample"), seq_len, 256, infinite=False)
    assert len(ours) == len(expected) > 100
    for i in (0, 1, len(expected) // 2, len(expected) - 1):
        assert ours.window(i).tolist() == expected[i]
    all_ours = np.concatenate([ours.window(i) for i in range(len(ours))])
    assert all_ours.tolist() == [tok for w in expected for tok in w]


def test_shuffle_is_seeded_and_covers_every_row(train_split):
    a = NeuralPileSource(train_split, TOK, True, seed=1, name="a")
    b = NeuralPileSource(train_split, TOK, True, seed=1, name="b")
    c = NeuralPileSource(train_split, TOK, True, seed=2, name="c")
    n = a.num_tokens(0)
    assert np.array_equal(a.read(0, 0, n), b.read(0, 0, n))
    assert not np.array_equal(a.read(0, 0, 4096), c.read(0, 0, 4096))
    assert not np.array_equal(a.read(0, 0, 4096), a.read(1, 0, 4096))  # a new order each epoch
    plain = NeuralPileSource(train_split, TOK, False, 0, "plain").read(0, 0, n)
    assert np.array_equal(np.bincount(a.read(3, 0, n), minlength=256), np.bincount(plain, minlength=256))


def loader(rank: int, dp: int, local: int = 2, global_batch: int = 8, **kw):
    return build_dataloader(dataset="neural_pile", path=str(SAMPLE), split="train", tokenizer=TOK, vocab_size=256,
                            seq_len=63, local_batch=local, global_batch=global_batch, dp_rank=rank, dp_degree=dp,
                            seed=0, shuffle=kw.get("shuffle", True), infinite=True)  # fmt: skip


def global_batches(dp: int, local: int, steps: int, state: dict | None = None) -> list[torch.Tensor]:
    """Reassemble the global batch of each step from every rank's microbatches."""
    per_rank = []
    for r in range(dp):
        dl = loader(r, dp, local)
        if state is not None:
            dl.load_state_dict(state)
        it = iter(dl)
        per_rank.append([[next(it)["input"] for _ in range(dl.accumulation_steps)] for _ in range(steps)])
    return [torch.cat([torch.cat(per_rank[r][s]) for r in range(dp)]) for s in range(steps)]


def test_layout_invariant_order():
    reference = global_batches(dp=1, local=8, steps=3)
    for dp, local in ((1, 2), (2, 2), (4, 1), (4, 2), (8, 1)):
        for a, b in zip(global_batches(dp, local, 3), reference):
            assert torch.equal(a, b), (dp, local)


def test_resume_state_is_compact_and_layout_free():
    dl = loader(0, 1, local=2)
    it = iter(dl)
    for _ in range(3 * dl.accumulation_steps):
        next(it)
    state = dl.state_dict()
    assert state == {"windows_consumed": 24}
    uninterrupted = global_batches(dp=1, local=8, steps=5)[3:]
    assert all(torch.equal(a, b) for a, b in zip(global_batches(4, 1, 2, state), uninterrupted))


def test_validation_loader_is_finite():
    dl = build_dataloader(dataset="neural_pile", path=str(SAMPLE), split="test", tokenizer=TOK, vocab_size=256,
                          seq_len=511, local_batch=4, global_batch=4, dp_rank=0, dp_degree=1, seed=0, shuffle=False,
                          infinite=False)  # fmt: skip
    batches = list(dl)
    windows = len(dl.dataset)
    assert len(batches) == windows // 4 and windows == 123138 // 512


def test_mock_is_reproducible_and_in_vocab():
    a, b = MockSource(300, seed=3), MockSource(300, seed=3)
    x = a.read(0, 70000, 140000)
    assert np.array_equal(x, b.read(0, 70000, 140000)) and x.max() < 300 and len(x) == 70000
    assert np.array_equal(a.read(0, 100000, 100010), x[30000:30010])


def test_data_errors():
    with pytest.raises(UserError, match="does not exist"):
        build_source("neural_pile", path="/no/such/folder", split="train", tokenizer=TOK, seed=0, shuffle=False,
                     vocab_size=256)  # fmt: skip
    with pytest.raises(UserError, match="no split"):
        build_source("neural_pile", path=str(SAMPLE), split="validation", tokenizer=TOK, seed=0, shuffle=False,
                     vocab_size=256)  # fmt: skip
    with pytest.raises(UserError, match="unknown"):
        build_source("imagenet", path="", split="train", tokenizer=TOK, seed=0, shuffle=False, vocab_size=256)
    source = build_source("neural_pile", path=str(SAMPLE), split="train", tokenizer=TOK, seed=0, shuffle=False,
                          vocab_size=256)  # fmt: skip
    with pytest.raises(UserError, match=">= model.vocab_size 200"):
        WindowDataset(source, 127, vocab_size=200).window(0)
    with pytest.raises(UserError, match="fewer than one window"):
        WindowDataset(source, 10**7, vocab_size=256)
