"""Shared fixtures: how tests run the trainer in-process, as a CLI, and under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "assets" / "neural_pile_sample"

# Tiny, fast settings on top of debug_model.toml: fp32 and deterministic so runs compare exactly.
TINY = [
    "--job.config_file", str(REPO / "train_configs" / "debug_model.toml"),
    "--job.print_config", "false",
    "--training.seq_len", "128",
    "--training.local_batch_size", "2",
    "--training.steps", "10",
    "--training.mixed_precision_param", "float32",
    "--training.deterministic", "true",
    "--metrics.enable_tensorboard", "false",
    "--validation.enable", "false",
    "--checkpoint.enable", "false",
]  # fmt: skip


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    e["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    return e


def run_cli(args: list[str], module: str = "torchtitan_hyena.train", timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` in a fresh process; returns the completed process."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout
    )


def torchrun_losses(
    nproc: int, runs: list[list[str]], tmp_path: Path, timeout: int = 900, grads_dir: Path | None = None
) -> list[list[float]]:
    """Per-step rank-0 losses of each config in ``runs``, all run in one torchrun job of ``nproc`` ranks.
    ``grads_dir``: also save each run's whole gradients after step 1 there, as ``<run index>.pt``."""
    return [r["losses"] for r in torchrun_runs(nproc, runs, tmp_path, timeout, grads_dir)]


def torchrun_runs(
    nproc: int, runs: list[list[str]], tmp_path: Path, timeout: int = 900, grads_dir: Path | None = None
) -> list[dict]:
    """``{"losses", "grad_norms", "steps"}`` (rank 0, per step) of each config in ``runs``, in one torchrun job."""
    runs_file, out_file = tmp_path / "runs.json", tmp_path / "out.json"
    runs_file.write_text(json.dumps(runs))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", "tests.helpers.multi_run", str(runs_file), str(out_file), *([str(grads_dir)] if grads_dir else []),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out_file.read_text())


def assert_losses_close(actual: list[float], expected: list[float], rtol: float) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        assert abs(a - e) <= rtol * abs(e), f"step {step}: {a} vs {e} (rel {abs(a - e) / abs(e):.2e} > {rtol})"


def pytest_configure(config: pytest.Config) -> None:
    """Without a GPU, Triton kernels run under the interpreter; it must be chosen before any kernel is decorated."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def tiny_args(tmp_path: Path) -> list[str]:
    return [*TINY, "--job.dump_folder", str(tmp_path / "run")]
