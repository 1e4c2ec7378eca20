"""End-to-end training runs on the bundled sample (CPU, gloo)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, TINY, assert_losses_close, run_cli, torchrun_losses

pytestmark = pytest.mark.slow


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_debug_model_trains_30_steps(tmp_path):
    """The shipped debug config with its logging, validation and checkpointing (on 128-token sequences)."""
    out = tmp_path / "run"
    proc = run_cli(["--job.config_file", "train_configs/debug_model.toml", "--training.steps", "30",
                    "--training.seq_len", "128", "--job.dump_folder", str(out)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    for key in ("step", "loss", "grad_norm", "lr", "tokens_per_sec", "mfu", "memory_gib", "elapsed_s"):
        assert key in records[-1]
    assert records[-1]["mfu"] is None  # CPU: unknown peak FLOPs
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert any((out / "tb").iterdir())
    step30 = out / "checkpoint" / "step-30"
    assert (step30 / ".complete").exists() and (step30 / ".metadata").exists() and (step30 / "model_args.json").exists()
    assert not (out / "checkpoint" / "step-10").exists()  # keep_latest_k = 2
    assert read_jsonl(out / "validation.jsonl")[-1]["validation_loss"] < 3.0


def test_resume_is_bit_exact(tmp_path):
    ckpt = ["--checkpoint.enable", "true", "--checkpoint.interval", "10", "--checkpoint.keep_latest_k", "0"]
    full = [*TINY, *ckpt, "--training.steps", "20", "--job.dump_folder", str(tmp_path / "full")]
    first = [*TINY, *ckpt, "--training.steps", "20", "--training.stop_at_step", "10",
             "--job.dump_folder", str(tmp_path / "split")]  # fmt: skip
    second = [*TINY, *ckpt, "--training.steps", "20", "--job.dump_folder", str(tmp_path / "split")]
    full_losses, first_losses, resumed = torchrun_losses(1, [full, first, second], tmp_path)
    assert len(resumed) == 10
    assert first_losses == full_losses[:10]
    assert resumed == full_losses[10:]  # bit-identical, data stream included
    records = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 21))


def test_compile_and_activation_checkpointing_match_eager(tmp_path):
    variants = [
        [],
        ["--compile.enable", "true"],
        ["--activation_checkpoint.mode", "full"],
        ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"],
        ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "2"],
    ]
    runs = [[*TINY, *v, "--job.dump_folder", str(tmp_path / f"v{i}")] for i, v in enumerate(variants)]
    eager, *others = torchrun_losses(1, runs, tmp_path)
    assert eager[-1] < eager[0]
    for losses in others:
        assert_losses_close(losses, eager, rtol=1e-4)


def test_run_train_sh_forwards_arguments(tmp_path):
    import os
    import subprocess

    from tests.conftest import env

    e = env()
    e.update(NGPU="1", CONFIG_FILE="train_configs/debug_model.toml")
    proc = subprocess.run(["bash", str(REPO / "run_train.sh"), *TINY[2:], "--training.steps", "2",
                           "--job.dump_folder", str(tmp_path / "sh")], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_jsonl(tmp_path / "sh" / "metrics.jsonl")) == 2
    assert os.access(REPO / "run_train.sh", os.X_OK)
