"""llama_to_dcp --target hyena: a StripedHyena 2 hybrid seeded from a tiny Llama (built here, no download)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import REPO, run_cli
from tests.conftest import TINY as TRAIN_TINY
from tests.helpers.llama_ckpt import TINY, hf_logprobs, save_meta, tiny_hf_model
from torchtitan_hyena.components.checkpoint import load_model_weights
from torchtitan_hyena.config.manager import ConfigManager
from torchtitan_hyena.convert.cli import llama_to_dcp_main
from torchtitan_hyena.convert.llama import llama_to_dcp, read_llama_checkpoint
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.models.common.rope import rope_inv_freq, rope_tables
from torchtitan_hyena.models.hyena import from_llama as hybrid
from torchtitan_hyena.models.hyena import hyena_flavors
from torchtitan_hyena.models.hyena.args import HyenaArgs
from torchtitan_hyena.models.hyena.model import StripedHyena
from torchtitan_hyena.models.hyena.state_dict_adapter import VortexAdapter
from torchtitan_hyena.models.llama3.args import Llama3Args
from torchtitan_hyena.models.llama3.model import Transformer
from torchtitan_hyena.models.llama3.state_dict_adapter import MetaAdapter
from torchtitan_hyena.protocols.model import read_model_args
from torchtitan_hyena.protocols.train_spec import get_flavor_args, get_train_spec

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

LAYOUT = "S*D*"  # 4 layers: attention at 1 and 3, Hyena mixers (fresh) at 0 and 2
# The hyena debugmodel's shape (MLP width 0.75 * int(8 * 256 / 3) = 511, rounded up to 512) and Llama-3-8B's.
DEBUG_SHAPE = dict(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=512,
                   ffn_dim_multiplier=0.75)  # fmt: skip
LLAMA_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-layer GQA Llama with Llama-3.1 RoPE scaling, in HF format and Meta format."""
    root = tmp_path_factory.mktemp("hybrid")
    model = tiny_hf_model(num_hidden_layers=4)
    model.save_pretrained(root / "hf")
    save_meta(model, root / "meta", n_shards=2)
    params = json.loads((root / "meta" / "params.json").read_text())
    (root / "meta" / "params.json").write_text(json.dumps({**params, "n_layers": 4}))
    return root


def load_llama(folder) -> Transformer:
    ckpt = read_llama_checkpoint(folder)
    model = Transformer(ckpt.args)
    model.load_state_dict({k: t.load() for k, t in ckpt.tensors.items()})
    return model.eval()


def load_hybrid(folder) -> tuple[StripedHyena, dict[str, list[str]]]:
    name, _, values = read_model_args(folder)
    assert name == "hyena"
    model = StripedHyena(HyenaArgs.from_dict(values))
    model.init_weights(seed=0)
    return model.eval(), load_model_weights([model], folder, strict_shapes=False)


# ------------------------------------------------------------------------------------------------ mapping
def test_fused_wqkv_rows_are_head_qkv_dim_rotate_half_with_repeated_kv_heads():
    heads, kv_heads, hd, dim = 4, 2, 6, 5
    wq, wk, wv = torch.randn(heads * hd, dim), torch.randn(kv_heads * hd, dim), torch.randn(kv_heads * hd, dim)
    wqkv = hybrid.fused_wqkv(wq, wk, wv, heads, kv_heads)
    assert wqkv.shape == (3 * heads * hd, dim)
    for h in range(heads):
        g = h // (heads // kv_heads)  # the KV head of query head h (SDPA/flash GQA grouping)
        for j in range(hd // 2):  # Meta pair (2j, 2j+1) becomes rotate-half rows (j, j + hd/2)
            for qkv, w, src in ((0, wq, h), (1, wk, g)):
                base = (3 * h + qkv) * hd
                assert torch.equal(wqkv[base + j], w[src * hd + 2 * j])
                assert torch.equal(wqkv[base + hd // 2 + j], w[src * hd + 2 * j + 1])
        assert torch.equal(wqkv[(3 * h + 2) * hd : (3 * h + 3) * hd], wv[g * hd : (g + 1) * hd])


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_attention_blocks_and_mlps_compute_the_llama_functions(tiny, tmp_path, fmt):
    """Acceptance: same normalized hidden states into Llama's attention and the hybrid's attention mixer (and
    MLPs), fp32 max abs difference <= 1e-5, at positions past Llama-3.1's original context (scaled RoPE)."""
    out = tmp_path / "hybrid"
    llama_to_dcp(tiny / fmt, out, target="hyena", layout=LAYOUT, keep_embeddings=True)
    llama = load_llama(tiny / fmt)
    model, report = load_hybrid(out)
    assert report["missing"] == hybrid.fresh_keys(model.args, keep_embeddings=True)
    assert {k.split(".mixer.")[0] for k in report["missing"]} == {"layers.0", "layers.2"}
    assert not report["mismatched"] and not report["unused"]
    assert torch.equal(model.rope_inv_freq, llama.rope_inv_freq) and model.args.rope_scaling == "llama3"

    torch.manual_seed(0)
    x = 3 * torch.randn(2, 24, TINY["dim"])
    positions = torch.arange(24) + 9000
    cos_l, sin_l = rope_tables(llama.rope_inv_freq, positions)
    cos_h, sin_h = rope_tables(model.rope_inv_freq, positions.float() / model.args.rope_pi_factor)
    with torch.no_grad():
        for i, kind in enumerate(LAYOUT):
            block, ref = model.layers[str(i)], llama.layers[str(i)]
            assert torch.equal(block.pre_norm.weight, ref.attention_norm.weight)
            assert torch.equal(block.post_norm.weight, ref.ffn_norm.weight)
            v = ref.ffn_norm(x)
            want = ref.feed_forward(v)
            assert (block.mlp(v) - want).abs().max().item() <= 1e-5 < want.abs().max().item()
            if kind != "*":
                continue
            u = ref.attention_norm(x)
            want = ref.attention(u, cos_l, sin_l)
            got = block.mixer(u, cos_h, sin_h)
            assert (got - want).abs().max().item() <= 1e-5 < 0.1 < want.abs().max().item()
            # The inputs exercise the frequency scaling: without it the same weights give other outputs.
            cos_u, sin_u = rope_tables(rope_inv_freq(model.args.head_dim, model.args.rope_theta), positions)
            assert (block.mixer(u, cos_u, sin_u) - want).abs().max().item() > 1e-3


@pytest.mark.slow
def test_all_attention_hybrid_scores_like_transformers(tmp_path):
    """With attention in every layer the hybrid is the Llama: ``score`` reproduces transformers' log-probs. The
    Llama's eps is ~0 here so that the two RMSNorm forms (eps under / outside the root) coincide."""
    from torchtitan_hyena import score

    model = tiny_hf_model(num_hidden_layers=3, rms_norm_eps=1e-12)
    model.save_pretrained(tmp_path / "hf")
    llama_to_dcp_main(["--input_dir", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "dcp"),
                       "--target", "hyena", "--layout", "***", "--keep_embeddings"])  # fmt: skip
    torch.manual_seed(1)
    sequences = [torch.randint(0, TINY["vocab_size"], (n,)).tolist() for n in (48, 17)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"tokens": s}) + "\n" for s in sequences))
    score.main(["--checkpoint", str(tmp_path / "dcp"), "--tokens", str(tmp_path / "in.jsonl"),
                "--output", str(tmp_path / "out.jsonl")])  # fmt: skip
    got = [json.loads(line)["logprobs"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for ours, ref in zip(got, hf_logprobs(model, sequences)):
        assert (torch.tensor(ours) - ref).abs().max().item() <= 1e-5


def test_default_layout_and_hyena_settings_come_from_the_matching_flavor():
    """Llama-3-8B's shape is the neural_pile_hybrid_8b flavor: the default layout is that flavor's (Evo 2 7B's)."""
    args, flavor = hybrid.hybrid_args(Llama3Args(**LLAMA_8B), "", keep_embeddings=False)
    assert flavor == "neural_pile_hybrid_8b" and args.layout == hyena_flavors[flavor].layout
    assert (args.rope_theta, args.tie_embeddings, args.mlp_activation, args.filter_groups) == (5e5, True, "silu", 256)
    assert hybrid.train_flags(args, flavor) == ["--model.name", "hyena", "--model.flavor", flavor,
                                                "--model.mlp_activation", "silu"]  # fmt: skip
    small = Llama3Args(dim=96, n_layers=9, n_heads=6, multiple_of=32)
    args, flavor = hybrid.hybrid_args(small, "", keep_embeddings=False)
    assert (flavor, args.layout, args.filter_groups) == ("custom", "SDH*SDHSD", 6)


@pytest.mark.parametrize(
    "llama, layout, keep",
    [
        (Llama3Args(**DEBUG_SHAPE, rope_theta=1e4, rope_scaling="llama3"), "*SH*DSH*", True),
        (Llama3Args(**LLAMA_8B, rope_scaling="llama3", rope_scaling_factor=32.0), "", False),
    ],
)
def test_printed_train_flags_make_the_trainer_build_the_hybrid(llama, layout, keep):
    """The flags logged after conversion, on the flavor's TOML defaults, give the converted model's args."""
    args, flavor = hybrid.hybrid_args(llama, layout, keep_embeddings=keep)
    config = ConfigManager().parse_args(hybrid.train_flags(args, flavor))
    built = get_flavor_args(get_train_spec("hyena"), flavor).with_config(config)
    runtime = {"max_seq_len", "norm_eps"} | (set() if keep else {"vocab_size"})  # run's own; eps: see from_llama.py
    assert {k: v for k, v in built.to_dict().items() if k not in runtime} == {
        k: v for k, v in args.to_dict().items() if k not in runtime
    }


def test_bad_layouts_and_targets_are_one_line_errors(tiny, tmp_path):
    cases = {
        "S*D": "has 3 layers but the Llama has 4",
        "S*X*": "must use only the letters S, D, H and \\*",
    }
    for layout, message in cases.items():
        with pytest.raises(UserError, match=message) as e:
            llama_to_dcp(tiny / "hf", tmp_path / "out", target="hyena", layout=layout)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="add --target hyena"):
        llama_to_dcp(tiny / "hf", tmp_path / "out", layout=LAYOUT)
    assert not list(tmp_path.iterdir())  # nothing written


# ------------------------------------------------------------------------------------------------ hyena args
def test_silu_mlps_and_llama3_rope_scaling_from_the_job_config():
    c = ConfigManager().parse_args(["--model.name", "hyena", "--model.mlp_activation", "silu",
                                    "--model.rope_scaling", "llama3", "--model.rope_scaling_factor", "16"])  # fmt: skip
    args = HyenaArgs(dim=32, layout="SDH*", n_heads=2, ffn_hidden_dim=48, filter_groups=4, vocab_size=64)
    args = args.with_config(c)
    assert (args.mlp_activation, args.rope_scaling, args.rope_scaling_factor) == ("silu", "llama3", 16.0)
    model = StripedHyena(args)
    assert [b.mlp.activation for b in model.layers.values()] == ["silu"] * 4
    llama = Transformer(Llama3Args(dim=32, n_layers=1, n_heads=2, vocab_size=64, rope_theta=args.rope_theta,
                                   rope_scaling="llama3", rope_scaling_factor=16.0))  # fmt: skip
    assert torch.equal(model.rope_inv_freq, llama.rope_inv_freq)
    for change in ({"mlp_activation": "silu", "rope_scaling": "none"}, {"mlp_activation": "evo2"}):
        with pytest.raises(UserError, match="vortex has no"):
            VortexAdapter(HyenaArgs.from_dict({**args.to_dict(), **change})).config()


# ------------------------------------------------------------------------------------------------ training
def save_meta_llama(args: Llama3Args, folder, seed: int = 0):
    """Our own Llama (TorchTitan init) as a Meta checkpoint: our names and RoPE layout are Meta's."""
    model = Transformer(args)
    model.init_weights(seed=seed)
    folder.mkdir()
    torch.save(model.state_dict(), folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(MetaAdapter(args).config()))


@pytest.mark.slow
def test_seeded_hybrid_trains_on_the_debug_hyena_config(tmp_path):
    """Acceptance: a Llama of the hyena debugmodel's shape, converted with --target hyena, seeds a 10-step
    debug_hyena run with the flags the converter prints; the run's log lists exactly the fresh Hyena tensors."""
    llama = Llama3Args(**DEBUG_SHAPE, rope_theta=10000.0, rope_scaling="llama3")
    assert llama.ffn_hidden_dim == hyena_flavors["debugmodel"].ffn_hidden_dim
    save_meta_llama(llama, tmp_path / "llama")
    out = tmp_path / "hybrid"
    llama_to_dcp_main(["--input_dir", str(tmp_path / "llama"), "--output_dir", str(out), "--target", "hyena",
                       "--layout", "SDH*SDH*", "--keep_embeddings"])  # fmt: skip
    name, flavor, values = read_model_args(out)
    args = HyenaArgs.from_dict(values)
    assert (name, flavor, args.tie_embeddings) == ("hyena", "debugmodel", False)
    flags = hybrid.train_flags(args, flavor)
    assert "--model.layout" not in flags and "--model.rope_scaling" in flags  # the flavor's layout; Llama's RoPE
    # Its fresh Hyena blocks are not weights to score with: score says so and how to get a scoreable checkpoint.
    (tmp_path / "in.jsonl").write_text('{"tokens": [1, 2, 3]}\n')
    scored = run_cli(["--checkpoint", str(out), "--tokens", str(tmp_path / "in.jsonl"),
                      "--output", str(tmp_path / "out.jsonl")], module="torchtitan_hyena.score")  # fmt: skip
    assert scored.returncode == 2 and len(scored.stderr.strip().splitlines()) == 1, scored.stderr
    assert "partial seed" in scored.stderr and "--checkpoint.initial_load_path" in scored.stderr
    assert not (tmp_path / "out.jsonl").exists()
    debug_hyena = str(REPO / "train_configs" / "debug_hyena.toml")
    config = [debug_hyena if a.endswith("debug_model.toml") else a for a in TRAIN_TINY]
    run = tmp_path / "run"
    proc = run_cli([*config, *flags, "--checkpoint.initial_load_path", str(out), "--job.dump_folder", str(run)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] < records[0]["loss"]
    (line,) = [ln for ln in proc.stderr.splitlines() if "kept fresh init (absent from" in ln]
    listed = line.split("): ", 1)[1].split(", ")
    assert listed == hybrid.fresh_keys(args, keep_embeddings=True)
    assert {k.split(".")[1] for k in listed} == {"0", "1", "2", "4", "5", "6"}  # the S, D, H blocks' mixers
    assert "shape differs" not in proc.stderr and "ignored checkpoint tensors" not in proc.stderr
