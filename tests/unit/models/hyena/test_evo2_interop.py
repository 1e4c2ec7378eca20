"""Evo 2 interop: exported YAMLs carry what vortex needs, the vortex-valid edge cases convert (MR filters shorter
than 128 taps, unpadded vocabularies), the checkpoint's RoPE frequencies are kept, and scoring does what evo2
users do (per-sequence reductions, reverse complements, embeddings) with evo2's semantics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from tests.conftest import REPO
from tests.helpers.evo2_ckpt import CONFIG, KINDS, fake_evo2_state, reference_logits
from torchtitan_hyena import score
from torchtitan_hyena.convert import evo2
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.models.common.rope import rope_tables
from torchtitan_hyena.models.hyena import hyena_flavors
from torchtitan_hyena.models.hyena.model import StripedHyena
from torchtitan_hyena.models.hyena.state_dict_adapter import VortexAdapter, infer_layout

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
KEYS = json.loads((REPO / "tests" / "assets" / "evo2_yaml_keys.json").read_text())
CPU = torch.device("cpu")
# A vortex-valid model we used to refuse: 64-tap MR filters (no D, conv1d order) and a vocabulary of 500 (not a
# multiple of make_vocab_size_divisible_by 8: vortex does not pad).
SHORT_MR = dict(CONFIG, hcm_filter_length=64, vocab_size=500)


# ------------------------------------------------------------------------------------------------ YAML export
def model_values(args) -> dict:
    """What vortex must read for each of KEYS['vortex_model_keys'] to build ``args``' model."""
    idx = {kind: [i for i, k in enumerate(args.layout) if k == kind] for kind in "*SDH"}
    return {
        "vocab_size": args.vocab_size, "hidden_size": args.dim, "num_filters": args.dim, "num_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "attn_layer_idxs": idx["*"], "hcs_layer_idxs": idx["S"],
        "hcm_layer_idxs": idx["D"], "hcl_layer_idxs": idx["H"], "hcs_filter_groups": args.filter_groups,
        "hcm_filter_groups": args.filter_groups, "hcs_filter_length": args.se_filter_len,
        "hcm_filter_length": args.mr_filter_len, "short_filter_length": args.short_filter_len,
        "state_size": args.state_size, "eps": args.norm_eps, "inner_mlp_size": args.ffn_hidden_dim,
        "rotary_emb_base": args.rope_theta, "use_interpolated_rotary_pos_emb": args.rope_pi_factor != 1,
        "rotary_emb_scaling_factor": args.rope_pi_factor, "evo2_style_activations": args.mlp_activation == "evo2",
        "tie_embeddings": args.tie_embeddings,
    }  # fmt: skip


@pytest.mark.parametrize("flavor", [*KEYS["published_values"], "short_mr"])
def test_exported_yaml_has_every_published_key_with_the_values_vortex_needs(flavor):
    args = VortexAdapter.args_from_config(SHORT_MR, "tiny") if flavor == "short_mr" else hyena_flavors[flavor]
    text = yaml.safe_dump(VortexAdapter(args).config(), sort_keys=False)
    cfg = yaml.safe_load(text)
    assert set(KEYS["published_keys"]) <= set(cfg)
    for key, value in {**KEYS["vortex_fixed"], **model_values(args)}.items():  # True == 1: compare bool-ness too
        assert cfg[key] == value and isinstance(cfg[key], bool) == isinstance(value, bool), (key, cfg[key], value)
    if flavor != "short_mr":  # the flavor exports as the published config reads
        assert {k: cfg[k] for k in KEYS["vortex_model_keys"]} == KEYS["published_values"][flavor]
    again = VortexAdapter.args_from_config(cfg, "exported")  # our model from the exported YAML
    assert again == args
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in StripedHyena(again).state_dict().items()}
        assert shapes == {k: v.shape for k, v in StripedHyena(args).state_dict().items()}


# ------------------------------------------------------------------------------------------------ conversion
@pytest.fixture(scope="module")
def short_mr(tmp_path_factory) -> tuple[Path, dict]:
    """The 64-tap / vocab-500 checkpoint converted; its inv_freq one ulp off vortex's formula in one entry."""
    root = tmp_path_factory.mktemp("short_mr")
    state = fake_evo2_state(seed=3, mr_taps=64, vocab=500)
    state["blocks.3.inner_mha_cls.rotary_emb.inv_freq"][2] = torch.nextafter(evo2_recomputed()[2], torch.tensor(1.0))
    torch.save(state, root / "tiny.pt")
    (root / "tiny.yml").write_text(yaml.safe_dump(SHORT_MR))
    evo2.convert_evo2_to_dcp(root / "tiny.pt", str(root / "tiny.yml"), root / "dcp")
    return root / "dcp", state


def test_short_mr_and_unpadded_vocab_convert_score_and_export_like_the_original(short_mr, tmp_path):
    dcp, state = short_mr
    meta = json.loads((dcp / "model_args.json").read_text())["args"]
    assert meta["layout"] == KINDS and meta["mr_filter_len"] == 64 and meta["vocab_size"] == 500
    model = score.load_model(dcp, CPU)
    assert all(not layer.mixer.D.any() for layer in model.layers.values() if layer.kind == "D")
    tokens = torch.randint(0, 500, (2, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = torch.log_softmax(model(tokens), -1)
    want = torch.log_softmax(reference_logits(state, tokens), -1)
    assert (got - want).abs().max() < 2e-4

    evo2.convert_dcp_to_evo2(dcp, tmp_path / "back.pt", yaml_out=str(tmp_path / "back.yml"))
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert not [k for k in back if k.startswith("blocks.1.filter.D")]
    dropped = {"blocks.0.projections._extra_state", "unembed.weight", "blocks.2.filter.t"}
    assert set(back) == set(state) - dropped
    for key, tensor in back.items():  # bit for bit, the checkpoint's own inv_freq included
        assert tensor.dtype == state[key].dtype and torch.equal(tensor, state[key]), key
    assert yaml.safe_load((tmp_path / "back.yml").read_text())["hcm_filter_length"] == 64


def test_checkpoint_rope_frequencies_are_used_and_old_checkpoints_recompute(short_mr, tmp_path):
    dcp, state = short_mr
    stored = state["blocks.3.inner_mha_cls.rotary_emb.inv_freq"]
    model = score.load_model(dcp, CPU)
    assert torch.equal(model.rope_inv_freq, stored) and not torch.equal(model.rope_inv_freq, evo2_recomputed())
    old = tmp_path / "old"  # a checkpoint converted before rope_inv_freq existed
    shutil.copytree(dcp, old)
    payload = json.loads((dcp / "model_args.json").read_text())
    del payload["args"]["rope_inv_freq"]
    (old / "model_args.json").write_text(json.dumps(payload))
    assert torch.equal(score.load_model(old, CPU).rope_inv_freq, evo2_recomputed())
    payload["args"]["rope_inv_freq"] = [1.0, 0.5]
    (old / "model_args.json").write_text(json.dumps(payload))
    with pytest.raises(UserError, match="rope_inv_freq has 2 values, head_dim 16 needs 8"):
        score.load_model(old, CPU)


def evo2_recomputed() -> torch.Tensor:
    return VortexAdapter.args_from_config(SHORT_MR, "tiny").rope_frequencies()


def test_short_filters_layout_inference_and_export_refusal():
    args = VortexAdapter.args_from_config(dict(SHORT_MR, hcm_filter_length=7), "same-length")
    shapes = {f"blocks.{i}.filter.h": (4, 1, 7) for i in (0, 1)} | {"blocks.2.filter.log_poles": (32, 16, 1)}
    assert infer_layout(shapes, args) == "SDH"  # SE and MR alike: the config decides
    assert infer_layout(shapes) == "SSH"  # no config: read as before
    with torch.device("meta"):
        sd = dict(StripedHyena(args).state_dict())
    sd = {k: torch.ones(v.shape) for k, v in sd.items()}
    with pytest.raises(UserError, match="layers.1.mixer.D is not zero, but vortex has no skip term D"):
        VortexAdapter(args).to_external(sd, torch.bfloat16)


# ------------------------------------------------------------------------------------------------ scoring
DNA = ["ACGGTCAATGCCTTAGACCATGGATTC", "GATTACAGGCT", "TTGACCA"]  # none is its own reverse complement
COMPLEMENT = str.maketrans("ACGT", "TGCA")


def run_score(dcp: Path, tmp_path: Path, records: list[str], *flags: str, name: str = "out") -> list[dict]:
    fasta = tmp_path / f"{name}.fa"
    fasta.write_text("".join(f">r{i}\n{s}\n" for i, s in enumerate(records)))
    out = tmp_path / f"{name}.jsonl"
    score.main(["--checkpoint", str(dcp), "--fasta", str(fasta), "--output", str(out), "--prepend_bos", *flags])
    return [json.loads(line) for line in out.read_text().splitlines()]


def evo2_score_sequences(state: dict, seqs: list[str], reduce: str) -> list[float]:
    """evo2's ``score_sequences(prepend_bos=True)`` on the reference forward: one batch right-padded with PAD,
    log-probs of logits[:, :-1], reduced over each record's first len(seq) positions."""
    width = max(map(len, seqs))
    ids = torch.tensor([[0, *s.encode(), *[1] * (width - len(s))] for s in seqs])
    logprobs = torch.log_softmax(reference_logits(state, ids), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    fn = torch.mean if reduce == "mean" else torch.sum
    return [float(fn(logprobs[i, : len(s)])) for i, s in enumerate(seqs)]


def test_reductions_and_reverse_complement_match_evo2(short_mr, tmp_path):
    dcp, state = short_mr
    rows = {}
    for reduce in ("mean", "sum"):
        rows[reduce] = run_score(dcp, tmp_path, DNA, "--reduce", reduce, "--batch_size", "2", name=reduce)
        assert [r["id"] for r in rows[reduce]] == ["r0", "r1", "r2"]
        assert all(set(r) == {"id", "score"} for r in rows[reduce])
        want = evo2_score_sequences(state, DNA, reduce)
        assert max(abs(r["score"] - w) for r, w in zip(rows[reduce], want)) < 2e-4 * (1 if reduce == "mean" else 30)
    rc = [s.translate(COMPLEMENT)[::-1] for s in DNA]
    assert all(s != r for s, r in zip(DNA, rc))
    averaged = run_score(dcp, tmp_path, DNA, "--reduce", "mean", "--reverse_complement", name="rc")
    forward = rows["mean"]
    backward = run_score(dcp, tmp_path, rc, "--reduce", "mean", name="bwd")
    for a, f, b in zip(averaged, forward, backward):
        assert a["score"] == pytest.approx((f["score"] + b["score"]) / 2, rel=1e-6) and f["score"] != b["score"]


def test_embeddings_are_the_block_outputs_of_a_forward_pass(short_mr, tmp_path):
    dcp, _ = short_mr
    layers = "0,blocks.3,blocks.5.mlp.l3,layers.6"
    rows = run_score(dcp, tmp_path, DNA, "--embeddings", layers, "--embeddings_dir", str(tmp_path / "emb"))
    assert all(len(r["logprobs"]) == len(s) for r, s in zip(rows, DNA))
    files = sorted((tmp_path / "emb").iterdir())
    assert [f.name for f in files] == ["000000.safetensors", "000001.safetensors", "000002.safetensors"]

    model = score.load_model(dcp, CPU)
    mlp_out = {}
    model.layers["5"].mlp.w2.register_forward_hook(lambda _m, _i, out: mlp_out.update(out=out))
    for seq, path in zip(DNA, files):
        tokens = torch.tensor([[0, *seq.encode()]])
        cos, sin = rope_tables(model.rope_inv_freq, torch.arange(tokens.shape[1]).float() / model.args.rope_pi_factor)
        h, blocks = model.tok_embeddings(tokens), []
        with torch.no_grad():
            for layer in model.layers.values():
                h = layer(h, cos, sin)
                blocks.append(h[0])
        with safe_open(str(path), "pt") as f:
            assert set(f.keys()) == set(layers.split(",")) and f.metadata()["id"] == f"r{files.index(path)}"
            want = {"0": blocks[0], "blocks.3": blocks[3], "blocks.5.mlp.l3": mlp_out["out"][0], "layers.6": blocks[6]}
            for name, tensor in want.items():
                got = f.get_tensor(name)
                assert got.shape == (len(seq) + 1, 32) and torch.allclose(got, tensor, rtol=1e-4, atol=1e-5), name


def test_bad_embedding_layers_fail_in_one_line_and_write_nothing(short_mr, tmp_path):
    dcp, _ = short_mr
    for layers, fragment in [
        ("7", "no such layer; use a block index 0..6"),
        ("blocks.2.mlp.l9", "blocks.6.<pre_norm|"),
    ]:
        with pytest.raises(UserError) as e:
            run_score(dcp, tmp_path, DNA, "--embeddings", layers, "--embeddings_dir", str(tmp_path / "emb"))
        assert fragment in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.fa"]
