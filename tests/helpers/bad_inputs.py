"""The inputs of tests/integration/test_bad_inputs.py: small real checkpoints of both families and damaged or
hostile copies.

Everything is written without running a CLI (the model is built, initialized and saved with DCP here), so the
whole set takes seconds. ``canary`` files are what a hostile checkpoint would create if any of its code ran.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from tests.conftest import REPO, TINY
from torchtitan_hyena.build import meta_model, model_args_from_config
from torchtitan_hyena.components.dcp_reader import read_dcp_metadata
from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.convert.llama import expected_shapes
from torchtitan_hyena.models.llama3.state_dict_adapter import HFAdapter, MetaAdapter, to_hf_name
from torchtitan_hyena.protocols.model import write_model_args
from torchtitan_hyena.protocols.train_spec import get_train_spec

HYENA = ["--job.config_file", str(REPO / "train_configs" / "debug_hyena.toml"), "--training.seq_len", "128"]


class Canary:
    """Unpickling this creates ``path``: the proof that a checkpoint's code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def save_model_dcp(folder: Path, config_args: list[str], tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A model-only DCP of the model the config builds (or of ``tensors``), with its ``model_args.json``."""
    c = ConfigManager().parse_args(config_args)
    spec = get_train_spec(c.model.name)
    args = model_args_from_config(spec, c)
    if tensors is None:
        model = meta_model(spec, args)
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.init_weights(buffer_device=torch.device("cpu"))
        tensors = model.state_dict()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(tensors, checkpoint_id=str(folder), no_dist=True)
    write_model_args(folder, c.model.name, c.model.flavor, args)
    return folder


def damaged_copy(src: Path, dst: Path, how: str) -> Path:
    """``src`` copied to ``dst`` with its data file truncated, removed or overwritten with garbage (same size)."""
    shutil.copytree(src, dst)
    (data,) = dst.glob("*.distcp")
    if how == "truncated":
        with data.open("r+b") as f:
            f.truncate(data.stat().st_size // 2)
    elif how == "missing":
        data.unlink()
    else:  # garbage: every byte after the first kilobyte flipped, the length unchanged
        raw = bytearray(data.read_bytes())
        raw[1024:] = bytes(b ^ 0x5A for b in raw[1024:])
        data.write_bytes(bytes(raw))
    return dst


def hostile_metadata(folder: Path, family_src: Path, canary: Path) -> Path:
    """A step folder whose ``.metadata`` would run ``touch canary`` if unpickled (model_args from ``family_src``)."""
    folder.mkdir()
    with (folder / ".metadata").open("wb") as f:
        pickle.dump(Canary(canary), f)
    shutil.copy(family_src / "model_args.json", folder)
    return folder


def escaping_metadata(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose metadata points its first entry at a file outside the folder."""
    shutil.copytree(src, dst)
    meta = read_dcp_metadata(src)
    info = next(iter(meta.storage_data.values()))
    info.relative_path = "../../../../etc/passwd"
    (dst / ".metadata").write_bytes(pickle.dumps(meta))
    return dst


def edit_model_args(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    payload = json.loads((dst / "model_args.json").read_text())
    payload["args"].update(changes)
    (dst / "model_args.json").write_text(json.dumps(payload))
    return dst


def llama_sources(root: Path) -> dict[str, Path]:
    """Tiny HF and Meta Llama folders (the debugmodel's shape), and damaged variants of their weight files."""
    args = model_args_from_config(get_train_spec("llama3"), ConfigManager().parse_args(TINY))
    torch.manual_seed(0)
    weights = {k: torch.randn(shape) * 0.02 for k, shape in expected_shapes(args).items()}
    out = {}
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(HFAdapter(args).config(torch.float32)))
    save_file({to_hf_name(k): v for k, v in weights.items()}, hf / "model.safetensors")
    out["hf"] = hf
    for how in ("truncated", "garbage"):
        bad = root / f"hf_{how}"
        shutil.copytree(hf, bad)
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x07" * 4096)
        out[f"hf_{how}"] = bad
    bad = root / "hf_wrong_type"
    shutil.copytree(hf, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "six"}))
    out["hf_wrong_type"] = bad
    meta = root / "meta"
    meta.mkdir()
    torch.save(weights, meta / "consolidated.00.pth")
    (meta / "params.json").write_text(json.dumps(MetaAdapter(args).config()))
    out["meta"] = meta
    bad = root / "meta_truncated"
    shutil.copytree(meta, bad)
    data = (bad / "consolidated.00.pth").read_bytes()
    (bad / "consolidated.00.pth").write_bytes(data[: len(data) // 2])
    out["meta_truncated"] = bad
    bad = root / "meta_hostile"
    shutil.copytree(meta, bad)
    torch.save({"tok_embeddings.weight": Canary(root / "CANARY")}, bad / "consolidated.00.pth")
    out["meta_hostile"] = bad
    bad = root / "meta_zero_eps"
    shutil.copytree(meta, bad)
    (bad / "params.json").write_text(json.dumps({**MetaAdapter(args).config(), "norm_eps": 0.0}))
    out["meta_zero_eps"] = bad
    return out
