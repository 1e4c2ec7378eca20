"""Evo 2 / vortex checkpoint files <-> torchtitan_hyena DCP checkpoints (docs/stripedhyena2.md §8).

A vortex checkpoint is one ``.pt`` file or raw byte shards ``.pt.part0..N``, described by a vortex YAML (or a
built-in hyena flavor). This module reads and writes those files, all or nothing; what the tensors and the YAML
mean (names, shapes, the MR and LI re-parametrizations, the RoPE base) is the hyena family's vortex state-dict
adapter (``models/hyena/state_dict_adapter.py``).
"""

from __future__ import annotations

import io
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from torchtitan_hyena.build import load_model
from torchtitan_hyena.convert.common import load_torch_file, save_dcp_streaming, with_progress
from torchtitan_hyena.dtypes import DTYPES
from torchtitan_hyena.errors import ConfigError, UserError
from torchtitan_hyena.models.hyena.args import HyenaArgs
from torchtitan_hyena.models.hyena.state_dict_adapter import VortexAdapter
from torchtitan_hyena.protocols.model import MODEL_ARGS_FILE, read_model_args, write_model_args
from torchtitan_hyena.protocols.train_spec import get_flavor_args, get_train_spec
from torchtitan_hyena.tools.logging import logger
from torchtitan_hyena.tools.outputs import atomic_output_dir, atomic_output_file, check_writable_file

MODEL_NAME = "hyena"


def load_config(config: str) -> tuple[HyenaArgs, str]:
    """(args, flavor label) from a vortex YAML path or a built-in hyena flavor name."""
    spec = get_train_spec(MODEL_NAME)
    hyena_flavors = spec.model_args
    if config in hyena_flavors:
        return get_flavor_args(spec, config), config
    path = Path(config)
    if not path.is_file():
        raise ConfigError(
            f"--config {config} is neither a vortex YAML file nor a hyena flavor ({', '.join(hyena_flavors)})"
        )
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {config} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--config {config} does not hold a vortex config mapping")
    try:
        return VortexAdapter.args_from_config(cfg, str(path)), f"vortex:{path.name}"
    except (TypeError, ValueError) as e:  # e.g. hidden_size: "big"
        raise ConfigError(f"--config {config} has a value of the wrong type ({e}); fix the YAML") from None


# ---------------------------------------------------------------------------------------- files
def checkpoint_files(path: str | Path) -> list[Path]:
    """The file(s) of a vortex checkpoint: one ``.pt``, or its byte shards ``.pt.part0..N`` in order."""
    p = Path(path)
    if p.is_dir():
        candidates = sorted({q.name.split(".part")[0] for q in p.iterdir() if re.search(r"\.pt(\.part\d+)?$", q.name)})
        if len(candidates) != 1:
            found = ", ".join(candidates) or "none"
            raise UserError(f"--input folder {p} must hold exactly one .pt checkpoint or shard set (found: {found})")
        return checkpoint_files(p / candidates[0])
    m = re.match(r"^(.*\.pt)\.part\d+$", p.name)
    stem = p.with_name(m.group(1)) if m else p
    if not stem.name.endswith(".pt"):
        raise UserError(f"--input {path} is not a .pt checkpoint, .pt.part0..N shards or a folder holding them")
    if stem.is_file():
        return [stem]
    shards = {int(q.name.rsplit(".part", 1)[1]): q for q in stem.parent.glob(stem.name + ".part*") if q.is_file()}
    shards = {k: v for k, v in shards.items() if re.match(rf"^{re.escape(stem.name)}\.part\d+$", v.name)}
    if not shards:
        raise UserError(f"--input {path} does not exist (neither {stem.name} nor {stem.name}.part0..N)")
    gaps = [i for i in range(max(shards) + 1) if i not in shards]
    if gaps:
        raise UserError(f"shard {stem.name}.part{gaps[0]} is missing (have parts {sorted(shards)})")
    return [shards[i] for i in range(len(shards))]


@contextmanager
def open_state_dict(path: str | Path, scratch: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """Memory-mapped, ``weights_only`` load of a vortex checkpoint; byte shards are first joined into one
    temporary file in the folder ``scratch`` (removed on exit), since only a single file can be mapped."""
    files = checkpoint_files(path)
    source = str(files[0]) if len(files) == 1 else f"{files[0].name}..{files[-1].name}"
    merged = None
    try:
        if len(files) > 1:
            merged = scratch / "merged-shards.pt"
            with merged.open("wb") as out:
                for f in files:
                    with f.open("rb") as src:
                        shutil.copyfileobj(src, out, 64 << 20)
        state = load_torch_file(merged or files[0], source, safe_globals=[io.BytesIO])  # TE's _extra_state blobs
        if isinstance(state, dict) and "module" in state and not any(k.startswith("blocks.") for k in state):
            raise UserError(f"{source} is a savanna checkpoint ({{'module': ...}}); export it to vortex format first")
        if not isinstance(state, dict):
            raise UserError(f"{source} does not hold a state dict (got {type(state).__name__})")
        yield state, source
    finally:
        if merged is not None:
            merged.unlink(missing_ok=True)


def convert_evo2_to_dcp(input_path: str | Path, config: str, output_dir: str | Path, overwrite: bool = False) -> Path:
    """vortex checkpoint -> DCP folder with ``model_args.json``, one tensor in memory at a time; nothing is
    left behind on failure."""
    out = Path(output_dir)
    args, flavor = load_config(config)
    t0 = time.perf_counter()
    with atomic_output_dir(out, overwrite) as tmp, open_state_dict(input_path, tmp) as (state, source):
        tensors = VortexAdapter(args).from_external(state, source)
        logger.info(f"{source}: {args.n_layers} layers {args.layout}, dim {args.dim}; writing {len(tensors)} tensors")
        save_dcp_streaming(with_progress(tensors), tmp)
        write_model_args(tmp, MODEL_NAME, flavor, args)
    logger.info(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return out


def convert_dcp_to_evo2(
    input_dir: str | Path, output: str | Path, dtype: str = "bfloat16", yaml_out: str = "", overwrite: bool = False
) -> Path:
    """DCP folder (training step or converter output) -> vortex ``.pt`` (+ optional vortex YAML)."""
    import yaml

    out = Path(output)
    if out.suffix != ".pt":
        raise UserError(f"--output {output} must end in .pt (vortex loads a .pt state dict)")
    for path, what in [(out, "--output")] + ([(Path(yaml_out), "--yaml")] if yaml_out else []):
        check_writable_file(path, what, overwrite)
    name, _flavor, values = read_model_args(input_dir)
    if name != MODEL_NAME:
        raise UserError(
            f"{input_dir} holds a {name!r} model; dcp_to_evo2 exports hyena checkpoints only (llama3: dcp_to_llama.py)"
        )
    adapter = VortexAdapter(HyenaArgs.from_dict(values, str(Path(input_dir) / MODEL_ARGS_FILE)))
    text = yaml.safe_dump(adapter.config(), sort_keys=False)
    model = load_model(input_dir, torch.device("cpu"))
    state = adapter.to_external(model.state_dict(), DTYPES[dtype])
    with ExitStack() as stack:  # both files appear, or neither
        torch.save(state, stack.enter_context(atomic_output_file(out, overwrite)))
        if yaml_out:
            stack.enter_context(atomic_output_file(yaml_out, overwrite)).write_text(text)
    logger.info(f"wrote {out} ({len(state)} tensors, {dtype}; LI filters and inv_freq fp32)")
    return out
