"""The plan-measuring harness on a real 4-rank gloo run: FSDP 2 x TP 2 of the debug Llama, 2 steps of 64 tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY, env

pytestmark = pytest.mark.slow


def test_fsdp_tp_step_is_measured(tmp_path):
    out = tmp_path / "measured.json"
    args = [*TINY, "--training.seq_len", "64", "--training.steps", "2", "--job.dump_folder", str(tmp_path / "run"),
            "--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "-m", "tests.helpers.plan_measure", str(out), "--", *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    records = json.loads(out.read_text())
    assert [r["rank"] for r in records] == [0, 1, 2, 3]
    for r in records:
        assert r["mesh"] == {"dp_shard": 2, "tp": 2}
        c = r["collectives"]
        for key in ("dp_shard/all_gather", "dp_shard/reduce_scatter", "tp/all_reduce"):
            assert c[key]["bytes"] > 0 and c[key]["calls"] > 0, key
        assert not any(k.startswith("other/") for k in c), c  # every group is named by the mesh
        assert r["peak_bytes"] > 0
        assert r["peak_breakdown"]["parameters"] > 0 and r["peak_breakdown"]["optimizer_state"] > 0
    # TP ranks hold equal shards: their bytes per key agree
    assert records[0]["collectives"] == records[1]["collectives"]
