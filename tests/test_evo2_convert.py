"""Evo 2 (vortex) conversion: round trip through the CLIs and scoring against an independent vortex-style
forward written here from docs/stripedhyena2.md, plus one-line errors for bad inputs."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.conftest import REPO, env, run_cli
from torchtitan_hyena.convert import evo2
from torchtitan_hyena.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# A tiny Evo 2-shaped vortex config: layers SDH*SDH, PI factor 4, GELU in layer 0 only, tied embeddings.
CONFIG = {
    "model_name": "tiny-evo2", "vocab_size": 512, "make_vocab_size_divisible_by": 8, "hidden_size": 32,
    "num_filters": 32, "num_layers": 7, "num_attention_heads": 2, "inner_mlp_size": 48,
    "attn_layer_idxs": [3], "hcs_layer_idxs": [0, 4], "hcm_layer_idxs": [1, 5], "hcl_layer_idxs": [2, 6],
    "hcs_filter_length": 7, "hcm_filter_length": 128, "short_filter_length": 3, "hcs_filter_groups": 4,
    "hcm_filter_groups": 4, "hcl_filter_groups": 32, "short_filter_bias": False, "state_size": 16, "eps": 1e-6,
    "rotary_emb_base": 10000, "use_interpolated_rotary_pos_emb": True, "rotary_emb_scaling_factor": 4,
    "proj_groups": 1, "hyena_filter_groups": 1, "column_split_hyena": False, "column_split": True,
    "interleave": True, "hyena_flip_x1x2": False, "evo2_style_activations": True, "mlp_activation": "gelu",
    "tie_embeddings": True, "final_norm": True, "mha_out_proj_bias": True, "hyena_out_proj_bias": True,
    "qkv_proj_bias": False, "max_seqlen": 64, "use_flash_attn": True, "prefill_style": "fft",
}  # fmt: skip
KINDS = "SDH*SDH"


def fake_evo2_state(seed: int = 0) -> dict:
    """Random weights in vortex's keys, shapes and dtypes (bf16; LI filters and inv_freq fp32)."""
    g = torch.Generator().manual_seed(seed)
    d, f, bf = 32, 48, torch.bfloat16

    def rnd(*shape, std=0.2):
        return (torch.randn(*shape, generator=g) * std).to(bf)

    sd = {"embedding_layer.weight": rnd(512, d, std=1.0), "norm.scale": (1 + rnd(d, std=0.1).float()).to(bf)}
    for i, kind in enumerate(KINDS):
        p = f"blocks.{i}."
        sd[p + "pre_norm.scale"] = (1 + rnd(d, std=0.1).float()).to(bf)
        sd[p + "post_norm.scale"] = (1 + rnd(d, std=0.1).float()).to(bf)
        sd[p + "mlp.l1.weight"], sd[p + "mlp.l2.weight"], sd[p + "mlp.l3.weight"] = rnd(f, d), rnd(f, d), rnd(d, f)
        if kind == "*":
            sd[p + "inner_mha_cls.Wqkv.weight"] = rnd(3 * d, d)
            sd[p + "inner_mha_cls.out_proj.weight"], sd[p + "inner_mha_cls.out_proj.bias"] = rnd(d, d), rnd(d)
            sd[p + "inner_mha_cls.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
            continue
        sd[p + "projections.weight"] = rnd(3 * d, d)
        sd[p + "filter.short_filter_weight"] = rnd(3 * d, 1, 3, std=0.5)
        sd[p + "out_filter_dense.weight"], sd[p + "out_filter_dense.bias"] = rnd(d, d), rnd(d)
        if kind == "S":
            sd[p + "filter.h"] = rnd(4, 1, 7, std=0.4)
        elif kind == "D":
            sd[p + "filter.h"] = (rnd(4, 1, 128, std=0.2).float() * torch.exp(-torch.arange(128) / 20.0)).to(bf)
        else:
            sd[p + "filter.log_poles"] = -torch.exp(torch.randn(d, 16, 1, generator=g) - 2.5)
            sd[p + "filter.residues"] = torch.randn(d, 16, generator=g) * 0.3
        if kind in "DH":
            sd[p + "filter.D"] = rnd(d, std=1.0)
    sd["blocks.0.projections._extra_state"] = io.BytesIO(b"te-fp8-metadata")  # dropped
    sd["unembed.weight"] = sd["embedding_layer.weight"].clone()  # bionemo exporter; dropped
    sd["blocks.2.filter.t"] = torch.arange(64.0)[None, None]  # unknown buffer; dropped
    return sd


def reference_logits(sd: dict, tokens: torch.Tensor) -> torch.Tensor:
    """A vortex-like forward, written from the spec: per-block loop, F.conv1d FIRs, FFT convs for MR and LI,
    explicit Wqkv column split, NeoX rotary with interpolated positions, eps outside the RMS."""
    w = {k: v.float() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    b, length = tokens.shape
    d, heads, hd, n = 32, 2, 16, 2 * tokens.shape[1]

    def norm(x, scale):
        return scale * x / (x.norm(2, dim=-1, keepdim=True) * d**-0.5 + 1e-6)

    def fftconv(s, h):  # s (B, D, L), h (D, L): irfft(rfft(s) * rfft(h)/n, norm=forward)
        return torch.fft.irfft(torch.fft.rfft(s, n=n) * torch.fft.rfft(h, n=n) / n, n=n, norm="forward")[..., :length]

    x = w["embedding_layer.weight"][tokens]
    t = torch.arange(length).float()
    for i, kind in enumerate(KINDS):
        p = f"blocks.{i}."
        u = norm(x, w[p + "pre_norm.scale"])
        if kind == "*":
            wqkv = w[p + "inner_mha_cls.Wqkv.weight"].view(heads, 3, hd, d).transpose(0, 1).reshape(3 * d, d)
            q, k, v = ((u @ wqkv.T).split(d, -1)[j].view(b, length, heads, hd).transpose(1, 2) for j in range(3))
            freqs = torch.outer(t / 4, w[p + "inner_mha_cls.rotary_emb.inv_freq"])
            cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

            q, k = (a * cos + torch.cat([-a.chunk(2, -1)[1], a.chunk(2, -1)[0]], -1) * sin for a in (q, k))
            att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            att = att.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf")).softmax(-1)
            y = (att @ v).transpose(1, 2).reshape(b, length, d)
            y = y @ w[p + "inner_mha_cls.out_proj.weight"].T + w[p + "inner_mha_cls.out_proj.bias"]
        else:
            z = (u @ w[p + "projections.weight"].T).transpose(1, 2)
            z = F.conv1d(F.pad(z, (2, 0)), w[p + "filter.short_filter_weight"], groups=3 * d)
            x2, x1, v = z[:, 0::3], z[:, 1::3], z[:, 2::3]
            s = x1 * v
            if kind == "S":
                h = w[p + "filter.h"].repeat_interleave(d // 4, dim=0)
                y = F.conv1d(F.pad(s, (6, 0)), h, groups=d)
            elif kind == "D":
                h = w[p + "filter.h"][:, 0].repeat_interleave(d // 4, dim=0)[:, :length]
                y = fftconv(s, F.pad(h, (0, length - h.shape[1]))) + w[p + "filter.D"][:, None] * s
            else:
                lp, res = w[p + "filter.log_poles"], w[p + "filter.residues"]
                h = (res[..., None] * torch.exp(lp * t)).sum(1)
                y = fftconv(s, h) + w[p + "filter.D"][:, None] * s
            y = (x2 * y).transpose(1, 2) @ w[p + "out_filter_dense.weight"].T + w[p + "out_filter_dense.bias"]
        x = x + y
        u = norm(x, w[p + "post_norm.scale"])
        act = F.gelu if i == 0 else (lambda a: a)
        x = x + (act(u @ w[p + "mlp.l1.weight"].T) * (u @ w[p + "mlp.l2.weight"].T)) @ w[p + "mlp.l3.weight"].T
    return norm(x, w["norm.scale"]) @ w["embedding_layer.weight"].T


@pytest.fixture(scope="module")
def vortex(tmp_path_factory) -> tuple[Path, Path, dict]:
    folder = tmp_path_factory.mktemp("vortex")
    state = fake_evo2_state()
    torch.save(state, folder / "tiny.pt")
    (folder / "tiny.yml").write_text(yaml.safe_dump(CONFIG))
    return folder / "tiny.pt", folder / "tiny.yml", state


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / name), *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.mark.slow
def test_round_trip_scores_match_reference_and_export_is_identical(vortex, tmp_path):
    pt, cfg, state = vortex
    out = tmp_path / "dcp"
    proc = script("evo2_to_dcp.py", "--input", str(pt), "--config", str(cfg), "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "_extra_state" in proc.stderr and "blocks.2.filter.t" in proc.stderr  # dropped with a note
    meta = json.loads((out / "model_args.json").read_text())
    assert meta["model_name"] == "hyena" and meta["args"]["layout"] == KINDS

    g = torch.Generator().manual_seed(1)
    acgt = torch.tensor([65, 67, 71, 84])
    seqs = [acgt[torch.randint(0, 4, (n,), generator=g)].tolist() for n in (40, 33, 17)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"tokens": s}) + "\n" for s in seqs))
    proc = run_cli(["--checkpoint", str(out), "--tokens", str(tmp_path / "in.jsonl"),
                    "--output", str(tmp_path / "out.jsonl")], module="torchtitan_hyena.score")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored = [json.loads(line)["logprobs"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for seq, got in zip(seqs, scored):
        tokens = torch.tensor([seq])
        want = torch.log_softmax(reference_logits(state, tokens[:, :-1]), -1).gather(-1, tokens[:, 1:, None])
        assert torch.allclose(torch.tensor(got), want.flatten(), atol=2e-4), (len(seq), got[:3], want[0, :3, 0])

    back = tmp_path / "back.pt"
    proc = script("dcp_to_evo2.py", "--input_dir", str(out), "--output", str(back), "--yaml", str(tmp_path / "b.yml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = torch.load(back, weights_only=True)
    dropped = {"blocks.0.projections._extra_state", "unembed.weight", "blocks.2.filter.t"}
    assert set(exported) == set(state) - dropped
    for key, tensor in exported.items():
        assert tensor.dtype == state[key].dtype and torch.equal(tensor, state[key]), key
    again = evo2.args_from_vortex_config(yaml.safe_load((tmp_path / "b.yml").read_text()), "b.yml")
    assert again == evo2.load_config(str(cfg))[0]


def read_dcp(path: Path) -> dict[str, torch.Tensor]:
    from torchtitan_hyena.components.dcp_reader import load_dcp, read_dcp_metadata

    meta = read_dcp_metadata(path).state_dict_metadata
    sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()}
    load_dcp(sd, path)
    return sd


def test_byte_shards_and_folders_convert_like_the_single_file(vortex, tmp_path):
    pt, cfg, _ = vortex
    evo2.convert_evo2_to_dcp(pt, str(cfg), tmp_path / "single")
    data = pt.read_bytes()
    shards = tmp_path / "shards"
    shards.mkdir()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    for i in range(3):
        (shards / f"tiny.pt.part{i}").write_bytes(data[cut[i] : cut[i + 1]])
    evo2.convert_evo2_to_dcp(shards, str(cfg), tmp_path / "sharded")
    evo2.convert_evo2_to_dcp(shards / "tiny.pt.part1", str(cfg), tmp_path / "by_part")
    single = read_dcp(tmp_path / "single")
    for other in ("sharded", "by_part"):
        got = read_dcp(tmp_path / other)
        assert got.keys() == single.keys() and all(torch.equal(got[k], single[k]) for k in single)
    assert not list(shards.glob(".evo2-merge-*")) and not list(tmp_path.glob(".*partial*"))  # temp files gone


def bad_checkpoint(tmp_path: Path, edit) -> Path:
    state = fake_evo2_state()
    edit(state)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda sd: sd.pop("blocks.1.filter.D"), "lacks 1 tensor(s) the config needs (first: blocks.1.filter.D)"),
        (lambda sd: sd.update({"blocks.4.mlp.l1.weight": torch.zeros(40, 32)}), "has shape (40, 32)"),
        (
            lambda sd: sd.pop("blocks.3.inner_mha_cls.Wqkv.weight"),
            "the weights' layers read SDH?SDH, the config's SDH*SDH",
        ),
        (lambda sd: sd.update({"blocks.2.filter.log_poles": torch.ones(32, 16, 1)}), "non-negative log-poles"),
        (lambda sd: sd.update({"unembed.weight": torch.zeros(512, 32)}), "unembed.weight differs"),
    ],
)
def test_bad_weights_fail_with_one_line_and_leave_nothing(tmp_path, vortex, edit, fragment):
    path = bad_checkpoint(tmp_path, edit)
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        evo2.convert_evo2_to_dcp(path, str(vortex[1]), out)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_config_weights_mismatch_and_bad_files(tmp_path, vortex):
    pt, cfg, _ = vortex
    out = tmp_path / "out"
    cases = [
        (pt, "debugmodel", "the weights' layers read SDH*SDH, the config's SDH*SDH*"),
        (pt, "evo2_7b", "the weights' layers read SDH*SDH, the config's SDH*SDHSDH*"),
        (pt, "no_such_flavor", "neither a vortex YAML file nor a hyena flavor"),
    ]
    wide = dict(CONFIG, hidden_size=64, num_filters=64)
    (tmp_path / "wide.yml").write_text(yaml.safe_dump(wide))
    cases.append((pt, str(tmp_path / "wide.yml"), "the weights and --config describe different models"))
    (tmp_path / "flip.yml").write_text(yaml.safe_dump(dict(CONFIG, hyena_flip_x1x2=True)))
    cases.append((pt, str(tmp_path / "flip.yml"), "hyena_flip_x1x2 = True is not supported"))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    cases.append((tmp_path / "model.safetensors", str(cfg), "is not a .pt checkpoint"))
    (tmp_path / "junk.pt").write_bytes(b"not a zip file at all")
    cases.append((tmp_path / "junk.pt", str(cfg), "not a complete PyTorch checkpoint"))
    shards = tmp_path / "shards"
    shards.mkdir()
    data = pt.read_bytes()
    (shards / "m.pt.part0").write_bytes(data[: len(data) // 2])
    (shards / "m.pt.part1").write_bytes(data[len(data) // 2 : -100])  # truncated last shard
    cases.append((shards, str(cfg), "not a complete PyTorch checkpoint"))
    gap = tmp_path / "gap"
    gap.mkdir()
    (gap / "m.pt.part0").write_bytes(data)
    (gap / "m.pt.part2").write_bytes(data)
    cases.append((gap, str(cfg), "shard m.pt.part1 is missing"))
    cases.append((tmp_path / "absent.pt", str(cfg), "does not exist"))
    for path, config, fragment in cases:
        with pytest.raises(UserError) as e:
            evo2.convert_evo2_to_dcp(path, config, out)
        assert fragment in str(e.value) and "\n" not in str(e.value), (path, config, str(e.value))
        assert not out.exists() and not list(tmp_path.glob(".out.partial*")) and not list(shards.glob(".evo2*"))
    out.mkdir()
    (out / "x").write_text("keep")
    with pytest.raises(UserError, match="exists and is not empty"):
        evo2.convert_evo2_to_dcp(pt, str(cfg), out)


def test_rope_base_comes_from_the_checkpoint_inv_freq(vortex, tmp_path):
    """The 7B-1M YAML once said 1e11 while the weights hold base 1e4: the weights win."""
    pt, _, state = vortex
    (tmp_path / "c.yml").write_text(yaml.safe_dump(dict(CONFIG, rotary_emb_base=1e11)))
    args, _ = evo2.load_config(str(tmp_path / "c.yml"))
    evo2.vortex_to_model(state, args, "test")
    assert args.rope_theta == 10000


def test_cli_prints_one_line_error(tmp_path, vortex):
    proc = script("evo2_to_dcp.py", "--input", str(tmp_path / "x.bin"), "--config", str(vortex[1]),
                  "--output_dir", str(tmp_path / "o"))  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: --input") and not (tmp_path / "o").exists()


def test_export_errors(tmp_path):
    with pytest.raises(UserError, match="must end in .pt"):
        evo2.convert_dcp_to_evo2(tmp_path, tmp_path / "model.bin")
    with pytest.raises(UserError, match="does not exist"):
        evo2.convert_dcp_to_evo2(tmp_path / "missing", tmp_path / "model.pt")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "model_args.json").write_text(json.dumps({"model_name": "llama3", "args": {}}))
    with pytest.raises(UserError, match="exports hyena checkpoints only"):
        evo2.convert_dcp_to_evo2(tmp_path / "llama", tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()
