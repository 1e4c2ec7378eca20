"""Communication self-test: the acceptance command under torchrun, a group that cannot form, flag parsing and the
TCP-fallback warning."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, env
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.tools import comm_check

DEBUG = ["--job.config_file", str(REPO / "train_configs" / "debug_model.toml")]


@pytest.mark.slow
def test_torchrun_4_ranks_prints_a_bandwidth_row_per_mesh_dimension(tmp_path):
    """The acceptance command (FSDP 2 x TP 2 on 4 CPU ranks with gloo), with a small output folder."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "-m", "torchtitan_hyena.tools.comm_check", *DEBUG, "--parallelism.data_parallel_shard_degree", "2",
           "--parallelism.tensor_parallel_degree", "2", "--job.dump_folder", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("dp_shard ", "tp "))]
    assert sorted({row[0] for row in rows}) == ["dp_shard", "tp"] and len(rows) == 4  # 2 sizes per dimension
    assert all(float(value) > 0 for row in rows for value in row[5:8])
    report = json.loads((tmp_path / "comm_check.json").read_text())
    assert [w["group"] for w in report["warmup"]] == ["world", "dp_shard", "tp"]
    assert {r["dimension"] for r in report["bandwidth"]} == {"dp_shard", "tp"} and report["warnings"] == []
    assert "warmed up world (4 ranks)" in proc.stderr and "Traceback" not in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_group_that_cannot_form_fails_in_one_line_within_its_timeout(tmp_path):
    """Rank 1 never joins the first collective of the world group: both ranks end with one line naming it after
    the 3 s deadline. (On 2 ranks every 1-D mesh dimension is the world group; the loop is the same for all.)"""
    port, procs = _free_port(), []
    args = [*DEBUG, "--parallelism.tensor_parallel_degree", "2", "--comm.warmup_timeout_seconds", "3",
            "--job.dump_folder", str(tmp_path)]  # fmt: skip
    for rank in range(2):
        e = {**env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port), "NCCL_SOCKET_IFNAME": "hsn0"}  # fmt: skip
        cmd = [sys.executable, "-m", "tests.helpers.skip_group", "1", "world", *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    for rank, (p, (_, stderr)) in enumerate(zip(procs, outputs)):
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in stderr, f"rank {rank}: {stderr}"
        assert errors[0].startswith("error: the first collective of mesh group 'world' (ranks [0, 1]) did not "
                                    "complete within 3 s (comm.warmup_timeout_seconds)")  # fmt: skip
        assert "NCCL_SOCKET_IFNAME=hsn0" in errors[0] and "NCCL_NET=(unset)" in errors[0]
    assert not (tmp_path / "comm_check.json").exists()


def test_a_timeout_costs_the_groups_own_deadline(monkeypatch, capsys):
    """A group that never completes ends the process after timeout_s (not the backend's 30-minute timeout), in one
    line naming the group and its ranks."""
    from torchtitan_hyena.distributed import warmup

    groups = [("world", object()), ("tp", object())]
    monkeypatch.setattr(warmup, "mesh_groups", lambda pd: groups)
    monkeypatch.setattr(warmup.dist, "get_process_group_ranks", lambda group: [2, 3])

    def first_collective(group, device, outcome):  # world completes, tp never does
        if group is groups[0][1]:
            outcome["done"].set()

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(warmup, "_first_collective", first_collective)
    monkeypatch.setattr(warmup.os, "_exit", exit_now)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        warmup.warm_up(None, None, 0.3)
    assert stop.value.code == 2 and 0.3 <= time.perf_counter() - start < 5
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        "error: the first collective of mesh group 'tp' (ranks [2, 3]) did not complete within 0.3 s"
    )


def test_flags_are_split_from_config_options():
    argv = ["--sizes_mib", "1,16", "--training.steps", "3", "--iters=4", "--min_internode_gbps", "5",
            "--output", "x.json", "--validation.steps", "-1"]  # fmt: skip
    rest, flags = comm_check.split_flags(argv)
    assert rest == ["--training.steps", "3", "--validation.steps", "-1"]
    assert (flags.sizes_mib, flags.iters, flags.min_internode_gbps, flags.output) == ([1.0, 16.0], 4, 5.0, "x.json")
    for bad, fragment in ((["--iters", "0"], "a positive integer"), (["--sizes_mib", "1,x"], "MiB sizes"),
                          (["--min_internode_gbps", "-1"], ">= 0"), (["--output"], "needs a value")):  # fmt: skip
        with pytest.raises(ConfigError, match=fragment):
            comm_check.split_flags(bad)


def _record(dim: str, nodes: int, busbw: float) -> dict:
    return {"dimension": dim, "nodes_per_group": nodes, **{op: {"busbw_gbps": busbw} for op in comm_check.OPS}}


def test_slow_inter_node_bandwidth_warns_with_the_likely_cause():
    records = [_record("tp", 1, 0.5), _record("dp_shard", 32, 1.2), _record("dp_shard", 32, 2.0),
               _record("dp_replicate", 2, 40.0)]  # fmt: skip
    (warning,) = comm_check.internode_warnings(records, 5)
    assert warning.startswith("inter-node bandwidth of mesh dimension 'dp_shard' (32 nodes per group) peaks at 2.00")
    assert "TCP sockets" in warning and "NCCL_NET=OFI" in warning and "aws_ofi_rccl.sh" in warning
    assert comm_check.internode_warnings(records, 0) == []  # no threshold, no warning
    assert comm_check.bus_factor("all_reduce", 4) == 1.5 and comm_check.bus_factor("all_gather", 4) == 0.75
