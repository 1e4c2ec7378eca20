"""What ``score`` can write besides per-token log-probabilities, as evo2 users compute it: per-sequence
reductions (``score_sequences(reduce_method=...)``), reverse-complement averaging (``score_sequences_rc``) and
hidden states of chosen layers (``Evo2.forward(return_embeddings=True, layer_names=...)``)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from torchtitan_hyena.errors import UserError
from torchtitan_hyena.protocols.state_dict_adapter import StateDictAdapter

REDUCTIONS = ("mean", "sum")
# IUPAC nucleotide codes and their complements, both cases (Biopython's reverse_complement); other bytes are kept.
_COMPLEMENT = bytes.maketrans(b"ACGTRYKMBVDHNacgtrykmbvdhn", b"TGCAYRMKVBHDNtgcayrmkvbhdn")


def reduce_logprobs(logprobs: list[float], how: str) -> float | None:
    """One record's score: the mean or sum of its log-probabilities (the mean of none is null)."""
    if how == "sum":
        return math.fsum(logprobs)
    return math.fsum(logprobs) / len(logprobs) if logprobs else None


def reverse_complement_tokens(tokens: list[int], bos: bool) -> list[int]:
    """The reverse complement of a byte-tokenized DNA sequence, case kept; a leading BOS stays in front."""
    head, body = tokens[: int(bos)], tokens[int(bos) :]
    return head + list(bytes(reversed(body)).translate(_COMPLEMENT))


def layer_module_name(name: str, n_layers: int, formats: Iterable[type[StateDictAdapter]]) -> str | None:
    """Our module name for an ``--embeddings`` entry: a block index (``28``: block 28's output), a module name of
    one of the family's checkpoint ``formats`` (evo2/vortex: ``blocks.28``, ``blocks.28.mlp.l3``,
    ``embedding_layer``, ``norm``) or our own (``layers.28.mlp.w2``)."""
    if re.fullmatch(r"\d+", name):
        return f"layers.{int(name)}" if int(name) < n_layers else None
    for fmt in formats:
        if fmt.block_prefix and re.fullmatch(rf"{re.escape(fmt.block_prefix)}\.\d+(\..+)?", name):
            return fmt.module_name(name)
        if name in fmt.top_modules:
            return fmt.module_name(name)
    return name


def resolve_layers(
    model: nn.Module, spec: str, n_layers: int, formats: Iterable[type[StateDictAdapter]] = ()
) -> dict[str, nn.Module]:
    """``--embeddings`` value (comma-separated names) -> {name as given: module}; unknown names fail in one line."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UserError("--embeddings needs at least one layer, e.g. --embeddings 3 or --embeddings layers.3.mlp")
    modules = dict(model.named_modules())
    formats = list(formats)
    out = {}
    for name in names:
        ours = layer_module_name(name, n_layers, formats)
        if ours is None or ours not in modules:
            last = n_layers - 1
            examples = "".join(
                f"a {f.format} name ({f.block_prefix}.{last}, {f.block_prefix}.{last}.<{'|'.join(f.block_modules)}>, "
                f"{', '.join(f.top_modules)}), "
                for f in formats
                if f.block_prefix
            )
            raise UserError(
                f"--embeddings {name}: no such layer; use a block index 0..{last}, {examples}or a module name of "
                f"the model (layers.{last}.mlp)"
            )
        out[name] = modules[ours]
    return out


class HiddenStates:
    """Keeps the outputs of chosen modules during a forward pass and writes each record's real positions to
    ``folder/{index:06d}.safetensors`` (tensor per layer name as given, shape (tokens, dim); metadata ``id``)."""

    def __init__(self, modules: dict[str, nn.Module], folder: Path, ids: list[str] | None, count: int) -> None:
        self.modules, self.folder, self.ids, self.count = modules, folder, ids, count
        self.outputs: dict[str, torch.Tensor] = {}

    @contextmanager
    def recording(self) -> Iterator[None]:
        def keep(name: str):
            def hook(_module: nn.Module, _inputs: object, output: object) -> None:
                self.outputs[name] = (output[0] if isinstance(output, tuple) else output).detach()

            return hook

        handles = [module.register_forward_hook(keep(name)) for name, module in self.modules.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def save(self, indices: list[int], lengths: list[int]) -> None:
        """Write rows ``indices`` (records < ``count``; others are reverse complements) of the last forward."""
        for row, (i, length) in enumerate(zip(indices, lengths)):
            if i >= self.count:
                continue
            tensors = {name: out[row, :length].contiguous().cpu() for name, out in self.outputs.items()}
            metadata = {"index": str(i)} | ({"id": self.ids[i]} if self.ids is not None else {})
            save_file(tensors, self.folder / f"{i:06d}.safetensors", metadata=metadata)
        self.outputs.clear()
