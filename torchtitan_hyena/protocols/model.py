"""Model argument protocol shared by every model family."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from torchtitan_hyena.errors import UserError

MODEL_ARGS_FILE = "model_args.json"


@dataclass
class BaseModelArgs:
    """Hyper-parameters of one model; flavors are instances of a subclass."""

    vocab_size: int = 256
    max_seq_len: int = 2048

    def update_from_config(self, job_config: Any) -> None:
        """Copy the run-time values (vocab, sequence length, kernels) from the job config."""
        if job_config.model.vocab_size > 0:
            self.vocab_size = job_config.model.vocab_size
        self.max_seq_len = job_config.training.seq_len

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, float]:
        """(parameter count, training FLOPs per token) for MFU."""
        raise NotImplementedError(f"{type(self).__name__} must define its FLOP count")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BaseModelArgs:
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
