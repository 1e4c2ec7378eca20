"""Llama checkpoint files to and from this project's DCP layout.

The files are read and written here (Meta's ``params.json`` + ``consolidated.NN.pth`` shards, HF's
``config.json`` + safetensors); names, q/k row order, shard layout and args come from the Llama 3 family's
state-dict adapters (``models/llama3/state_dict_adapter.py``).

Readers return :class:`LazyTensor`s under our names, and the DCP writer materializes them one at
a time, so converting a 70B checkpoint needs memory for a few tensors, not for the model.
Seeding another model family from Llama (e.g. a StripedHyena 2 hybrid) goes through that family's
``llama3`` adapter, a renaming of these lazy tensors plus its args, written by the same ``save_dcp_streaming``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torchtitan_hyena.build import model_shapes
from torchtitan_hyena.components.checkpoint import NON_MODEL_STATE
from torchtitan_hyena.components.dcp_reader import load_dcp, read_dcp_metadata, short_reason
from torchtitan_hyena.components.lora import refuse_unmerged
from torchtitan_hyena.convert import foreign
from torchtitan_hyena.convert.common import load_torch_file, save_dcp_streaming, with_progress
from torchtitan_hyena.convert.hub import write_model_card
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.models.llama3.args import Llama3Args
from torchtitan_hyena.models.llama3.state_dict_adapter import EMBEDDING_KEYS, HFAdapter, MetaAdapter, flavor_of
from torchtitan_hyena.protocols.model import MODEL_ARGS_FILE, read_model_args, write_model_args
from torchtitan_hyena.protocols.state_dict_adapter import LazyTensor
from torchtitan_hyena.protocols.train_spec import get_train_spec
from torchtitan_hyena.tools.logging import logger
from torchtitan_hyena.tools.outputs import atomic_output_dir

MODEL_NAME = "llama3"

_META_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def expected_shapes(args: Llama3Args) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Llama model these args describe, with its shape (the model is the truth)."""
    return model_shapes(MODEL_NAME, args)


# ---------------------------------------------------------------------------------------------- readers
@dataclass
class LlamaCheckpoint:
    """A Llama checkpoint on disk: its args and lazily loaded tensors under our names."""

    args: Llama3Args
    tensors: dict[str, LazyTensor]
    description: str


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e})") from None


def _check_tensor_set(shapes: dict[str, tuple[int, ...]], args: Llama3Args, where: str, fix: str) -> None:
    """Same names and shapes as the model: catches truncated downloads, wrong configs and foreign models."""
    expected = expected_shapes(args)
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise UserError(f"{where} lacks {len(missing)} tensors of this model (first: {missing[0]}); {fix}")
    extra = [k for k in shapes if k not in expected]
    if extra:
        raise UserError(f"{where} has {len(extra)} tensors this model does not (first: {extra[0]}); {fix}")
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise UserError(f"{where}: {key} has shape {list(shapes[key])} but the model needs {list(shape)}; {fix}")


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    sd = load_torch_file(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} does not hold a state dict of tensors; is it a Meta Llama checkpoint shard?")
    return sd


def _load_meta_tensor(
    shards: list[Path], key: str, dim: int | None, spec: tuple[tuple[int, ...], torch.dtype]
) -> torch.Tensor:
    """One merged tensor. Each shard is memory-mapped afresh and released once copied: pages of finished
    tensors leave the process with their map, where one long-lived map per shard would grow to the file."""
    if dim is None:
        return _load_pth(shards[0])[key]  # replicated (or a single shard): a view of the map
    out = torch.empty(spec[0], dtype=spec[1])
    offset = 0
    for path in shards:
        piece = _load_pth(path)[key]
        out.narrow(dim, offset, piece.shape[dim]).copy_(piece)
        offset += piece.shape[dim]
        del piece  # unmap before the next shard's pages are read
    return out


def read_meta_checkpoint(folder: Path) -> LlamaCheckpoint:
    """``params.json`` + ``consolidated.NN.pth`` (any number of model-parallel shards)."""
    params_path = folder / "params.json"
    if not params_path.is_file():
        raise UserError(f"{folder} has consolidated.*.pth but no params.json; copy in the checkpoint's params.json")
    params = _read_json(params_path)
    numbered = {int(m.group(1)): p for p in folder.iterdir() if (m := _META_SHARD_RE.match(p.name))}
    if not numbered:
        raise UserError(f"{folder} has params.json but no consolidated.NN.pth weights")
    if sorted(numbered) != list(range(len(numbered))):
        gap = min(set(range(max(numbered) + 1)) - set(numbered))
        raise UserError(f"{folder} lacks shard consolidated.{gap:02d}.pth; a Meta checkpoint needs all its shards")
    shards = [numbered[i] for i in range(len(numbered))]
    headers = []
    for p in shards:
        sd = _load_pth(p)
        headers.append({k: (tuple(t.shape), t.dtype) for k, t in sd.items() if k != "rope.freqs"})
        del sd
    first = headers[0]
    for p, header in zip(shards[1:], headers[1:]):
        for key in set(first) ^ set(header):
            raise UserError(f"inconsistent shards: {key} is in only one of {shards[0].name} and {p.name}")
        for key, (shape, _) in header.items():
            if shape != first[key][0]:
                raise UserError(
                    f"inconsistent shards: {key} is {list(shape)} in {p.name} but {list(first[key][0])} in "
                    f"{shards[0].name}; all shards must come from one checkpoint"
                )
    # Llama 2's params.json leaves the vocabulary to the weights (vocab_size -1); its shards split embedding columns.
    vocab = first["tok_embeddings.weight"][0][0] if "tok_embeddings.weight" in first else None
    args = MetaAdapter.args_from_config(params, str(params_path), weights_vocab_size=vocab)
    adapter = MetaAdapter(args)
    dims = {k: adapter.shard_dim(k, shape) if len(shards) > 1 else None for k, (shape, _) in first.items()}
    merged = {}
    for key, (shape, _) in first.items():
        d = dims[key]
        merged[key] = shape if d is None else (*shape[:d], shape[d] * len(shards), *shape[d + 1 :])
    _check_tensor_set(merged, args, str(folder), "check params.json and that all shards belong to this checkpoint")
    tensors = {}
    for k in merged:
        spec = (merged[k], first[k][1])
        tensors[k] = LazyTensor(*spec, lambda k=k, spec=spec: _load_meta_tensor(shards, k, dims[k], spec))
    return LlamaCheckpoint(
        args, adapter.from_external(tensors, str(folder)), f"Meta checkpoint, {len(shards)} model-parallel shard(s)"
    )


def _hf_weight_files(folder: Path) -> dict[str, Path]:
    """{HF tensor name: safetensors file}, from the shard index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        files = {name: folder / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise UserError(f"{index.name} names {f.name}, which is missing from {folder}")
        return files
    paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        found = "only PyTorch .bin files; re-save with safe_serialization=True" if any(folder.glob("*.bin")) else "none"
        raise UserError(f"{folder} has config.json but no .safetensors weights ({found})")
    files = {}
    for p in paths:
        with _safetensors(p) as f:
            files.update(dict.fromkeys(f.keys(), p))
    return files


@contextlib.contextmanager
def _safetensors(path: Path) -> Iterator[Any]:
    """``safe_open(path)``, with a one-line error for a file that is not (or no longer) valid safetensors."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except UserError:
        raise
    except Exception as e:  # SafetensorError (bad header, truncated data), OSError
        raise UserError(
            f"cannot read {path}: not a complete safetensors file, truncated or damaged ({short_reason(e)}); "
            "download it again"
        ) from None


def _load_hf_tensor(path: Path, name: str) -> torch.Tensor:
    with _safetensors(path) as f:  # opened per tensor, for the same reason as _load_meta_tensor
        return f.get_tensor(name)


def read_hf_checkpoint(folder: Path) -> LlamaCheckpoint:
    """``config.json`` + ``model.safetensors`` or a sharded ``model.safetensors.index.json``."""
    config = _read_json(folder / "config.json")
    args = HFAdapter.args_from_config(config, str(folder / "config.json"))
    files = _hf_weight_files(folder)
    stored = {}
    for name, path in files.items():
        with _safetensors(path) as f:
            info = f.get_slice(name)
            shape, st_dtype = tuple(info.get_shape()), info.get_dtype()
        if st_dtype not in _ST_DTYPES:
            raise UserError(f"{path}: {name} is stored as {st_dtype}; only floating-point weights convert")
        stored[name] = LazyTensor(shape, _ST_DTYPES[st_dtype], lambda p=path, n=name: _load_hf_tensor(p, n))
    tensors = HFAdapter(args).from_external(stored, str(folder))
    if "output.weight" not in tensors and config.get("tie_word_embeddings") and "tok_embeddings.weight" in tensors:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]  # our model unties: both start equal
    _check_tensor_set({k: t.shape for k, t in tensors.items()}, args, str(folder), "check config.json")
    return LlamaCheckpoint(args, tensors, f"HF checkpoint, {len(set(files.values()))} safetensors file(s)")


def read_llama_checkpoint(folder: str | Path) -> LlamaCheckpoint:
    """Detect the format of ``folder`` (Meta or HF) and read its header, not its weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--input_dir {folder} is not a folder")
    if any(_META_SHARD_RE.match(p.name) for p in folder.iterdir()):
        return read_meta_checkpoint(folder)
    if (folder / "config.json").is_file():
        return read_hf_checkpoint(folder)
    if (folder / "params.json").is_file():
        return read_meta_checkpoint(folder)
    if any(folder.glob("*.safetensors")):
        raise UserError(f"{folder} has .safetensors weights but no config.json; copy in the model's config.json")
    in_original = (folder / "original" / "params.json").exists()
    hint = "; an HF download keeps the Meta files in original/" if in_original else ""
    raise UserError(f"{folder} holds neither a Meta (params.json) nor an HF (config.json) Llama checkpoint{hint}")


# ---------------------------------------------------------------------------------------------- Llama -> DCP
def _cast(tensor: LazyTensor, dtype: torch.dtype) -> LazyTensor:
    return LazyTensor(tensor.shape, dtype, lambda: tensor.load().to(dtype))


def llama_to_dcp(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    keep_embeddings: bool = False,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    target: str = MODEL_NAME,
    layout: str = "",
) -> LlamaCheckpoint:
    """Convert a Meta or HF Llama checkpoint into a DCP folder with ``model_args.json``.

    Embeddings are dropped unless ``keep_embeddings``: the Neural Pile vocabulary (256) differs from
    Llama's. ``dtype`` None keeps the stored precision. The output appears only when complete.
    ``target="hyena"`` writes a StripedHyena 2 hybrid of ``layout`` instead (see ``models/hyena/from_llama.py``).
    """
    if target not in (MODEL_NAME, "hyena"):
        raise UserError(f"--target {target!r} is not supported; use llama3 or hyena")
    if layout and target != "hyena":
        raise UserError("--layout describes a hybrid; add --target hyena or drop --layout")
    ckpt = read_llama_checkpoint(input_dir)
    seed = None
    if target != MODEL_NAME:  # the target family's adapter from Llama 3 (the hybrid's: models/hyena/from_llama.py)
        seed = get_train_spec(target).state_dict_adapters[MODEL_NAME].from_llama(ckpt.args, layout, keep_embeddings)
        flavor, args, tensors = seed.flavor, seed.args, seed.from_external(ckpt.tensors, str(input_dir))
    else:
        tensors = {k: t for k, t in ckpt.tensors.items() if keep_embeddings or k not in EMBEDDING_KEYS}
        flavor, args = flavor_of(ckpt.args), ckpt.args
    if dtype is not None:
        tensors = {k: _cast(t, dtype) for k, t in tensors.items()}
    size_gb = sum(math.prod(t.shape) * t.dtype.itemsize for t in tensors.values()) / 1e9
    logger.info(f"{input_dir}: {ckpt.description}; {target} flavor {flavor}, {len(tensors)} tensors ({size_gb:.2f} GB)")
    t0 = time.perf_counter()
    with atomic_output_dir(output_dir, overwrite) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        save_dcp_streaming(with_progress(tensors), tmp)
        write_model_args(tmp, target, flavor, args)
    dropped = "" if keep_embeddings else " (tok_embeddings/output dropped; --keep_embeddings keeps them)"
    logger.info(f"wrote {output_dir} in {time.perf_counter() - t0:.1f}s{dropped}")
    if seed is not None:
        seed.log_training_hint(output_dir)
    return ckpt


# ---------------------------------------------------------------------------------------------- DCP -> Llama
@dataclass(frozen=True)
class _Stored:
    key: str  # name in the checkpoint (plain or "model."-prefixed)
    shape: tuple[int, ...]
    dtype: torch.dtype


def _stored_model_tensors(step_dir: Path) -> dict[str, _Stored]:
    """Where each model tensor sits in the DCP, by our name, from its metadata: optimizer and loader state are never
    read. Keys are plain FQNs or ``model.``-prefixed (DCPs written as ``{"model": sd}``)."""
    meta = read_dcp_metadata(step_dir).state_dict_metadata
    found = {}
    for ckpt_key, info in meta.items():
        if isinstance(info, TensorStorageMetadata) and not ckpt_key.startswith(NON_MODEL_STATE):
            found[ckpt_key.removeprefix("model.")] = _Stored(ckpt_key, tuple(info.size), info.properties.dtype)
    return found


def _check_model_tensors(step_dir: Path, found: dict[str, _Stored], args: Llama3Args, fix: str) -> None:
    """Every tensor of the model described by ``args`` is stored, with its shape."""
    no_embeddings = sorted(set(EMBEDDING_KEYS) - set(found))
    if no_embeddings:
        raise UserError(
            f"{step_dir} has no {' / '.join(no_embeddings)}: it was converted without "
            "--keep_embeddings, and an exported Llama needs them; export a trained checkpoint instead"
        )
    _check_tensor_set({k: s.shape for k, s in found.items()}, args, str(step_dir), fix)


def _load_tensors(step_dir: Path, stored: dict[str, _Stored], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read only the listed tensors (DCP copies into buffers of the requested dtype)."""
    buffers = {s.key: torch.empty(s.shape, dtype=dtype) for s in stored.values()}
    load_dcp(buffers, step_dir)
    return {k: buffers[s.key] for k, s in stored.items()}


def _shard_groups(stored: dict[str, _Stored], dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for key, s in stored.items():
        nbytes = math.prod(s.shape) * dtype.itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups


def _write_hf(
    step_dir: Path, stored: dict[str, _Stored], args: Llama3Args, dtype: torch.dtype, out: Path, max_shard_bytes: int
) -> None:
    adapter = HFAdapter(args)
    (out / "config.json").write_text(json.dumps(adapter.config(dtype), indent=2) + "\n")
    groups = _shard_groups(stored, dtype, max_shard_bytes)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups, start=1):
        name = "model.safetensors" if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        hf = adapter.to_external(_load_tensors(step_dir, {k: stored[k] for k in keys}, dtype), dtype)
        save_file(hf, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(hf, name))
        total += sum(t.numel() * t.element_size() for t in hf.values())
        del hf
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def dcp_to_llama(
    step_dir: str | Path,
    output_dir: str | Path,
    *,
    fmt: str = "hf",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    repo_name: str = "",
    source: foreign.ModelSource | None = None,
) -> Path:
    """Export the model weights of a DCP step folder (training checkpoint or converter output).

    ``fmt="pth"`` writes Meta's layout (``consolidated.00.pth`` + ``params.json``; the whole model
    is held in memory); ``fmt="hf"`` a transformers ``LlamaForCausalLM`` folder, loaded shard by shard.
    Model args come from ``model_args.json``, or, in folders without one (TorchTitan, gpt-neuro), from ``source``
    (see ``convert/foreign.py``); ``dtype`` None keeps the stored precision.
    """
    step_dir = Path(step_dir)
    source = source or foreign.ModelSource()
    if fmt not in ("hf", "pth"):
        raise UserError(f"--format {fmt!r} is not supported; use hf or pth")
    if (step_dir / MODEL_ARGS_FILE).is_file():
        if source.given():
            raise UserError(
                f"{step_dir} records its model in {MODEL_ARGS_FILE}; --config/--flavor/--vocab_size/--rope_scaling "
                "describe folders without one (TorchTitan, gpt-neuro): drop them"
            )
        name, flavor, values = read_model_args(step_dir)
        refuse_unmerged(step_dir)
        if name != MODEL_NAME:
            raise UserError(
                f"{step_dir} holds a {name!r} model; dcp_to_llama.py exports llama3 checkpoints only "
                "(hyena: dcp_to_evo2.py)"
            )
        args = Llama3Args.from_dict(values, str(step_dir / MODEL_ARGS_FILE))
        stored, fix = _stored_model_tensors(step_dir), "is model_args.json from the same run?"
    else:
        stored = _stored_model_tensors(step_dir)
        flavor, args = foreign.describe(source, {k: s.shape for k, s in stored.items()}, str(step_dir))
        fix = "check --config / --flavor / --vocab_size: they must describe the run that wrote it"
    _check_model_tensors(step_dir, stored, args, fix)
    if dtype is None:
        dtypes = {s.dtype for s in stored.values()}
        if len(dtypes) > 1:
            raise UserError(f"{step_dir} mixes dtypes {sorted(map(str, dtypes))}; choose one with --dtype")
        dtype = dtypes.pop()
    t0 = time.perf_counter()
    with atomic_output_dir(output_dir, overwrite) as tmp:
        if fmt == "pth":
            meta = MetaAdapter(args)
            torch.save(meta.to_external(_load_tensors(step_dir, stored, dtype), dtype), tmp / "consolidated.00.pth")
            (tmp / "params.json").write_text(json.dumps(meta.config(), indent=2) + "\n")
        else:
            _write_hf(step_dir, stored, args, dtype, tmp, max_shard_bytes)
        write_model_card(tmp, args, flavor, fmt, dtype, step_dir, repo_name)
    logger.info(f"exported {step_dir} ({flavor}, {fmt}, {dtype}) to {output_dir} in {time.perf_counter() - t0:.1f}s")
    return Path(output_dir)
