"""llama_to_dcp: Meta and HF checkpoints (tiny, built in the test) into our DCP layout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from tests.conftest import REPO, env
from tests.helpers.llama_ckpt import TINY, hf_logprobs, read_dcp, save_meta, tiny_hf_model
from torchtitan_hyena.convert import llama as conv
from torchtitan_hyena.convert.cli import llama_to_dcp_main
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.models.llama3 import llama3_flavors
from torchtitan_hyena.models.llama3.args import Llama3Args, ffn_hidden_dim
from torchtitan_hyena.models.llama3.state_dict_adapter import HFAdapter, MetaAdapter, ffn_args, flavor_of, permute_qk

pytest.importorskip("transformers")

# Published Llama-3.1-8B configs (meta-llama/Llama-3.1-8B: config.json and original/params.json).
LLAMA31_8B_PARAMS = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
                     "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                     "vocab_size": 128256}  # fmt: skip
LLAMA31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny HF model, saved sharded in HF format and in Meta format (1 shard; 2 shards two ways)."""
    root = tmp_path_factory.mktemp("llama")
    model = tiny_hf_model()
    model.save_pretrained(root / "hf", max_shard_size="100KB")
    assert (root / "hf" / "model.safetensors.index.json").exists()
    save_meta(model, root / "meta1", n_shards=1)
    save_meta(model, root / "meta2", n_shards=2, vocab_parallel=False)  # Llama 2 style: embedding dim split
    save_meta(model, root / "meta2v", n_shards=2, vocab_parallel=True)  # Llama 3 style: vocabulary split
    return model, root


# ------------------------------------------------------------------------------------------------ formats, args
def test_permute_qk_is_rotate_half_and_inverts():
    heads, hd, cols = 3, 8, 5
    meta = torch.randn(heads * hd, cols)
    hf = permute_qk(meta, heads, to_hf=True)
    for h in range(heads):
        for j in range(hd // 2):
            assert torch.equal(hf[h * hd + j], meta[h * hd + 2 * j])  # HF first half = Meta even rows
            assert torch.equal(hf[h * hd + hd // 2 + j], meta[h * hd + 2 * j + 1])
    assert torch.equal(permute_qk(hf, heads, to_hf=False), meta)


@pytest.mark.parametrize(
    "dim, hidden, expected",
    [(4096, 14336, (2048, 1.3)), (8192, 28672, (4096, 1.3)), (2048, 8192, (8192, None)), (64, 224, (32, 1.3))],
)
def test_ffn_args_reproduce_meta_style(dim, hidden, expected):
    assert ffn_args(dim, hidden) == expected


@pytest.mark.parametrize("dim, hidden", [(64, 200), (100, 301), (4096, 11008), (96, 7)])
def test_ffn_args_exact_for_any_width(dim, hidden):
    multiple_of, multiplier = ffn_args(dim, hidden)
    assert ffn_hidden_dim(dim, multiple_of, multiplier) == hidden


def test_llama31_8b_configs_map_to_our_8b_flavor_and_the_lang_primate_rope():
    toml = tomllib.loads((REPO / "train_configs" / "lang_primate_8B_131k.toml").read_text())
    flavor = llama3_flavors["8B"]
    for args in (MetaAdapter.args_from_config(LLAMA31_8B_PARAMS), HFAdapter.args_from_config(LLAMA31_8B_CONFIG)):
        assert flavor_of(args) == "8B"
        assert args.ffn_hidden_dim == flavor.ffn_hidden_dim == 14336
        assert (args.rope_theta, args.norm_eps, args.vocab_size) == (500000.0, 1e-5, 128256)
        m = toml["model"]
        assert (args.rope_scaling, args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
                args.rope_original_max_position) == (m["rope_scaling"], m["rope_scaling_factor"],
                m["rope_low_freq_factor"], m["rope_high_freq_factor"], m["rope_original_max_position"])  # fmt: skip
    assert toml["checkpoint"]["initial_load_model_only"] is True
    rodent = tomllib.loads((REPO / "train_configs" / "rodent_primate_8B_131k.toml").read_text())
    assert rodent["checkpoint"]["initial_load_path"].endswith("/checkpoint/step-20790")
    assert rodent["checkpoint"]["initial_load_model_only"] is True
    args = HFAdapter.args_from_config(LLAMA31_8B_CONFIG)
    assert HFAdapter.args_from_config(HFAdapter(args).config(torch.bfloat16)).to_dict() == args.to_dict()


def test_neural_pile_8b_131k_exports_to_an_equivalent_hf_config():
    args = Llama3Args(**{**llama3_flavors["8B"].to_dict(), "vocab_size": 256, "max_seq_len": 131072})
    args.rope_scaling = "llama3"  # lang-primate keeps Llama-3.1's RoPE
    config = HFAdapter(args).config(torch.bfloat16)
    assert [config[k] for k in ("vocab_size", "max_position_embeddings", "intermediate_size")] == [256, 131072, 14336]
    back = HFAdapter.args_from_config(config)
    assert flavor_of(back) == "8B" and back.ffn_hidden_dim == args.ffn_hidden_dim
    for field in (
        "dim",
        "n_layers",
        "n_heads",
        "vocab_size",
        "max_seq_len",
        "norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_scaling_factor",
        "rope_low_freq_factor",
        "rope_high_freq_factor",
        "rope_original_max_position",
    ):
        assert getattr(back, field) == getattr(args, field), field  # fmt: skip


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "'mistral'.*unsupported architecture"),
        ({"attention_bias": True}, "attention_bias = true is not supported"),
        ({"mlp_bias": True}, "mlp_bias = true is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn' is not supported"),
        ({"head_dim": 64}, "head_dim 64"),
        ({"num_key_value_heads": 5}, "n_kv_heads 5 must divide n_heads"),
        ({"rms_norm_eps": 0}, "norm_eps must be positive"),
        ({"hidden_size": "4096"}, "hidden_size = '4096' is not an integer"),
    ],
)
def test_unsupported_hf_configs_are_rejected(change, message):
    with pytest.raises(UserError, match=message):
        HFAdapter.args_from_config({**LLAMA31_8B_CONFIG, **change})


# ------------------------------------------------------------------------------------------------ conversions
def test_every_format_reads_to_the_same_tensors(tiny):
    """HF (un-permuted) and Meta (1 shard; 2 shards split either way) give bit-identical tensors and args."""
    _, root = tiny
    ref = conv.read_llama_checkpoint(root / "hf")
    assert ref.args.ffn_hidden_dim == 224 and ref.args.rope_scaling == "llama3"
    for name in ("meta1", "meta2", "meta2v"):
        ckpt = conv.read_llama_checkpoint(root / name)
        assert ckpt.args.ffn_hidden_dim == ref.args.ffn_hidden_dim and ckpt.args.rope_scaling == "llama3"
        assert ckpt.tensors.keys() == ref.tensors.keys()
        for key, t in ref.tensors.items():
            assert torch.equal(ckpt.tensors[key].load(), t.load()), f"{name}: {key}"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["hf", "meta1", "meta2"])
def test_converted_checkpoint_scores_like_transformers(tiny, tmp_path, fmt):
    """Acceptance: convert with --keep_embeddings, then `score` reproduces transformers' log-probs (fp32)."""
    from torchtitan_hyena import score

    model, root = tiny
    torch.manual_seed(1)
    sequences = [torch.randint(0, TINY["vocab_size"], (n,)).tolist() for n in (64, 40, 17)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"tokens": s}) + "\n" for s in sequences))
    out = tmp_path / "dcp"
    llama_to_dcp_main(["--input_dir", str(root / fmt), "--output_dir", str(out), "--keep_embeddings"])
    score.main(["--checkpoint", str(out), "--tokens", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o")])
    got = [json.loads(line)["logprobs"] for line in (tmp_path / "o").read_text().splitlines()]
    for ours, ref in zip(got, hf_logprobs(model, sequences)):
        assert (torch.tensor(ours) - ref).abs().max().item() <= 1e-5


def test_default_drops_embeddings_and_dtype_sets_precision(tiny, tmp_path):
    _, root = tiny
    conv.llama_to_dcp(root / "meta2", tmp_path / "out", dtype=torch.bfloat16)
    tensors = read_dcp(tmp_path / "out")
    assert "tok_embeddings.weight" not in tensors and "output.weight" not in tensors
    assert len(tensors) == 2 + 9 * TINY["n_layers"] - 1  # norm.weight + 9 per layer
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    expected = conv.read_llama_checkpoint(root / "hf").tensors["layers.1.attention.wk.weight"].load()
    assert torch.equal(tensors["layers.1.attention.wk.weight"], expected.bfloat16())
    payload = json.loads((tmp_path / "out" / "model_args.json").read_text())
    assert payload["model_name"] == "llama3" and payload["flavor"] == "custom"
    assert Llama3Args.from_dict(payload["args"]).ffn_hidden_dim == 224
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_tied_hf_embeddings_are_untied(tmp_path):
    model = tiny_hf_model(tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "hf")
    ckpt = conv.read_llama_checkpoint(tmp_path / "hf")
    embed = model.model.embed_tokens.weight
    assert torch.equal(ckpt.tensors["output.weight"].load(), embed)
    assert torch.equal(ckpt.tensors["tok_embeddings.weight"].load(), embed)


def test_llama2_params_without_vocab_or_theta(tiny, tmp_path):
    """Llama 2's params.json says vocab_size -1 and has no rope_theta (Meta's code then uses 10000)."""
    model, _ = tiny
    folder = save_meta(model, tmp_path / "m", n_shards=2, vocab_parallel=False, scaled_rope=False)
    params = json.loads((folder / "params.json").read_text())
    params.update(vocab_size=-1)
    params.pop("rope_theta"), params.pop("use_scaled_rope")
    (folder / "params.json").write_text(json.dumps(params))
    args = conv.read_llama_checkpoint(folder).args
    assert (args.vocab_size, args.rope_theta, args.rope_scaling) == (TINY["vocab_size"], 10000.0, "none")


# ------------------------------------------------------------------------------------------------ bad inputs
def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_inputs_are_one_line_user_errors(tiny, tmp_path):
    _, root = tiny
    cases = {}
    cases["no params.json"] = _copy(root / "meta1", tmp_path / "a")
    (cases["no params.json"] / "params.json").unlink()
    cases["no config.json"] = _copy(root / "hf", tmp_path / "b")
    (cases["no config.json"] / "config.json").unlink()
    (cases["no config.json"] / "model.safetensors.index.json").unlink()
    cases["neither"] = tmp_path / "c"
    cases["neither"].mkdir()
    cases["missing shard"] = _copy(root / "meta2", tmp_path / "d")
    (cases["missing shard"] / "consolidated.01.pth").rename(cases["missing shard"] / "consolidated.02.pth")
    cases["inconsistent"] = _copy(root / "meta2", tmp_path / "e")
    shard = torch.load(cases["inconsistent"] / "consolidated.01.pth", weights_only=True)
    shard["layers.0.attention.wq.weight"] = shard["layers.0.attention.wq.weight"][:-16]
    torch.save(shard, cases["inconsistent"] / "consolidated.01.pth")
    cases["wrong params"] = _copy(root / "meta1", tmp_path / "f")
    (cases["wrong params"] / "params.json").write_text(json.dumps({**TINY, "n_layers": 3}))
    cases["not llama"] = _copy(root / "hf", tmp_path / "g")
    config = json.loads((cases["not llama"] / "config.json").read_text())
    (cases["not llama"] / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    messages = {
        "no params.json": "no params.json",
        "no config.json": "no config.json",
        "neither": "neither a Meta",
        "missing shard": "lacks shard consolidated.01.pth",
        "inconsistent": "inconsistent shards: layers.0.attention.wq.weight",
        "wrong params": "lacks 9 tensors",
        "not llama": "unsupported architecture",
    }
    for name, folder in cases.items():
        with pytest.raises(UserError, match=messages[name]) as e:
            conv.llama_to_dcp(folder, tmp_path / f"out-{name}")
        assert "\n" not in str(e.value)
        assert not (tmp_path / f"out-{name}").exists()


def test_output_folder_rules_and_interrupted_conversion(tiny, tmp_path, monkeypatch):
    _, root = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UserError, match="exists and is not empty; pass --overwrite"):
        conv.llama_to_dcp(root / "hf", out)
    assert (out / "keep.txt").exists()

    calls = []

    def killed_by_slurm(*args):  # the third tensor read is interrupted by SIGTERM (a job's time limit)
        calls.append(args)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    real = conv._load_hf_tensor
    monkeypatch.setattr(conv, "_load_hf_tensor", killed_by_slurm)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        llama_to_dcp_main(["--input_dir", str(root / "hf"), "--output_dir", str(out), "--overwrite"])
    assert len(calls) == 3 and signal.getsignal(signal.SIGTERM) is previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "keep.txt").exists()
    monkeypatch.setattr(conv, "_load_hf_tensor", real)
    conv.llama_to_dcp(root / "hf", out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model_args.json").exists() and (out / ".metadata").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_cli_reports_one_line_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "llama_to_dcp.py", "--input_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path} holds neither a Meta (params.json) nor an HF "
                                                "(config.json) Llama checkpoint"]  # fmt: skip
    assert not (tmp_path / "o").exists()
