"""Full-scale dry run on torch's fake process group: layouts, memory accounting and the verdict."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO, env, run_cli
from torchtitan_hyena.config import ConfigManager, JobConfig
from torchtitan_hyena.distributed.activation_checkpoint import apply_ac
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.models.llama3.activations import llama3_activations
from torchtitan_hyena.models.llama3.args import Llama3Args
from torchtitan_hyena.models.llama3.model import Transformer
from torchtitan_hyena.tools.activation_memory import ActivationInputs
from torchtitan_hyena.tools.dry_run import GIB, DryRunFlags, dry_run, run, split_flags
from torchtitan_hyena.tools.world_size import required_world_size

NEURAL_PILE = ["rodent_8B_131k", "primate_8B_131k", "rodent_primate_8B_131k", "lang_primate_8B_131k"]
# What this branch can run of the Neural Pile layout: FSDP/HSDP without tensor parallelism, 32k context.
FSDP_ONLY = [
    "--parallelism.tensor_parallel_degree", "1", "--parallelism.data_parallel_shard_degree", "256",
    "--parallelism.enable_loss_parallel", "false",
    "--training.local_batch_size", "1", "--training.global_batch_size", "512", "--training.seq_len", "32768",
]  # fmt: skip


def config(*args: str) -> JobConfig:
    return ConfigManager().parse_args(list(args))


def neural_pile(name: str, *overrides: str) -> JobConfig:
    return config("--job.config_file", str(REPO / "train_configs" / f"{name}.toml"), *overrides)


@pytest.mark.parametrize("config_file", sorted((REPO / "train_configs").glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_config_passes_at_its_real_world_size(config_file):
    c = config("--job.config_file", str(config_file))
    world = 8 if c.parallelism.data_parallel_shard_degree == -1 else required_world_size(c)
    try:
        report = dry_run(c, world)
    except ConfigError as e:
        if "is not available" in str(e):  # a parallelism this config needs has not landed in this build
            pytest.skip(f"{config_file.name} at {world} ranks: {e}")
        raise
    assert report.fits, report.table()


@pytest.mark.parametrize("name", NEURAL_PILE)
def test_neural_pile_fsdp_layout_at_512_ranks(name):
    report = dry_run(neural_pile(name, *FSDP_ONLY), 512)
    assert report.mesh == {"dp_replicate": 2, "dp_shard": 256}
    assert 6.9e9 < report.nparams < 7.1e9  # Llama-3-8B shape with a 256-token vocabulary
    # fp32 parameters sharded 256 ways; rank 0 holds the largest chunk of each, so a hair above the mean
    assert report.nparams * 4 / 256 <= report.param_bytes <= 1.01 * report.nparams * 4 / 256
    assert report.grad_bytes == report.param_bytes and report.optimizer_bytes == 2 * report.param_bytes
    assert report.fsdp_buffer_bytes > 0 and report.activations is not None
    assert report.fits and report.total_bytes < 64 * GIB, report.table()


def test_rejects_a_mesh_that_does_not_match_the_world_size():
    with pytest.raises(ConfigError, match=r"multiply to 512 .* world size is 256"):
        dry_run(neural_pile("rodent_8B_131k"), 256)


def test_rejects_a_layout_that_cannot_fit(capsys):
    big = neural_pile("rodent_8B_131k", *FSDP_ONLY[:6], "--training.global_batch_size", "2048")  # 4 x 131k per rank
    with pytest.raises(ConfigError) as err:
        run(big, DryRunFlags(world_size=512))
    message = str(err.value)
    assert "\n" not in message and "GiB per rank on 512 ranks but a mi250x has 64.0 GiB" in message
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_device_budget_decides_the_verdict():
    c = neural_pile("rodent_8B_131k", *FSDP_ONLY[:-2], "--training.seq_len", "131072")  # 1 x 131k per rank
    assert not dry_run(c, 512, "mi250x").fits  # ~76 GiB against 64
    assert dry_run(c, 512, "h100").fits and dry_run(c, 512, "h200").fits
    assert dry_run(c, 512, "1000").device_bytes == 1000 * GIB


def test_never_resharding_keeps_every_unit_gathered():
    base = dry_run(neural_pile("rodent_8B_131k", *FSDP_ONLY), 512)
    never = dry_run(neural_pile("rodent_8B_131k", *FSDP_ONLY, "--parallelism.fsdp_reshard_after_forward", "never"), 512)
    # bf16 copies of all 32 blocks (~14 GB) instead of two
    assert never.fsdp_buffer_bytes > base.fsdp_buffer_bytes + 12 * GIB


def test_lora_counts_gradients_and_optimizer_state_of_the_adapters_only():
    c = neural_pile("rodent_8B_131k", "--lora.enable", "true", "--lora.rank", "8")
    report = dry_run(c, required_world_size(c))  # the config's own TP x FSDP layout, adapters sharded with it
    assert report.optimizer_bytes == 2 * report.grad_bytes and report.grad_bytes < 0.02 * report.param_bytes
    assert 0 < report.trainable_params < 0.01 * report.nparams and "trainable, LoRA" in report.table()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--world_size", "8"], "--world_size only apply with --dry_run"),
        (["--dry_run", "--world_size", "eight"], "--world_size expects a positive integer"),
        (["--dry_run", "--device", "tpu"], "--device must be one of mi250x, mi300x, h100, h200"),
        (["--dry_run", "--world_size"], "--world_size needs a value"),
    ],
)
def test_flag_errors(args, fragment):
    with pytest.raises(ConfigError, match=fragment):
        split_flags(args)


def test_flags_are_removed_from_the_config_options():
    rest, flags = split_flags(["--job.config_file", "x.toml", "--dry_run", "--world_size=16", "--device", "h100"])
    assert rest == ["--job.config_file", "x.toml"] and flags == DryRunFlags(world_size=16, device="h100")
    assert split_flags(["--training.steps", "3"]) == (["--training.steps", "3"], None)


def saved_activation_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens)
        F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none").sum()
    return sum(seen.values())


@pytest.mark.parametrize(
    ("dtype", "mode", "option"),
    [(torch.float32, "none", "1"), (torch.bfloat16, "none", "1"), (torch.bfloat16, "full", "1"),
     (torch.float32, "selective", "2")],
)  # fmt: skip
def test_activation_model_matches_what_autograd_saves(dtype, mode, option):
    args = Llama3Args(dim=128, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=256, multiple_of=64, max_seq_len=256)
    model = Transformer(args)
    model.init_weights(seed=0)
    model = model.to(dtype)
    apply_ac(model.layers, mode, option)
    tokens = torch.randint(0, 256, (2, 256))
    measured = saved_activation_bytes(model, tokens)
    inputs = ActivationInputs(2, 256, tp=1, cp=1, act_bytes=dtype.itemsize, ac_mode=mode, ac_option=option,
                              loss_parallel=False)  # fmt: skip
    estimate = llama3_activations(args, inputs)
    assert abs(measured - estimate.saved) <= 0.03 * estimate.saved, (measured, estimate)


def test_cli_dry_run_touches_no_data_or_dump_folder(tmp_path):
    dump, hf = tmp_path / "dump", tmp_path / "hf"
    e = env()
    e.update(HF_HOME=str(hf), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "torchtitan_hyena.train", "--job.config_file", "train_configs/rodent_8B_131k.toml",
         "--dry_run", "--world_size", "512", *FSDP_ONLY, "--job.dump_folder", str(dump)],
        cwd=REPO, env=e, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verdict: FITS" in proc.stdout and "dp_replicate 2 x dp_shard 256" in proc.stdout
    assert not dump.exists() and not hf.exists()


def test_cli_rejects_wrong_world_size_in_one_line():
    proc = run_cli(["--job.config_file", "train_configs/rodent_8B_131k.toml", "--dry_run", "--world_size", "256"])
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "world size is 256" in errors[0]
