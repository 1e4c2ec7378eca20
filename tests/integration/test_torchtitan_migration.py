"""Moving from TorchTitan / gpt-neuro: their step folders (no model_args.json, their loader and schedule state)
export with --config/--flavor and continue training here with the documented flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.conftest import TINY, run_cli
from tests.helpers.llama_ckpt import hf_logprobs
from tests.helpers.torchtitan_ckpt import save_torchtitan_step
from torchtitan_hyena.build import load_model, model_shapes
from torchtitan_hyena.convert.cli import dcp_to_llama_main
from torchtitan_hyena.convert.foreign import ModelSource, describe
from torchtitan_hyena.convert.llama import dcp_to_llama
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.models.llama3.args import Llama3Args
from torchtitan_hyena.score import score_sequences

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")
STATE = ("optimizer", "lr_scheduler", "dataloader", "train_state")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Our 2-step run of the debug model and the same state in TorchTitan's layout."""
    root = tmp_path_factory.mktemp("titan")
    ours = root / "ours"
    proc = run_cli([*TINY, "--training.steps", "2", "--checkpoint.enable", "true", "--checkpoint.interval", "2",
                    "--job.dump_folder", str(ours)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = ours / "checkpoint" / "step-2"
    dcp_to_torch_save(str(step), str(root / "all.pt"))
    full = torch.load(root / "all.pt", weights_only=True)
    model = {k: v for k, v in full.items() if k not in STATE}
    titan = save_torchtitan_step(root / "titan" / "step-2", model, full["optimizer"], step=2, lr=8e-4)
    return {"ours": ours, "step": step, "titan": titan, "root": root}


def test_export_without_model_args(runs, tmp_path):
    titan = runs["titan"]
    with pytest.raises(UserError, match="has no model_args.json .* --config train_configs/X.toml"):
        dcp_to_llama(titan, tmp_path / "o1")
    # --flavor: transformers reproduces our scores.
    dcp_to_llama_main(["--input_dir", str(titan), "--output_dir", str(tmp_path / "hf"), "--flavor", "debugmodel"])
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    torch.manual_seed(2)
    sequences = [torch.randint(0, 256, (n,)).tolist() for n in (40, 9)]
    ours = score_sequences(load_model(runs["step"], CPU), sequences, CPU)
    diff = max((torch.tensor(o) - r).abs().max().item() for o, r in zip(ours, hf_logprobs(hf, sequences)))
    assert diff <= 1e-5
    # A gpt-neuro TOML (vocabulary under [training]): the same .pth as exporting our own folder.
    toml = tmp_path / "neuro.toml"
    toml.write_text('[model]\nname = "llama3"\nflavor = "debugmodel"\nnorm_type = "rmsnorm"\n\n'
                    '[training]\nbatch_size = 4\nseq_len = 128\nvocab_size = 256\n')  # fmt: skip
    dcp_to_llama_main(["--input_dir", str(titan), "--output_dir", str(tmp_path / "pth"), "--format", "pth",
                       "--config", str(toml)])  # fmt: skip
    dcp_to_llama(runs["step"], tmp_path / "pth-ours", fmt="pth")
    a, b = (torch.load(tmp_path / n / "consolidated.00.pth", weights_only=True) for n in ("pth", "pth-ours"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match=r"tok_embeddings.weight has shape \[256, 256\] but the model needs \[512, 256"):
        dcp_to_llama(titan, tmp_path / "o2", source=ModelSource(flavor="debugmodel", vocab_size=512))
    with pytest.raises(UserError, match="records its model in model_args.json; .* drop them"):
        dcp_to_llama(runs["step"], tmp_path / "o3", source=ModelSource(flavor="debugmodel"))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_describe_takes_what_the_tensors_fix():
    stored = model_shapes("llama3", Llama3Args(dim=256, n_layers=3, n_heads=16, n_kv_heads=8, vocab_size=300))
    flavor, args = describe(ModelSource(flavor="debugmodel"), stored, "ckpt")
    assert flavor == "debugmodel" and (args.n_layers, args.n_kv_heads, args.vocab_size) == (3, 8, 300)
    _, args = describe(ModelSource(flavor="debugmodel", vocab_size=512, rope_scaling="llama3"), stored, "ckpt")
    assert args.vocab_size == 512 and args.rope_scaling == "llama3"  # stated values are checked, not replaced


def test_resume_a_torchtitan_run(runs, tmp_path):
    """Model, optimizer, schedule step and train state carry over; the loader restarts, as excluded."""
    seed = ["--checkpoint.initial_load_path", str(runs["titan"]), "--checkpoint.initial_load_model_only", "false"]
    base = [*TINY, "--training.steps", "4", "--checkpoint.enable", "true", "--checkpoint.interval", "100"]
    # Without --checkpoint.exclude_from_loading dataloader: one line (test_bad_inputs.py, resume_torchtitan_*).
    proc = run_cli([*base, "--job.dump_folder", str(tmp_path / "cont"), *seed,
                    "--checkpoint.exclude_from_loading", "dataloader"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the data starts from its beginning" in proc.stderr and "the step count is restored" in proc.stderr
    # Reference: our own resume of the same state, the loader excluded alike.
    ref = tmp_path / "ref"
    shutil.copytree(runs["ours"] / "checkpoint", ref / "checkpoint")
    proc = run_cli([*base, "--job.dump_folder", str(ref), "--checkpoint.exclude_from_loading", "dataloader"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}

    assert sorted(losses(tmp_path / "cont")) == [3, 4]
    assert losses(tmp_path / "cont") == losses(ref)
