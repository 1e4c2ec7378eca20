"""Model argument protocol shared by every model family."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from torch import nn

from torchtitan_hyena.errors import UserError

MODEL_ARGS_FILE = "model_args.json"
A = TypeVar("A", bound="BaseModelArgs")


@dataclass
class BaseModelArgs:
    """Hyper-parameters of one model; flavors are instances of a subclass.

    ``config_keys`` names the ``model.*`` keys of the job config the family reads (``name`` and ``flavor`` are
    everyone's): the set-up rejects any other key set to a non-default value, so a key is never silently
    ignored. ``config_overrides`` says what those keys (and ``training.seq_len``) change.
    """

    vocab_size: int = 256
    max_seq_len: int = 2048

    config_keys: ClassVar[frozenset[str]] = frozenset({"vocab_size"})

    def config_overrides(self, job_config: Any) -> dict[str, Any]:
        """Field values the job config sets: the run-time values (vocab, sequence length, kernels, ...)."""
        out: dict[str, Any] = {"max_seq_len": job_config.training.seq_len}
        if job_config.model.vocab_size > 0:
            out["vocab_size"] = job_config.model.vocab_size
        return out

    def with_config(self: A, job_config: Any) -> A:
        """A copy with :meth:`config_overrides` applied; it is checked as it is built, like every args object."""
        return dataclasses.replace(self, **self.config_overrides(job_config))

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, float]:
        """(parameter count, training FLOPs per token) for MFU."""
        raise NotImplementedError(f"{type(self).__name__} must define its FLOP count")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[A], values: dict[str, Any]) -> A:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise UserError(f"model args have unknown fields {sorted(unknown)} for {cls.__name__}")
        return cls(**values)


def write_model_args(folder: str | Path, model_name: str, flavor: str, args: BaseModelArgs) -> None:
    """Write ``model_args.json`` so tools can rebuild the model without the TOML."""
    payload = {"model_name": model_name, "flavor": flavor, "args": args.to_dict()}
    (Path(folder) / MODEL_ARGS_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_model_args(folder: str | Path) -> tuple[str, str, dict[str, Any]]:
    """(model_name, flavor, args dict) from a checkpoint folder's ``model_args.json``."""
    if not Path(folder).is_dir():
        raise UserError(f"checkpoint folder {folder} does not exist")
    path = Path(folder) / MODEL_ARGS_FILE
    if not path.is_file():
        raise UserError(
            f"{path} not found: the checkpoint does not record its model; "
            "use a step folder written by this project or a converter output"
        )
    try:
        payload = json.loads(path.read_text())
        return payload["model_name"], payload.get("flavor", ""), payload["args"]
    except (json.JSONDecodeError, KeyError) as e:
        raise UserError(f"{path} is not a valid model-args file ({e})") from None
