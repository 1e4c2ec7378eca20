"""Preemption (SIGTERM/SIGUSR1 -> checkpoint, exit 75, resume) and non-finite losses (stop or skip)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, TINY, env, run_cli, torchrun_losses
from torchtitan_hyena.components.checkpoint import COMPLETE_MARKER
from torchtitan_hyena.components.resilience import EXIT_NONFINITE, EXIT_PREEMPTED

pytestmark = pytest.mark.slow


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fault_runs(nproc: int, scenarios: list[dict], tmp_path) -> list[list[dict]]:
    """Per scenario, the record of every rank (tests/helpers/fault_run.py)."""
    spec, out = tmp_path / "scenarios.json", tmp_path / "out.json"
    spec.write_text(json.dumps(scenarios))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "tests.helpers.fault_run", str(spec), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


def test_sigterm_checkpoints_exits_75_and_resumes_with_the_same_next_loss(tmp_path):
    run = tmp_path / "run"
    ckpt = ["--checkpoint.enable", "true", "--checkpoint.interval", "1000", "--metrics.log_freq", "1"]
    args = [*TINY, *ckpt, "--training.steps", "60", "--job.dump_folder", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "torchtitan_hyena.train", *args], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.jsonl").exists() or len(read_jsonl(run / "metrics.jsonl")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    k = read_jsonl(run / "metrics.jsonl")[-1]["step"]
    assert 2 <= k < 60
    assert (run / "checkpoint" / f"step-{k}" / COMPLETE_MARKER).exists()
    assert f"stop signal after step {k}: saved checkpoint" in stderr

    stop = ["--training.stop_at_step", str(k + 2)]
    reference = [*TINY, "--training.steps", "60", *stop, "--job.dump_folder", str(tmp_path / "ref")]
    resumed_args = [*args, *stop]
    resumed, full = torchrun_losses(1, [resumed_args, reference], tmp_path)
    assert resumed == full[k : k + 2]  # bit-identical: weights, optimizer, schedule and data position restored


@pytest.fixture(scope="module")
def two_rank_faults(tmp_path_factory) -> tuple[dict[str, list[dict]], object]:
    """Four fault scenarios in one 2-rank torchrun job (one start-up for all): name -> every rank's record."""
    tmp = tmp_path_factory.mktemp("faults")
    base = [*TINY, "--training.local_batch_size", "2", "--training.global_batch_size", "4", "--training.steps", "4",
            "--checkpoint.enable", "true", "--checkpoint.interval", "2"]  # fmt: skip
    skip = ["--training.on_nonfinite_loss", "skip"]
    scenarios = {
        "signal": {"args": [*base, "--checkpoint.interval", "100", "--job.dump_folder", str(tmp / "signal")],
                   "signal": {"rank": 1, "step": 3, "signum": "SIGUSR1"}},
        "stop": {"args": [*base, "--job.dump_folder", str(tmp / "stop")], "nan": {"rank": 0, "steps": [3]}},
        "skip": {"args": [*base, *skip, "--training.max_nonfinite_skips", "2", "--job.dump_folder", str(tmp / "s")],
                 "nan": {"rank": 0, "steps": [2, 3]}},
        "over_limit": {"args": [*base, *skip, "--training.max_nonfinite_skips", "1",
                                "--job.dump_folder", str(tmp / "o")], "nan": {"rank": 0, "steps": [2, 3]}},
    }  # fmt: skip
    results = fault_runs(2, list(scenarios.values()), tmp)
    return dict(zip(scenarios, results)), tmp


def test_a_signal_on_one_rank_stops_all_ranks_after_the_same_step(two_rank_faults):
    results, tmp = two_rank_faults
    assert [(r["step"], r["preempted"]) for r in results["signal"]] == [(3, True), (3, True)]
    assert (tmp / "signal" / "checkpoint" / "step-3" / COMPLETE_MARKER).exists()


def test_nonfinite_loss_stops_or_skips(two_rank_faults):
    results, tmp = two_rank_faults
    # stop (default): a NaN on one rank stops every rank at that step; step-2's next step was not finite
    for r in results["stop"]:
        assert r["step"] == 3 and r["error"] is not None
        assert r["error"].startswith("non-finite loss nan")
        assert "at step 3 (training.on_nonfinite_loss = stop): stopped before updating the weights" in r["error"]
        assert f"no checkpoint is known good: {tmp / 'stop' / 'checkpoint' / 'step-2'} may hold" in r["error"]
    assert not (tmp / "stop" / "checkpoint" / "step-3").exists()
    # skip: the bad steps leave the weights untouched, training carries on to the end
    for r in results["skip"]:
        assert r["error"] is None and r["step"] == 4 and r["skipped"] == [2, 3] and r["unchanged_steps"] == [2, 3]
        assert [math.isfinite(x) for x in r["losses"]] == [True, False, False, True]
    # skip with a limit: the second bad step is one too many
    for r in results["over_limit"]:
        assert r["step"] == 3 and r["skipped"] == [2]
        assert "at step 3 after 1 skipped steps (training.max_nonfinite_skips = 1)" in r["error"]


def test_nonfinite_loss_exit_status_and_message_from_the_cli(tmp_path):
    # lr 1e30 blows the weights up after step 1: a real NaN gradient at step 2, no injection needed
    proc = run_cli([*TINY, "--checkpoint.enable", "true", "--checkpoint.interval", "1", "--optimizer.lr", "1e30",
                    "--lr_scheduler.warmup_steps", "0", "--training.steps", "5",
                    "--job.dump_folder", str(tmp_path / "run")])  # fmt: skip
    assert proc.returncode == EXIT_NONFINITE, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "at step 2 (training.on_nonfinite_loss = stop)" in errors[0]
    assert f"no checkpoint is known good: {tmp_path / 'run' / 'checkpoint' / 'step-1'} may hold" in errors[0]


def test_nonfinite_advice_names_the_newest_checkpoint_whose_next_step_was_finite(tmp_path):
    """Weights saved just before a bad step may already be wrecked: the advice only vouches for checkpoints whose
    next step ran finite (and was not skipped)."""
    from types import SimpleNamespace

    from torchtitan_hyena.components.resilience import NonFiniteGuard

    for step in (2, 4, 6):
        (tmp_path / f"step-{step}").mkdir()
        (tmp_path / f"step-{step}" / COMPLETE_MARKER).write_text(f"{step}\n")
    guard = NonFiniteGuard("skip", 10, SimpleNamespace(enabled=True, folder=tmp_path, wait=lambda: None))
    advice = guard.checkpoint_advice(bad_step=7)
    assert f"{tmp_path / 'step-6'} may hold the diverged weights" in advice
    assert f"finite is {tmp_path / 'step-4'}: restart with --checkpoint.load_step 4" in advice
    guard.skipped = [5]  # step 5 ran on step-4's weights but was skipped: not evidence
    assert f"finite is {tmp_path / 'step-2'}:" in guard.checkpoint_advice(bad_step=7)
    assert guard.checkpoint_advice(bad_step=9).endswith(f"finite is {tmp_path / 'step-6'}; a restart resumes from it")
