"""Data parallelism on real gloo processes matches one process with the same global batch."""

from __future__ import annotations

import pytest

from tests.conftest import TINY, assert_losses_close, torchrun_losses

pytestmark = pytest.mark.slow


def test_fsdp_and_hsdp_match_one_process(tmp_path):
    batch = ["--training.global_batch_size", "8", "--training.local_batch_size", "2"]
    (single,) = torchrun_losses(1, [[*TINY, *batch, "--job.dump_folder", str(tmp_path / "one")]], tmp_path)
    fsdp, hsdp = torchrun_losses(
        4,
        [
            [*TINY, *batch, "--parallelism.data_parallel_shard_degree", "4", "--job.dump_folder", str(tmp_path / "f")],
            [*TINY, *batch, "--parallelism.data_parallel_replicate_degree", "2",
             "--parallelism.data_parallel_shard_degree", "2", "--job.dump_folder", str(tmp_path / "h")],
        ],
        tmp_path,
    )  # fmt: skip
    assert single[-1] < single[0]
    assert_losses_close(fsdp, single, rtol=1e-5)
    assert_losses_close(hsdp, single, rtol=1e-5)
