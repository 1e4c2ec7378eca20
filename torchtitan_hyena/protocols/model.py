"""Model argument protocol shared by every model family."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from torch import nn

from torchtitan_hyena.errors import ConfigError, UserError

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

    def __post_init__(self) -> None:
        self.validate()

    def with_config(self: A, job_config: Any) -> A:
        """A copy with :meth:`config_overrides` applied; it is checked as it is built, like every args object."""
        return dataclasses.replace(self, **self.config_overrides(job_config))

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, float]:
        """(parameter count, training FLOPs per token) for MFU."""
        raise NotImplementedError(f"{type(self).__name__} must define its FLOP count")

    def layer_flops(self, seq_len: int) -> list[float]:
        """Training FLOPs per token of each block, in order (pipeline stages are balanced by them)."""
        raise NotImplementedError(f"{type(self).__name__} must define its per-block FLOP count")

    def validate(self) -> None:
        """Reject impossible values with a :class:`ConfigError` naming the field (families extend it). Runs as the
        args are built: a flavor, ``with_config``, ``from_dict``, a converter's reading of another format."""
        for name in ("vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[A], values: Any, source: str = MODEL_ARGS_FILE) -> A:
        """Args from a ``model_args.json`` dict: every field of the right type, every value possible."""
        if not isinstance(values, dict):
            raise UserError(f"{source}: args must be a JSON object, got {type(values).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise UserError(f"{source}: unknown fields {sorted(unknown)} for {cls.__name__}")
        converted = {}
        for name, value in values.items():
            ok, converted[name] = _as_type(value, hints[name])
            if not ok:
                raise UserError(
                    f"{source}: {name} = {value!r} is not a valid {_type_name(hints[name])}; correct the file"
                )
        try:
            return cls(**converted)
        except ConfigError as e:
            raise UserError(f"{source}: {e}; correct the file") from None


def _as_type(value: Any, tp: Any) -> tuple[bool, Any]:
    """(whether ``value`` fits the annotation ``tp``, the value as that type): JSON's int/float/bool/str/null."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        options = typing.get_args(tp)
        if value is None:
            return type(None) in options, None
        return _as_type(value, next(t for t in options if t is not type(None)))
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    return True, value


def _type_name(tp: Any) -> str:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a valid model-args file ({e}); restore the one of the checkpoint") from None
    if not (
        isinstance(payload, dict)
        and isinstance(payload.get("model_name"), str)
        and isinstance(payload.get("flavor", ""), str)
        and isinstance(payload.get("args"), dict)
    ):
        raise UserError(
            f"{path} is not a valid model-args file (needs a model_name string, a flavor string and an args object); "
            "restore the one of the checkpoint"
        )
    return payload["model_name"], payload.get("flavor", ""), payload["args"]
