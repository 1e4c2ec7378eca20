"""Data loading: datasets and their tokenizers, and a layout-invariant batch sampler under torchdata's
StatefulDataLoader.

Global batch ``k`` always holds windows ``[start + k*G, start + (k+1)*G)`` (``G`` = global batch
size in sequences); data-parallel rank ``r`` of ``dp`` takes the ``r``-th contiguous slice and
splits it into gradient-accumulation microbatches, as Megatron's samplers do. The same config
therefore sees the same windows in the same steps on 1 or 512 ranks, and the checkpointed state
is one integer, the number of windows consumed, so a run resumes on any number of ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from torchtitan_hyena.components.datasets.base import TokenSource, WindowDataset
from torchtitan_hyena.components.datasets.dna_targets import ByteTargets, LossShaping
from torchtitan_hyena.components.tokenizers import ByteTokenizer, SpikeTokenizer
from torchtitan_hyena.errors import UserError

# torchdata calls a torch API that torch itself has deprecated; the warning is not actionable here.
warnings.filterwarnings("ignore", message=".*set_vital.*")

SourceBuilder = Callable[..., TokenSource]
TokenizerBuilder = Callable[[Any], Any]
_SOURCES: dict[str, SourceBuilder] = {}
_TOKENIZERS: dict[str, TokenizerBuilder] = {}


def register_dataset(name: str, builder: SourceBuilder, tokenizer: TokenizerBuilder | None = None) -> None:
    """``builder(path=, split=, tokenizer=, seed=, shuffle=, vocab_size=) -> TokenSource``; ``tokenizer(job_config)``
    returns the dataset's tokenizer (an object with ``vocab_size``), or None when its tokens need none."""
    _SOURCES[name] = builder
    _TOKENIZERS[name] = tokenizer or (lambda job_config: None)


def build_tokenizer(job_config: Any) -> Any:
    """The tokenizer of ``training.dataset``: the data decide what a token id means (None: mock data)."""
    _register_builtin()
    builder = _TOKENIZERS.get(job_config.training.dataset)
    return None if builder is None else builder(job_config)


def build_source(name: str, **kwargs: Any) -> TokenSource:
    _register_builtin()
    if name not in _SOURCES:
        raise UserError(f"training.dataset {name!r} is unknown; available: {', '.join(sorted(_SOURCES))}")
    return _SOURCES[name](**kwargs)


def _register_builtin() -> None:
    if "neural_pile" in _SOURCES:
        return
    from torchtitan_hyena.components.datasets.dna import load_dna_source
    from torchtitan_hyena.components.datasets.hf import load_hf_split
    from torchtitan_hyena.components.datasets.memmap import load_memmap_source, tokenizer_of
    from torchtitan_hyena.components.datasets.mock import MockSource
    from torchtitan_hyena.components.datasets.neural_pile import NeuralPileSource

    register_dataset(
        "neural_pile",
        lambda path, split, tokenizer, seed, shuffle, vocab_size: NeuralPileSource(
            load_hf_split(path, split), tokenizer, shuffle, seed, f"{path}:{split}"
        ),
        tokenizer=lambda job_config: SpikeTokenizer(256),
    )
    register_dataset("mock", lambda path, split, tokenizer, seed, shuffle, vocab_size: MockSource(vocab_size, seed))
    tokenizers = {
        "dna": lambda job_config: ByteTokenizer(512),
        "memmap": lambda job_config: tokenizer_of(job_config.training.dataset_path, job_config.training.dataset_split),
    }
    for name, load in (("dna", load_dna_source), ("memmap", load_memmap_source)):
        register_dataset(
            name,
            lambda path, split, tokenizer, seed, shuffle, vocab_size, load=load: load(
                path, split, tokenizer, seed, shuffle
            ),
            tokenizer=tokenizers[name],
        )


class LayoutInvariantBatchSampler(Sampler[list[int]]):
    """Yields this rank's microbatches of window indices, global batch by global batch."""

    def __init__(
        self,
        global_batch: int,
        local_batch: int,
        dp_rank: int,
        dp_degree: int,
        num_windows: int | None = None,
    ) -> None:
        if global_batch % (local_batch * dp_degree):
            raise UserError(
                f"training.global_batch_size {global_batch} must be a multiple of local_batch_size {local_batch} x "
                f"data-parallel degree {dp_degree}"
            )
        self.global_batch = global_batch
        self.local_batch = local_batch
        self.dp_rank = dp_rank
        self.accumulation_steps = global_batch // (local_batch * dp_degree)
        self.num_windows = num_windows
        self.start = 0

    def __iter__(self) -> Iterator[list[int]]:
        step = 0
        per_rank = self.local_batch * self.accumulation_steps
        while True:
            base = self.start + step * self.global_batch + self.dp_rank * per_rank
            if self.num_windows is not None and self.start + (step + 1) * self.global_batch > self.num_windows:
                return
            for micro in range(self.accumulation_steps):
                first = base + micro * self.local_batch
                yield list(range(first, first + self.local_batch))
            step += 1

    def __len__(self) -> int:
        if self.num_windows is None:
            raise TypeError("an infinite sampler has no length")
        return (self.num_windows - self.start) // self.global_batch * self.accumulation_steps


class ParallelAwareDataloader(StatefulDataLoader):
    """StatefulDataLoader whose checkpoint state is the global window cursor, valid on any layout."""

    def __init__(
        self,
        dataset: WindowDataset,
        sampler: LayoutInvariantBatchSampler,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        super().__init__(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn)
        self.layout_sampler = sampler

    @property
    def accumulation_steps(self) -> int:
        return self.layout_sampler.accumulation_steps

    def state_dict(self) -> dict[str, Any]:
        yielded = super().state_dict()["_num_yielded"]
        s = self.layout_sampler
        if yielded % s.accumulation_steps:
            raise RuntimeError("data loader state taken in the middle of a global batch")
        return {"windows_consumed": s.start + yielded // s.accumulation_steps * s.global_batch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.layout_sampler.start = int(state_dict["windows_consumed"])
        super().load_state_dict({})


def build_dataloader(
    *,
    dataset: str,
    path: str,
    split: str,
    tokenizer: Any,
    vocab_size: int,
    seq_len: int,
    local_batch: int,
    global_batch: int,
    dp_rank: int,
    dp_degree: int,
    seed: int,
    shuffle: bool,
    infinite: bool,
    loss_shaping: LossShaping | None = None,
) -> ParallelAwareDataloader:
    """Build the loader for one split. ``infinite`` re-loops epochs (training); else one pass.

    ``loss_shaping`` applies to byte-tokenized (DNA/text) data only: Evo 2's uppercasing,
    lowercase loss weights, control-tag and EOD masking (see ``datasets/dna_targets.py``).
    """
    source = build_source(
        dataset, path=path, split=split, tokenizer=tokenizer, seed=seed, shuffle=shuffle, vocab_size=vocab_size
    )
    targets = None
    if loss_shaping is not None and isinstance(tokenizer, ByteTokenizer):
        targets = ByteTargets(loss_shaping, tokenizer.eod_id)
    windows = WindowDataset(source, seq_len, vocab_size, infinite=infinite, targets=targets)
    if not infinite and len(windows) < global_batch:
        raise UserError(
            f"split {split!r} of {path} has {len(windows)} windows of {seq_len + 1} tokens, fewer than one "
            f"batch of {global_batch}; lower the batch size or seq_len"
        )
    sampler = LayoutInvariantBatchSampler(
        global_batch, local_batch, dp_rank, dp_degree, num_windows=None if infinite else len(windows)
    )
    return ParallelAwareDataloader(windows, sampler, collate_fn=None if targets is None else targets.collate)


def build_dataloader_from_config(
    job_config: Any,
    *,
    split: str,
    tokenizer: Any,
    vocab_size: int,
    local_batch: int,
    global_batch: int,
    dp_rank: int,
    dp_degree: int,
    shuffle: bool,
    infinite: bool,
) -> ParallelAwareDataloader:
    """:func:`build_dataloader` for ``training.dataset`` with the job's sequence length, seed and loss shaping
    (``TrainSpec.build_dataloader_fn``'s default)."""
    t = job_config.training
    return build_dataloader(
        dataset=t.dataset,
        path=t.dataset_path,
        split=split,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        seq_len=t.seq_len,
        local_batch=local_batch,
        global_batch=global_batch,
        dp_rank=dp_rank,
        dp_degree=dp_degree,
        seed=t.seed,
        shuffle=shuffle,
        infinite=infinite,
        loss_shaping=LossShaping.from_config(t),
    )


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
