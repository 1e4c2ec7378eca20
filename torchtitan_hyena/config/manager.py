"""ConfigManager: TOML file + ``--section.key value`` overrides -> validated :class:`JobConfig`.

Precedence is CLI > TOML > dataclass defaults. Every problem (unknown section or key, a value of
the wrong type, a value outside its choices, an impossible number) raises :class:`ConfigError`
naming the key, before any work starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from torchtitan_hyena.config.job_config import SECTIONS, JobConfig
from torchtitan_hyena.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _fields(section_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section_cls)}


def _type_name(tp: Any) -> str:
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(tp, "list of str")


def _convert(key: str, raw: Any, tp: Any, from_cli: bool) -> Any:
    """Convert a TOML value or CLI string to the field's type, or raise naming the key."""
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if from_cli and isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ConfigError(f"{key} expects true or false, got {raw!r}")
    if tp is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if from_cli and isinstance(raw, str):
            with contextlib.suppress(ValueError):
                return int(raw)
        raise ConfigError(f"{key} expects an integer, got {raw!r}")
    if tp is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if from_cli and isinstance(raw, str):
            with contextlib.suppress(ValueError):
                return float(raw)
        raise ConfigError(f"{key} expects a number, got {raw!r}")
    if tp is str:
        if isinstance(raw, str):
            return raw
        raise ConfigError(f"{key} expects a string, got {raw!r}")
    # list[str]
    if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        return list(raw)
    if from_cli and isinstance(raw, str):
        return [x.strip() for x in raw.split(",") if x.strip()]
    raise ConfigError(f"{key} expects a list of strings, got {raw!r}")


def _set(config: JobConfig, section: str, key: str, raw: Any, from_cli: bool) -> None:
    where = f"--{section}.{key}" if from_cli else f"[{section}] {key}"
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r} in {where}; sections: {', '.join(SECTIONS)}")
    cls = SECTIONS[section]
    fields = _fields(cls)
    if key not in fields:
        close = [k for k in fields if k.startswith(key[:4])] or list(fields)
        raise ConfigError(f"unknown config key {section}.{key}; did you mean one of: {', '.join(close)}")
    value = _convert(f"{section}.{key}", raw, _field_types(cls)[key], from_cli)
    choices = fields[key].metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{section}.{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    setattr(getattr(config, section), key, value)


def _split_cli(argv: list[str]) -> list[tuple[str, str, str | None]]:
    """Split ``--section.key value`` / ``--section.key=value`` / bare flags into triples."""
    out: list[tuple[str, str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.key value (see --help)")
        name, eq, value = arg[2:].partition("=")
        section, _, key = name.partition(".")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or (nxt.startswith("--") and "." in nxt and not _is_number(nxt)):
                value = None  # bare flag
            else:
                value = nxt
                i += 1
        out.append((section, key, value))
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML file, turning I/O and syntax problems into one-line errors."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a TOML file via --job.config_file")
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing TOML via --job.config_file")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read ({e}); pass a readable TOML file") from None


def validate(config: JobConfig) -> None:
    """Checks on single values and on combinations that do not need the world size."""
    c = config
    positive = {
        "training.steps": c.training.steps,
        "training.local_batch_size": c.training.local_batch_size,
        "training.seq_len": c.training.seq_len,
        "metrics.log_freq": c.metrics.log_freq,
        "training.gc_freq": c.training.gc_freq,
        "checkpoint.interval": c.checkpoint.interval,
        "validation.freq": c.validation.freq,
        "profiling.profile_freq": c.profiling.profile_freq,
        "parallelism.data_parallel_replicate_degree": c.parallelism.data_parallel_replicate_degree,
        "parallelism.tensor_parallel_degree": c.parallelism.tensor_parallel_degree,
        "parallelism.context_parallel_degree": c.parallelism.context_parallel_degree,
        "parallelism.pipeline_parallel_degree": c.parallelism.pipeline_parallel_degree,
        "parallelism.pipeline_parallel_microbatch_size": c.parallelism.pipeline_parallel_microbatch_size,
        "comm.init_timeout_seconds": c.comm.init_timeout_seconds,
        "comm.train_timeout_seconds": c.comm.train_timeout_seconds,
        "comm.warmup_timeout_seconds": c.comm.warmup_timeout_seconds,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    non_negative = {
        "optimizer.lr": c.optimizer.lr,
        "optimizer.weight_decay": c.optimizer.weight_decay,
        "optimizer.eps": c.optimizer.eps,
        "lr_scheduler.warmup_steps": c.lr_scheduler.warmup_steps,
        "training.max_norm": c.training.max_norm,
        "checkpoint.keep_latest_k": c.checkpoint.keep_latest_k,
        "training.seed": c.training.seed,
        "training.max_nonfinite_skips": c.training.max_nonfinite_skips,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    for key, value in {"optimizer.beta1": c.optimizer.beta1, "optimizer.beta2": c.optimizer.beta2}.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    if not 0.0 <= c.training.lowercase_loss_reweighting <= 1.0:
        raise ConfigError(
            f"training.lowercase_loss_reweighting must be in [0, 1], got {c.training.lowercase_loss_reweighting}"
        )
    if not (c.lr_scheduler.decay_ratio == -1.0 or 0.0 <= c.lr_scheduler.decay_ratio <= 1.0):
        raise ConfigError(f"lr_scheduler.decay_ratio must be -1 or in [0, 1], got {c.lr_scheduler.decay_ratio}")
    if not 0.0 <= c.lr_scheduler.min_lr_factor <= 1.0:
        raise ConfigError(f"lr_scheduler.min_lr_factor must be in [0, 1], got {c.lr_scheduler.min_lr_factor}")
    dp_shard = c.parallelism.data_parallel_shard_degree
    if dp_shard == 0 or dp_shard < -1:
        raise ConfigError(f"parallelism.data_parallel_shard_degree must be -1 or >= 1, got {dp_shard}")
    if c.model.vocab_size == 0 or c.model.vocab_size < -1:
        raise ConfigError(f"model.vocab_size must be -1 (flavor default) or positive, got {c.model.vocab_size}")
    gbs = c.training.global_batch_size
    if gbs != -1 and (gbs <= 0 or gbs % c.training.local_batch_size):
        raise ConfigError(
            f"training.global_batch_size ({gbs}) must be -1 or a positive multiple of "
            f"training.local_batch_size ({c.training.local_batch_size})"
        )
    if c.checkpoint.keep_latest_k == 1:
        raise ConfigError("checkpoint.keep_latest_k = 1 could delete the only good checkpoint mid-save; use 0 or >= 2")
    bad = set(c.checkpoint.exclude_from_loading) - {"optimizer", "lr_scheduler", "dataloader", "train_state"}
    if bad:
        raise ConfigError(
            f"checkpoint.exclude_from_loading has unknown entries {sorted(bad)}; "
            "allowed: optimizer, lr_scheduler, dataloader, train_state"
        )
    bad = set(c.compile.components) - {"model", "loss"}
    if bad:
        raise ConfigError(f"compile.components has unknown entries {sorted(bad)}; allowed: model, loss")
    if c.activation_checkpoint.mode == "selective":
        opt = c.activation_checkpoint.selective_ac_option
        if opt != "op" and not (opt.isdigit() and int(opt) > 0):
            raise ConfigError(
                f"activation_checkpoint.selective_ac_option must be 'op' or a positive integer, got {opt!r}"
            )
    if c.float8.emulate and c.compile.enable and c.float8.enable:
        raise ConfigError("float8.emulate works in eager mode only; set compile.enable = false")
    f8 = c.float8
    for key in ("enable_fsdp_float8_all_gather", "precompute_float8_dynamic_scale_for_fsdp"):
        if getattr(f8, key) and not f8.enable:
            raise ConfigError(f"float8.{key} = true needs float8.enable = true; set one of them differently")
    _validate_model(c)
    _validate_lora(c)
    if c.validation.enable and c.validation.steps == 0:
        raise ConfigError("validation.steps must be positive or -1 (whole split), got 0")


def _validate_lora(c: JobConfig) -> None:
    lora = c.lora
    if not lora.enable:
        return
    if lora.rank <= 0 or lora.alpha <= 0:
        raise ConfigError(f"lora.rank and lora.alpha must be positive, got rank {lora.rank}, alpha {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {lora.dropout}")
    if not lora.target_modules:
        raise ConfigError("lora.target_modules is empty; name the linear layers to adapt (e.g. wq,wk,wv,wo)")
    if c.float8.enable:
        raise ConfigError("lora.enable does not combine with float8.enable (adapters wrap plain linears); drop one")


def _validate_model(c: JobConfig) -> None:
    """``[model]`` numbers that no model can use (-1 means "keep the flavor's")."""
    m = c.model
    for key in ("rope_theta", "rope_pi_factor", "embedding_init_std"):
        value = getattr(m, key)
        if value != -1.0 and value <= 0:
            raise ConfigError(f"model.{key} must be positive, or -1 to keep the flavor's, got {value}")
    for key in ("rope_scaling_factor", "rope_low_freq_factor", "rope_original_max_position"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"model.{key} must be positive, got {getattr(m, key)}")
    if m.rope_low_freq_factor >= m.rope_high_freq_factor:
        raise ConfigError(
            f"model.rope_low_freq_factor {m.rope_low_freq_factor} must be below model.rope_high_freq_factor "
            f"{m.rope_high_freq_factor} (Llama 3.1: 1 and 4)"
        )
    for key in ("attention_dropout", "hidden_dropout"):
        if not 0.0 <= getattr(m, key) < 1.0:
            raise ConfigError(f"model.{key} must be in [0, 1), got {getattr(m, key)}")


class ConfigManager:
    """Builds a :class:`JobConfig` from a TOML file and command-line overrides."""

    def parse_args(self, argv: list[str] | None = None) -> JobConfig:
        argv = list(sys.argv[1:] if argv is None else argv)
        if "--help" in argv or "-h" in argv:
            print(self.help_text())
            raise SystemExit(0)
        overrides = _split_cli(argv)
        config = JobConfig()
        # The last --job.config_file wins, like every other repeated option.
        config_file = next((v for s, k, v in reversed(overrides) if (s, k) == ("job", "config_file")), None)
        if config_file:
            for section, values in load_toml(config_file).items():
                if not isinstance(values, dict):
                    raise ConfigError(f"top-level key {section!r} in {config_file} must be a [section]")
                for key, raw in values.items():
                    _set(config, section, key, raw, from_cli=False)
        for section, key, value in overrides:
            if value is None:
                fields = _fields(SECTIONS[section]) if section in SECTIONS else {}
                is_bool = key in fields and _field_types(SECTIONS[section])[key] is bool
                if not is_bool:
                    raise ConfigError(f"--{section}.{key} needs a value")
                value = "true"
            _set(config, section, key, value, from_cli=True)
        validate(config)
        return config

    @staticmethod
    def options() -> list[tuple[str, str, str, str]]:
        """(``section.key``, type, default, help) of every option, in section order."""
        rows = []
        for section, cls in SECTIONS.items():
            types = _field_types(cls)
            for f in dataclasses.fields(cls):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                choices = f.metadata.get("choices")
                kind = _type_name(types[f.name]) + (f" {{{'|'.join(map(str, choices))}}}" if choices else "")
                rows.append((f"{section}.{f.name}", kind, repr(default), f.metadata["help"]))
        return rows

    @staticmethod
    def help_text() -> str:
        lines = [
            "usage: python -m torchtitan_hyena.train --job.config_file FILE.toml [--section.key value ...]",
            "",
            "Every TOML key can be overridden on the command line; booleans take true/false (a bare flag means true),",
            "lists take comma-separated values.",
        ]
        section = None
        for key, kind, default, text in ConfigManager.options():
            if key.split(".")[0] != section:
                section = key.split(".")[0]
                lines.append(f"\n[{section}]")
            lines.append(f"  --{key} ({kind}, default {default}): {text}")
        return "\n".join(lines)

    @staticmethod
    def markdown_reference() -> str:
        """The option table of the README (kept in sync by ``scripts/update_readme.py``)."""
        lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, kind, default, text in ConfigManager.options():
            lines.append(f"| `{key}` | {kind.replace('|', '&#124;')} | `{default}` | {text.replace('|', '&#124;')} |")
        return "\n".join(lines)


def config_table(config: JobConfig) -> str:
    """The resolved config as a table (non-default values are marked with *)."""
    from tabulate import tabulate

    default = JobConfig()
    rows = []
    for section in SECTIONS:
        cur, ref = getattr(config, section), getattr(default, section)
        for f in dataclasses.fields(cur):
            value = getattr(cur, f.name)
            mark = "*" if value != getattr(ref, f.name) else ""
            rows.append([f"{section}.{f.name}", f"{value}{mark}"])
    return tabulate(rows, headers=["key", "value (* = set)"], tablefmt="simple")


def to_dict(config: JobConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
