"""Checkpoint manager: seeding, completion markers, purging, async saves, one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.conftest import TINY, run_cli, torchrun_losses

pytestmark = pytest.mark.slow


def dcp_tensors(folder, tmp_path) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{folder.name}.pt"
    dcp_to_torch_save(str(folder), str(out))
    return torch.load(out, weights_only=False)


def test_seed_from_model_only_checkpoint_with_other_vocab(tmp_path):
    src = tmp_path / "src"
    proc = run_cli([*TINY, "--job.dump_folder", str(src), "--training.dataset", "mock", "--model.vocab_size", "300",
                    "--training.steps", "2", "--checkpoint.enable", "true", "--checkpoint.last_save_model_only", "true",
                    "--checkpoint.export_dtype", "bfloat16"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    seed = src / "checkpoint" / "step-2"
    saved = dcp_tensors(seed, tmp_path)
    assert "optimizer" not in json.dumps(list(saved)) and saved["layers.0.attention.wq.weight"].dtype == torch.bfloat16
    dst = tmp_path / "dst"
    proc = run_cli([*TINY, "--job.dump_folder", str(dst), "--training.steps", "1", "--optimizer.lr", "0",
                    "--checkpoint.enable", "true", "--checkpoint.initial_load_path", str(seed)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kept fresh init (shape differs): tok_embeddings.weight (300, 256) -> (256, 256)" in proc.stderr
    assert "output.weight (300, 256) -> (256, 256)" in proc.stderr
    trained = dcp_tensors(dst / "checkpoint" / "step-1", tmp_path)
    for key, value in saved.items():
        if key.startswith(("tok_embeddings", "output")):
            continue
        assert torch.equal(trained[key].to(torch.bfloat16), value), key  # lr 0: the seeded weights, unchanged


def test_incomplete_step_is_ignored_and_old_steps_purged(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "--job.dump_folder", str(run), "--checkpoint.enable", "true", "--checkpoint.interval", "2",
            "--checkpoint.keep_latest_k", "2", "--training.steps", "6"]  # fmt: skip
    (first,) = torchrun_losses(1, [args], tmp_path)
    steps = sorted(p.name for p in (run / "checkpoint").iterdir())
    assert steps == ["step-4", "step-6"]
    # A crash while writing step-8 leaves a folder without the marker: resume must skip it.
    shutil.copytree(run / "checkpoint" / "step-6", run / "checkpoint" / "step-8")
    (run / "checkpoint" / "step-8" / ".complete").unlink()
    proc = run_cli([*args[:-2], "--training.steps", "7"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ignoring incomplete checkpoint" in proc.stderr and "step-8" in proc.stderr
    assert "resumed from" in proc.stderr and "step-6" in proc.stderr
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()][-1] == 7


def test_async_saves_complete(tmp_path):
    runs = []
    for mode in ("async", "async_with_pinned_mem"):
        runs.append([*TINY, "--job.dump_folder", str(tmp_path / mode), "--checkpoint.enable", "true",
                     "--checkpoint.async_mode", mode, "--checkpoint.interval", "3", "--checkpoint.keep_latest_k", "0",
                     "--training.steps", "7"])  # fmt: skip
    plain = [*TINY, "--training.steps", "7", "--job.dump_folder", str(tmp_path / "plain")]
    a, b, c = torchrun_losses(1, [*runs, plain], tmp_path)
    assert a == b == c
    for mode in ("async", "async_with_pinned_mem"):
        folder = tmp_path / mode / "checkpoint"
        assert sorted(p.name for p in folder.iterdir()) == ["step-3", "step-6", "step-7"]
        assert all((p / ".complete").exists() for p in folder.iterdir())
    resumed = [*runs[0][:-2], "--training.steps", "9"]
    assert torchrun_losses(1, [resumed], tmp_path)[0]  # resumes from an async-written step


def _follow_rank0(rank: int, world: int, store_path: str, out: str) -> None:
    import torch.distributed as dist

    from torchtitan_hyena.components.checkpoint import _rank0_decides

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        # Rank 1 sees an older folder state (say, before rank 0 wrote step 6's marker).
        choice = _rank0_decides(lambda: (6, None) if dist.get_rank() == 0 else (4, None))
        torch.save(choice, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_rank_resumes_from_the_step_rank_0_chose(tmp_path):
    """Ranks listing the checkpoint folder on their own could pick different steps and deadlock in DCP."""
    out = str(tmp_path / "choice")
    torch.multiprocessing.spawn(_follow_rank0, args=(2, str(tmp_path / "store"), out), nprocs=2)
    assert [torch.load(f"{out}.{r}") for r in range(2)] == [(6, None), (6, None)]
