"""Async checkpoints at several ranks: saves every step finish (no rank waits in a collective the others skipped), and
kill -9 at random moments during background saves always resumes from the newest complete step, bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, env, torchrun_losses
from torchtitan_hyena.components.checkpoint import step_folders

pytestmark = pytest.mark.slow

MODES = ("async", "async_with_pinned_mem")
EVERY_STEP = ["--training.seq_len", "32", "--checkpoint.enable", "true", "--checkpoint.interval", "1"]


def test_saving_every_step_in_each_async_mode_finishes_at_4_ranks(tmp_path):
    """FSDP 2 x TP 2 and HSDP 2 x 2, each mode, 20 steps with a background save every step: one torchrun job."""
    layouts = {
        "fsdp_tp": ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2"],
        "hsdp": ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "2"],
    }
    runs, folders = [], []
    for name, layout in layouts.items():
        for mode in MODES:
            folders.append(tmp_path / f"{name}_{mode}")
            runs.append([*TINY, *layout, *EVERY_STEP, "--training.steps", "20", "--checkpoint.async_mode", mode,
                         "--checkpoint.keep_latest_k", "2", "--job.dump_folder", str(folders[-1])])  # fmt: skip
    fsdp_tp_async, fsdp_tp_pinned, hsdp_async, hsdp_pinned = torchrun_losses(4, runs, tmp_path)
    assert len(fsdp_tp_async) == 20 and fsdp_tp_async == fsdp_tp_pinned and hsdp_async == hsdp_pinned
    for folder in folders:  # every step was finalized (and the older ones purged), none left incomplete
        assert sorted(p.name for p in (folder / "checkpoint").iterdir()) == ["step-19", "step-20"]
        assert sorted(step_folders(folder / "checkpoint")) == [19, 20]


def _poll_with_skewed_completion(rank: int, store: str, out: str) -> None:
    """Rank 0's background write is done at the first step boundary, rank 1's only two steps later; every step
    ends with the next step's collective, as training does."""
    import threading
    from concurrent.futures import Future

    import torch
    import torch.distributed as dist

    from torchtitan_hyena.components.checkpoint import CheckpointManager
    from torchtitan_hyena.config.job_config import Checkpoint

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    manager = CheckpointManager(config=Checkpoint(enable=True, async_mode="async"), dump_folder=Path(out),
                                model_parts=[], optimizers=None, lr_schedulers=None, dataloader=None,
                                train_state=None, model_info=("", "", None), job_config_dict={})  # fmt: skip
    finalized: list[int] = []  # the step boundary of each finalization
    manager._finalize = lambda step, path: finalized.append(len(boundaries))
    boundaries: list[int] = []
    future: Future = Future()
    if rank == 0:
        future.set_result(None)
    else:
        threading.Timer(1.0, future.set_result, args=(None,)).start()
    manager._pending = (7, Path(out) / "step-7", future)
    for boundary in range(6):
        manager.poll()
        boundaries.append(boundary)
        dist.all_reduce(torch.ones(1))  # the next step's collectives
        time.sleep(0.4)
    manager.close()
    Path(f"{out}.{rank}").write_text(json.dumps(finalized))
    dist.destroy_process_group()


def test_ranks_finalize_a_background_save_at_the_same_step_boundary(tmp_path):
    """A rank whose write finished first must not finalize (and wait in a collective) alone: with per-rank
    finalizing, rank 0 would sit in the checkpoint barrier while rank 1 waits in the next step's all-reduce."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "finalized")
    context = mp.spawn(_poll_with_skewed_completion, args=(str(tmp_path / "store"), out), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError("the ranks deadlocked")
    first, second = (json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2))
    assert first == second and len(first) == 1 and first[0] >= 2  # once, together, after rank 1's write finished


# ------------------------------------------------------------------------------------------ kill -9 loop
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], logs: Path, tag: str) -> list[subprocess.Popen]:
    """Two trainer ranks as plain processes (no torchrun to restart or reap them), each leading its own process
    group: its checkpoint writer process, if any, stays in that group."""
    port, procs = _free_port(), []
    for rank in range(2):
        e = {**env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port)}  # fmt: skip
        out = (logs / f"{tag}.rank{rank}.log").open("w")
        procs.append(subprocess.Popen([sys.executable, "-m", "torchtitan_hyena.train", *args], cwd=REPO, env=e,
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
    return procs


def _live_members(group: int) -> list[int]:
    """Processes of a process group that are not zombies (orphans may wait for a reaper that never comes)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _losses(metrics: Path) -> list[tuple[int, float]]:
    records = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by kill -9
            continue
        records.append((record["step"], record["loss"]))
    return records


def test_kill_9_during_async_saves_resumes_from_the_last_complete_step_bit_exactly(tmp_path):
    """10 kills of both ranks at random moments while saves run in the background (the modes alternate), each
    followed by a resume; then every loss ever logged must equal the uninterrupted run's at that step."""
    steps = 40  # the LR schedule's length; the runs stop long before (training.stop_at_step keeps the schedule)
    base = [*TINY, *EVERY_STEP, "--training.steps", str(steps), "--checkpoint.keep_latest_k", "3"]
    run, rng = tmp_path / "run", random.Random(0)
    folder = run / "checkpoint"
    for kill in range(10):
        mode = MODES[kill % 2]
        resume = max(step_folders(folder), default=None)
        procs = _launch([*base, "--checkpoint.async_mode", mode, "--job.dump_folder", str(run)], tmp_path, f"k{kill}")
        deadline = time.monotonic() + 300
        # a background save has completed in this run: the writers are up, the next save is in flight
        while max(step_folders(folder), default=-1) <= (resume or 0):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise AssertionError((tmp_path / f"k{kill}.rank0.log").read_text()[-3000:])
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.5))
        writers = [pid for p in procs for pid in _live_members(p.pid) if pid != p.pid]
        assert writers or mode == "async", "no checkpoint writer process to outlive the trainer"
        assert all(p.poll() is None for p in procs), "training finished before the kill; raise the step count"
        # what the run logged while it was whole; a writer whose peer writer dies first may log the lost
        # connection before it ends with its own trainer, and that belongs to the kill, not to the run
        before_kill = [(tmp_path / f"k{kill}.rank{rank}.log").read_text() for rank in range(2)]
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()
        deadline = time.monotonic() + 30
        while any(_live_members(p.pid) for p in procs):  # the writers end with their trainers
            assert time.monotonic() < deadline, f"writer processes outlived their trainers: {writers}"
            time.sleep(0.1)
        for log in before_kill:
            assert "Traceback" not in log and "Broken pipe" not in log and "ERROR" not in log, log[-3000:]
        if resume is not None:  # the newest complete step at the previous kill
            assert f"resumed from {folder / f'step-{resume}'}" in (tmp_path / f"k{kill}.rank0.log").read_text()

    resume = max(step_folders(folder))
    stop = ["--training.stop_at_step", str(resume + 2)]
    final = _launch([*base, *stop, "--checkpoint.async_mode", "async", "--job.dump_folder", str(run)], tmp_path, "end")
    assert [p.wait(timeout=600) for p in final] == [0, 0], (tmp_path / "end.rank0.log").read_text()[-3000:]
    assert f"resumed from {folder / f'step-{resume}'}" in (tmp_path / "end.rank0.log").read_text()
    reference = _launch([*base, *stop, "--checkpoint.enable", "false", "--job.dump_folder", str(tmp_path / "ref")],
                        tmp_path, "ref")  # fmt: skip
    assert [p.wait(timeout=600) for p in reference] == [0, 0]
    expected = dict(_losses(tmp_path / "ref" / "metrics.jsonl"))
    seen = _losses(run / "metrics.jsonl")
    assert {s for s, _ in seen} == set(range(1, resume + 3))
    for step, loss in seen:  # every execution of every step, across all resumes, as in the uninterrupted run
        assert loss == expected[step], f"step {step}: {loss} != {expected[step]}"
