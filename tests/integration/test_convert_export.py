"""dcp_to_llama (Meta .pth, transformers folder, Hub push) and the seeding flows of the Neural Pile configs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.conftest import TINY as TINY_RUN
from tests.conftest import run_cli
from tests.helpers.llama_ckpt import TINY, hf_logprobs, read_dcp, save_meta, tiny_hf_model
from torchtitan_hyena.build import load_model
from torchtitan_hyena.components.checkpoint import load_model_weights
from torchtitan_hyena.convert import hub
from torchtitan_hyena.convert.cli import dcp_to_llama_main
from torchtitan_hyena.convert.llama import dcp_to_llama, llama_to_dcp, read_llama_checkpoint
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.score import score_sequences
from torchtitan_hyena.tools.logging import logger

transformers = pytest.importorskip("transformers")
CPU = torch.device("cpu")
NON_MODEL = ("optimizer", "lr_scheduler", "dataloader", "train_state")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A full training checkpoint (model, optimizer, loader, schedule) of the debug model after 2 steps."""
    out = tmp_path_factory.mktemp("train") / "run"
    proc = run_cli([*TINY_RUN, "--training.steps", "2", "--checkpoint.enable", "true", "--checkpoint.interval", "2",
                    "--checkpoint.keep_latest_k", "0", "--job.dump_folder", str(out)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "checkpoint" / "step-2"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The tiny Llama converted with its embeddings (a complete, exportable model-only DCP)."""
    root = tmp_path_factory.mktemp("converted")
    model = tiny_hf_model()
    model.save_pretrained(root / "hf")
    llama_to_dcp(root / "hf", root / "dcp", keep_embeddings=True)
    return root / "dcp"


@pytest.fixture
def log_messages():
    """Messages of the package logger (it does not propagate to pytest's capture)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def _sequences(vocab: int) -> list[list[int]]:
    torch.manual_seed(2)
    return [torch.randint(0, vocab, (n,)).tolist() for n in (48, 30, 9)]


def _max_diff(ours: list[list[float]], ref: list[torch.Tensor]) -> float:
    return max((torch.tensor(o) - r).abs().max().item() for o, r in zip(ours, ref))


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.slow
def test_hf_export_of_a_training_checkpoint_reproduces_our_logprobs(trained, tmp_path, monkeypatch):
    requested: list[str] = []
    real_load = dcp.load
    monkeypatch.setattr(dcp, "load", lambda sd, **kw: (requested.extend(sd), real_load(sd, **kw))[1])
    dcp_to_llama_main(["--input_dir", str(trained), "--output_dir", str(tmp_path / "hf")])
    monkeypatch.undo()

    stored = read_dcp(trained, skip=())
    assert any(k.startswith("optimizer") for k in stored)  # a full training checkpoint ...
    assert requested and not [k for k in requested if k.startswith(NON_MODEL)]  # ... of which only the model is read
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "flavor `debugmodel`" in card and '"flavor": "debugmodel"' in card and '"steps": 2' in card

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    sequences = _sequences(256)
    ours = score_sequences(load_model(trained, CPU), sequences, CPU)
    assert _max_diff(ours, hf_logprobs(hf, sequences)) <= 1e-5

    # Sharded bf16 export: an index, several files, the same weights rounded to bf16.
    dcp_to_llama(trained, tmp_path / "bf16", dtype=torch.bfloat16, max_shard_bytes=2**20)
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf16 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16", torch_dtype=torch.bfloat16)
    for name, p in hf16.state_dict().items():
        assert torch.equal(p, hf.state_dict()[name].bfloat16()), name


def test_pth_round_trip_is_bit_exact(tmp_path):
    """Meta -> DCP -> pth returns Meta's tensors bit for bit, also from 2 model-parallel shards."""
    model = tiny_hf_model()
    original = torch.load(save_meta(model, tmp_path / "meta1") / "consolidated.00.pth", weights_only=True)
    save_meta(model, tmp_path / "meta2", n_shards=2)
    for name in ("meta1", "meta2"):
        llama_to_dcp(tmp_path / name, tmp_path / f"dcp-{name}", keep_embeddings=True)
        dcp_to_llama_main(["--input_dir", str(tmp_path / f"dcp-{name}"), "--output_dir", str(tmp_path / f"pth-{name}"),
                           "--format", "pth"])  # fmt: skip
        exported = torch.load(tmp_path / f"pth-{name}" / "consolidated.00.pth", weights_only=True)
        assert exported.keys() == original.keys()
        for key, t in original.items():
            assert t.dtype == exported[key].dtype and torch.equal(t, exported[key]), key
        again = read_llama_checkpoint(tmp_path / f"pth-{name}").args  # params.json reads back to the same model
        assert again.to_dict() == read_llama_checkpoint(tmp_path / "meta1").args.to_dict()


def test_export_refuses_incomplete_or_foreign_checkpoints(converted, tmp_path):
    llama_to_dcp(converted.parent / "hf", tmp_path / "no-embed")
    with pytest.raises(UserError, match="converted without --keep_embeddings"):
        dcp_to_llama(tmp_path / "no-embed", tmp_path / "o1")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    payload = json.loads((converted / "model_args.json").read_text())
    (foreign / "model_args.json").write_text(json.dumps({**payload, "model_name": "hyena"}))
    with pytest.raises(UserError, match="holds a 'hyena' model"):
        dcp_to_llama(foreign, tmp_path / "o2")
    with pytest.raises(UserError, match="is not a DCP checkpoint"):
        dcp_to_llama(tmp_path, tmp_path / "o3")
    (tmp_path / "o4").mkdir()
    (tmp_path / "o4" / "x").write_text("")
    with pytest.raises(UserError, match="not empty; pass --overwrite"):
        dcp_to_llama(converted, tmp_path / "o4")
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))


# ------------------------------------------------------------------------------------------------ Hub
class FakeHfApi:
    """Stands in for huggingface_hub.HfApi and records what would have been sent."""

    calls: list = []

    def __init__(self, token=None):
        FakeHfApi.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
        FakeHfApi.calls.append(("upload_folder", repo_id, folder, files, kwargs))
        return SimpleNamespace(commit_url=f"https://hub.local/{repo_id}/commit/1")


@pytest.mark.slow
def test_push_to_hub_uploads_the_export_with_a_model_card(trained, tmp_path, monkeypatch, log_messages, capfd):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETtesttoken")
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    out = tmp_path / "hf"
    dcp_to_llama_main(["--input_dir", str(trained), "--output_dir", str(out), "--hf_repo_name", "me/tiny-neuro",
                       "--push_to_hub", "--private"])  # fmt: skip
    (_, token), (_, repo, create_kwargs), (_, up_repo, folder, files, _) = FakeHfApi.calls
    assert token == "hf_SECRETtesttoken" and repo == up_repo == "me/tiny-neuro"
    assert create_kwargs == {"repo_type": "model", "private": True, "exist_ok": True}
    assert folder == out and sorted(files) == ["README.md", "config.json", "model.safetensors"]
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: transformers") and "# me/tiny-neuro" in card
    assert '"dump_folder"' in card  # the training configuration
    captured = capfd.readouterr()
    assert "hf_SECRETtesttoken" not in captured.out + captured.err + "".join(log_messages)
    assert any("https://hub.local/me/tiny-neuro/commit/1" in m for m in log_messages)


def test_push_to_hub_errors(converted, tmp_path, monkeypatch):
    import huggingface_hub.constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    base = ["--input_dir", str(converted), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(UserError, match="needs a Hugging Face token: set HF_TOKEN or run `huggingface-cli login`"):
        dcp_to_llama_main([*base, "--push_to_hub", "--hf_repo_name", "me/x"])
    with pytest.raises(UserError, match="--push_to_hub needs --hf_repo_name"):
        dcp_to_llama_main([*base, "--push_to_hub"])
    with pytest.raises(UserError, match="not a valid repo id"):
        dcp_to_llama_main([*base, "--push_to_hub", "--hf_repo_name", "me/bad name"])
    assert not (tmp_path / "out").exists()  # refused before any work

    class Unauthorized(FakeHfApi):
        def upload_folder(self, **kwargs):
            raise RuntimeError("401 Client Error: Unauthorized\nmore detail")

    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setattr(hub, "HfApi", Unauthorized)
    with pytest.raises(UserError, match=r"push to me/x failed \(RuntimeError: 401 Client Error: Unauthorized\)") as e:
        dcp_to_llama_main([*base, "--push_to_hub", "--hf_repo_name", "me/x"])
    assert "\n" not in str(e.value) and (tmp_path / "out" / "model.safetensors").exists()  # the export is kept


# ------------------------------------------------------------------------------------------------ seeding flows
def _train(args: list[str]):
    proc = run_cli([*TINY_RUN, "--training.steps", "1", "--optimizer.lr", "0", "--checkpoint.enable", "true",
                    "--checkpoint.interval", "1", *args])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.slow
def test_debug_run_seeded_from_llama_without_embeddings(tmp_path):
    """lang-primate flow in small: a Llama of the debug shape (vocab 512) converted without embeddings seeds a
    vocab-256 run; the embeddings start fresh and are listed, every other tensor is Llama's (lr 0 keeps them)."""
    model = tiny_hf_model(hidden_size=256, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4,
                          intermediate_size=768, vocab_size=512, rope_scaling=False)  # fmt: skip
    model.save_pretrained(tmp_path / "hf")
    llama_to_dcp(tmp_path / "hf", tmp_path / "seed")
    log = _train(["--checkpoint.initial_load_path", str(tmp_path / "seed"), "--job.dump_folder", str(tmp_path / "run")])
    assert f"kept fresh init (absent from {tmp_path / 'seed'}): tok_embeddings.weight, output.weight" in log
    trained = read_dcp(tmp_path / "run" / "checkpoint" / "step-1")
    seed = read_dcp(tmp_path / "seed")
    assert trained["tok_embeddings.weight"].shape == (256, 256)
    assert len(seed) == 1 + 9 * 6
    for key, t in seed.items():
        assert torch.equal(trained[key], t), key


@pytest.mark.slow
def test_run_seeded_model_only_from_a_trained_checkpoint(trained, tmp_path):
    """rodent -> rodent-primate flow in small: model weights from a training checkpoint, fresh optimizer/schedule."""
    log = _train(["--checkpoint.initial_load_path", str(trained), "--job.dump_folder", str(tmp_path / "run")])
    assert f"seeded model weights from {trained}" in log
    assert "kept fresh init" not in log and "also restored" not in log
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    seeded, source = read_dcp(tmp_path / "run" / "checkpoint" / "step-1"), read_dcp(trained)
    assert seeded.keys() == source.keys()
    for key, t in source.items():
        assert torch.equal(seeded[key], t), key


def test_seed_report_lists_reshaped_embeddings(converted):
    """With --keep_embeddings, a different vocabulary is reported as reshaped rather than loaded."""
    from torchtitan_hyena.models.llama3.args import Llama3Args
    from torchtitan_hyena.models.llama3.model import Transformer

    args = Llama3Args.from_dict(json.loads((converted / "model_args.json").read_text())["args"])
    args.vocab_size = 256
    model = Transformer(args)
    report = load_model_weights([model], converted, strict_shapes=False)
    assert report["mismatched"] == [f"tok_embeddings.weight ({TINY['vocab_size']}, 64) -> (256, 64)",
                                    f"output.weight ({TINY['vocab_size']}, 64) -> (256, 64)"]  # fmt: skip
    assert report["missing"] == [] and report["unused"] == []
    wq = read_llama_checkpoint(converted.parent / "hf").tensors["layers.0.attention.wq.weight"].load()
    assert torch.equal(model.layers["0"].attention.wq.weight.detach(), wq)


def test_truncated_checkpoint_is_a_user_error(converted, tmp_path):
    """A truncated data file is caught from the metadata, before DCP reads anything: one line, nothing written."""
    import shutil

    broken = shutil.copytree(converted, tmp_path / "broken")
    for data in broken.glob("*.distcp"):
        data.write_bytes(data.read_bytes()[:64])
    with pytest.raises(UserError, match="checkpoint .*broken is damaged"):
        load_model(broken, CPU)
    with pytest.raises(UserError, match="checkpoint .*broken is damaged"):
        dcp_to_llama(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
