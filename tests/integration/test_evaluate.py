"""Evaluation entry point: a checkpoint's loss on the held-out split equals what training validated."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY, run_cli

pytestmark = pytest.mark.slow


def test_evaluate_reproduces_the_validation_loss_of_a_checkpoint(tmp_path):
    validation = ["--validation.enable", "true", "--validation.freq", "2", "--validation.steps", "2"]
    train = run_cli([*TINY, *validation, "--training.steps", "2", "--checkpoint.enable", "true",
                     "--job.dump_folder", str(tmp_path / "run")])  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    (validated,) = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]

    step = tmp_path / "run" / "checkpoint" / "step-2"
    out = tmp_path / "eval"
    proc = run_cli([*TINY, "--validation.steps", "2", "--checkpoint.initial_load_path", str(step),
                    "--job.dump_folder", str(out)], module="torchtitan_hyena.evaluate")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and record["split"] == "test" and record["tokens"] == validated["tokens"]
    assert record["loss"] == validated["validation_loss"]
    assert not (out / "checkpoint").exists()  # evaluation never saves

    missing = run_cli([*TINY], module="torchtitan_hyena.evaluate")
    assert missing.returncode == 2 and "pass --checkpoint.initial_load_path" in missing.stderr
