"""The model of a DCP step folder that does not record it: TorchTitan and gpt-neuro write no ``model_args.json``.

The description comes from the user, a training TOML (TorchTitan v0.2 / gpt-neuro keys: ``[model] name, flavor``,
the vocabulary in ``model.vocab_size`` or gpt-neuro's ``training.vocab_size``, ``training.seq_len``) or a flavor name,
and is completed from the stored tensors where they settle a value on their own: the vocabulary (embedding rows), the
layer count (``layers.N``) and the key/value heads (``wk`` rows over the flavor's head size). Everything else (width,
heads, MLP size, RoPE) comes from the flavor; the exporter then checks every stored shape against the result.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any

from torchtitan_hyena.errors import UserError
from torchtitan_hyena.models.common.rope import ROPE_CONFIG_KEYS
from torchtitan_hyena.models.llama3.args import Llama3Args
from torchtitan_hyena.protocols.train_spec import get_flavor_args, get_train_spec
from torchtitan_hyena.tools.logging import logger

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

_LAYER_RE = re.compile(r"^layers\.(\d+)\.")
_NAMES = ("llama3", "llama")  # gpt-neuro and TorchTitan v0.1 call the family "llama"


@dataclasses.dataclass
class ModelSource:
    """What the user said about the model: a TOML path and/or flavor, vocabulary and RoPE scaling (empty: unsaid)."""

    config: str = ""
    flavor: str = ""
    vocab_size: int = 0
    rope_scaling: str = ""

    def given(self) -> bool:
        return bool(self.config or self.flavor or self.vocab_size or self.rope_scaling)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path} cannot be read ({e}); pass the run's training TOML") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--config {path} is not valid TOML ({e})") from None


def _from_toml(path: str) -> tuple[str, dict[str, Any]]:
    """(flavor, explicit arg values) from a training TOML; keys other than the model's are not read."""
    toml = _read_toml(path)
    model, training = toml.get("model", {}), toml.get("training", {})
    name = model.get("name", "llama3")
    if name not in _NAMES:
        raise UserError(f"--config {path} trains model.name {name!r}; dcp_to_llama.py exports Llama (llama3) models")
    values: dict[str, Any] = {k: model[k] for k in sorted(ROPE_CONFIG_KEYS) if k in model}
    vocab = model.get("vocab_size") or training.get("vocab_size")
    if vocab:
        values["vocab_size"] = vocab
    if training.get("seq_len"):
        values["max_seq_len"] = training["seq_len"]
    return str(model.get("flavor", "")), values


def _inferred(args: Llama3Args, shapes: dict[str, tuple[int, ...]], explicit: set[str]) -> dict[str, int]:
    """The values the stored tensors fix by themselves (and the user did not state)."""
    out: dict[str, int] = {}
    emb = shapes.get("tok_embeddings.weight")
    if emb is not None and len(emb) == 2 and "vocab_size" not in explicit:
        out["vocab_size"] = emb[0]
    layers = {int(m.group(1)) for k in shapes if (m := _LAYER_RE.match(k))}
    if layers and sorted(layers) == list(range(len(layers))):
        out["n_layers"] = len(layers)
    wk = shapes.get("layers.0.attention.wk.weight")
    if wk is not None and wk[0] % args.head_dim == 0 and args.n_heads % max(wk[0] // args.head_dim, 1) == 0:
        out["n_kv_heads"] = wk[0] // args.head_dim
    return {k: v for k, v in out.items() if v > 0 and getattr(args, k) != v}


def describe(source: ModelSource, shapes: dict[str, tuple[int, ...]], where: str) -> tuple[str, Llama3Args]:
    """(flavor, args) of a step folder without ``model_args.json``, from ``source`` and the stored ``shapes``
    (our names, without any ``model.`` prefix)."""
    if not (source.config or source.flavor):
        raise UserError(
            f"{where} has no model_args.json (a TorchTitan or gpt-neuro checkpoint): describe its model with "
            "--config train_configs/X.toml (the run's training config) or --flavor NAME [--vocab_size N]"
        )
    flavor, values = _from_toml(source.config) if source.config else ("", {})
    flavor = source.flavor or flavor
    if not flavor:
        raise UserError(f"--config {source.config} names no model.flavor; add --flavor NAME")
    if source.vocab_size:
        values["vocab_size"] = source.vocab_size
    if source.rope_scaling:
        values["rope_scaling"] = source.rope_scaling
    try:
        args = dataclasses.replace(get_flavor_args(get_train_spec("llama3"), flavor), **values)
        found = _inferred(args, shapes, set(values))
        args = dataclasses.replace(args, **found)
    except (TypeError, ValueError) as e:  # a TOML value of the wrong type (a bad value raises ConfigError)
        raise UserError(f"{where}: the model described by --config/--flavor is not valid ({e})") from None
    if found:
        said = ", ".join(f"{k} {v}" for k, v in found.items())
        logger.info(f"{where}: taken from the stored tensors (flavor {flavor} says otherwise): {said}")
    return flavor, args
