"""Evo 2 (vortex) conversion: round trip through the CLIs and scoring against an independent vortex-style
forward written here from docs/stripedhyena2.md, plus one-line errors for bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, env, run_cli
from tests.helpers.evo2_ckpt import CONFIG, KINDS, fake_evo2_state, reference_logits
from torchtitan_hyena.convert import evo2
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.models.hyena.state_dict_adapter import VortexAdapter

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


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
    again = VortexAdapter.args_from_config(yaml.safe_load((tmp_path / "b.yml").read_text()), "b.yml")
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
    VortexAdapter(args).from_external(state, "test")
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
