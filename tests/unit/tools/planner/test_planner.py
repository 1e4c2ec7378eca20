"""The planner on one process: its memory model is the dry run's, its search keeps only layouts that run, and
its CLI writes a config that the dry run accepts; bad flags are one line."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from tests.conftest import REPO, env
from torchtitan_hyena import plan
from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.tools.dry_run import dry_run, target_accelerator
from torchtitan_hyena.tools.planner.census import take_census
from torchtitan_hyena.tools.planner.memory import peak_memory
from torchtitan_hyena.tools.planner.profiles import PROFILES, load_profile
from torchtitan_hyena.tools.planner.search import evaluate, global_batch_of, search
from torchtitan_hyena.tools.planner.step_time import step_time
from torchtitan_hyena.tools.world_size import required_world_size

LLAMA = ["--job.config_file", str(REPO / "train_configs" / "debug_model.toml")]
HYENA = ["--job.config_file", str(REPO / "train_configs" / "debug_hyena.toml"), "--validation.enable", "false"]
P = "--parallelism."
LAYOUTS = {
    "llama tp 2 x fsdp 4": [*LLAMA, f"{P}tensor_parallel_degree", "2", f"{P}data_parallel_shard_degree", "4"],
    "llama hsdp 2 x 2, full AC": [*LLAMA, f"{P}data_parallel_replicate_degree", "2", f"{P}data_parallel_shard_degree",
                                  "2", "--activation_checkpoint.mode", "full"],
    "llama pp 2 x fsdp 2, 1F1B": [*LLAMA, f"{P}pipeline_parallel_degree", "2", f"{P}data_parallel_shard_degree", "2",
                                  f"{P}pipeline_parallel_schedule", "1F1B", "--training.local_batch_size", "4",
                                  "--validation.enable", "false"],
    "hybrid cp 2 x tp 2 x fsdp 2": [*HYENA, f"{P}context_parallel_degree", "2", f"{P}tensor_parallel_degree", "2",
                                    f"{P}data_parallel_shard_degree", "2"],
    "hybrid pp 2 interleaved": [*HYENA, f"{P}pipeline_parallel_degree", "2", f"{P}data_parallel_shard_degree", "1",
                                f"{P}pipeline_parallel_schedule", "Interleaved1F1B",
                                "--training.local_batch_size", "4"],
}  # fmt: skip


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planner_memory_is_the_dry_runs(name):
    config = ConfigManager().parse_args(LAYOUTS[name])
    census = take_census(config, target_accelerator("mi250x"))
    report = dry_run(config, device="mi250x")
    predicted = peak_memory(census, config, report.device_bytes, global_batch_of(config, report.world_size))
    assert predicted["total"] == pytest.approx(report.total_bytes, rel=0.01)


def test_search_keeps_only_layouts_that_run_and_fit():
    config = ConfigManager().parse_args(HYENA)
    profile, target = PROFILES["h100"], target_accelerator("h100")
    census = take_census(config, target)
    ranked, rejected = search(census, config, 8, profile, target)
    assert ranked and sum(rejected.values()) > 0
    times = [c.time.seconds for c in ranked]
    assert all(a <= b + 1e-6 for a, b in zip(times, times[1:]))  # fastest first (ties: less memory first)
    for c in ranked[:3]:
        assert dry_run(c.config, 8, "h100").fits
        assert global_batch_of(c.config, 8) == global_batch_of(config, 8)
    own = evaluate(census, config, {}, 8, profile, target)
    assert not isinstance(own, str) and own.time.seconds >= ranked[0].time.seconds


def test_step_time_terms():
    """More devices on the same batch: less compute per device; TP traffic appears only with TP."""
    config = ConfigManager().parse_args(LLAMA)
    census = take_census(config, target_accelerator("h100"))
    one = step_time(census, config, PROFILES["h100"], 8)
    tp = ConfigManager().parse_args([*LLAMA, f"{P}tensor_parallel_degree", "2"])
    two = step_time(census, tp, PROFILES["h100"], 8)
    assert two.compute == pytest.approx(one.compute / 2)
    assert "tp/all_gather" in two.comm_bytes and "tp/all_gather" not in one.comm_bytes


def test_profile_from_measurements(tmp_path):
    comm = tmp_path / "comm_check.json"
    comm.write_text('{"bandwidth": [{"nodes_per_group": 1, "all_reduce": {"busbw_gbps": 90.0}, "all_gather": '
                    '{"busbw_gbps": 80.0}, "reduce_scatter": {"busbw_gbps": 70.0}}]}')  # fmt: skip
    assert load_profile("mi250x", str(comm)).intra_node_gbps == 90.0
    plain = tmp_path / "p.json"
    plain.write_text('{"efficiency": 0.25}')
    assert load_profile("h100", str(plain)).efficiency == 0.25
    plain.write_text('{"efficiency": -1}')
    with pytest.raises(Exception, match="efficiency must be a positive number"):
        load_profile("h100", str(plain))


def _plan(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torchtitan_hyena.plan", *args]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)


def test_cli_writes_a_config_the_dry_run_accepts(tmp_path):
    out = tmp_path / "planned.toml"
    proc = _plan(*HYENA, "--nodes", "1", "--device", "h100", "--top", "3", "--write", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "#1" in proc.stdout and "job" in proc.stdout and "verdict: FITS" in proc.stdout
    dry = [sys.executable, "-m", "torchtitan_hyena.train", "--job.config_file", str(out), "--dry_run"]
    dry += ["--device", "h100"]
    check = subprocess.run(dry, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    assert "on 8 ranks" in check.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--nodes N is required"),
        (["--nodes", "0"], "must be positive"),
        (["--nodes", "1", "--device", "tpu"], "--device must be one of"),
        (["--nodes", "1", "--profile", "/nonexistent.json"], "--profile /nonexistent.json"),
    ],
    ids=["no-nodes", "zero-nodes", "device", "profile"],
)
def test_bad_flags_are_one_line(args, message):
    proc = _plan(*LLAMA, *args)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr


FULL_SCALE = sorted(p.stem for p in (REPO / "train_configs").glob("*.toml") if not p.stem.startswith("debug"))


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_SCALE)
def test_best_layout_of_every_full_scale_config_passes_the_full_size_dry_run(name, capsys):
    """At the config's own node count; the planner itself dry-runs its best layout and fails if it does not fit."""
    config = ConfigManager().parse_args(["--job.config_file", str(REPO / "train_configs" / f"{name}.toml")])
    nodes = required_world_size(config) // PROFILES["mi250x"].gpus_per_node
    ranked, own = plan.run(config, argparse.Namespace(nodes=nodes, device="mi250x", top=1, write="", profile=""))
    assert "verdict: FITS" in capsys.readouterr().out
    assert not isinstance(own, str), own  # the hand-set layout runs and fits too
    assert ranked[0].time.seconds <= own.time.seconds
