"""The planner's predictions against what the code does: one 4-rank gloo job measures step 2 of six layouts (TP,
CP and PP with FSDP, for each family; ``tests/helpers/plan_measure.py``: every collective counted by
``distributed/comm_counter.py``, peak tensor memory by torch's MemTracker) and the planner predicts the same step
from its census.

* Bytes: every collective of every mesh dimension within 5% (only the scalar loss / grad-norm all-reduces, a few
  bytes, are not modelled).
* Peak memory: the dry run's model (which the planner uses), without its runtime reserve, within 15% of the peak
  of live tensors.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY, env
from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.tools.dry_run import target_accelerator
from torchtitan_hyena.tools.planner.census import take_census
from torchtitan_hyena.tools.planner.memory import rank_memory
from torchtitan_hyena.tools.planner.search import global_batch_of
from torchtitan_hyena.tools.planner.traffic import step_traffic

pytestmark = pytest.mark.slow

HYENA = ["--job.config_file", str(REPO / "train_configs" / "debug_hyena.toml")]
SHORT = ["--training.seq_len", "64", "--training.steps", "2"]
LAYOUTS = {
    "llama fsdp 2 x tp 2": ["--parallelism.data_parallel_shard_degree", "2",
                            "--parallelism.tensor_parallel_degree", "2"],
    "hybrid fsdp 2 x tp 2": [*HYENA, "--parallelism.data_parallel_shard_degree", "2",
                             "--parallelism.tensor_parallel_degree", "2"],
    "hybrid fsdp 2 x cp 2": [*HYENA, "--parallelism.data_parallel_shard_degree", "2",
                             "--parallelism.context_parallel_degree", "2"],
    "llama pp 2 x fsdp 2": ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree",
                            "2", "--parallelism.pipeline_parallel_schedule", "GPipe"],
    "llama fsdp 2 x cp 2": ["--parallelism.data_parallel_shard_degree", "2",
                            "--parallelism.context_parallel_degree", "2"],
    "hybrid pp 2 x fsdp 2": [*HYENA, "--parallelism.pipeline_parallel_degree", "2",
                             "--parallelism.data_parallel_shard_degree", "2",
                             "--parallelism.pipeline_parallel_schedule", "1F1B"],
}  # fmt: skip
SCALARS = 100  # bytes: loss, token count and grad-norm all-reduces


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planner")
    runs = [[*TINY, *args, *SHORT, "--job.dump_folder", str(tmp / str(i))] for i, args in enumerate(LAYOUTS.values())]
    (tmp / "runs.json").write_text(json.dumps(runs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "-m", "tests.helpers.plan_measure", str(tmp / "out.json"), str(tmp / "runs.json")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return dict(zip(LAYOUTS, json.loads((tmp / "out.json").read_text()), strict=True)), runs


def _ranks(measured, name):
    """(config, census, global batch, [(pipeline rank, measured record)] for every rank) of a measured layout."""
    records, runs = measured
    config = ConfigManager().parse_args(runs[list(LAYOUTS).index(name)])
    census = take_census(config, target_accelerator("mi250x"))
    per_stage = 4 // config.parallelism.pipeline_parallel_degree
    return config, census, global_batch_of(config, 4), [(r // per_stage, rec) for r, rec in enumerate(records[name])]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_predicted_collective_bytes_match_the_counted_ones(measured, name):
    config, census, batch, ranks = _ranks(measured, name)
    # the counter names the FSDP group by its mesh dimension when CP does not widen it
    fsdp = "dp_shard_cp" if config.parallelism.context_parallel_degree > 1 else "dp_shard"
    for pp_rank, record in ranks:
        predicted = step_traffic(census, config, pp_rank, batch)
        counted = {
            key.replace(f"{fsdp}/", "dp_shard_cp/"): v["bytes"]
            for key, v in record["collectives"].items()
            if v["bytes"] > SCALARS and not key.endswith("/recv")
        }
        assert set(counted) == set(predicted), (name, pp_rank, counted, dict(predicted))
        for key, nbytes in counted.items():
            assert predicted[key] == pytest.approx(nbytes, rel=0.05), (name, pp_rank, key, predicted[key], nbytes)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_predicted_peak_memory_matches_the_measured_peak(measured, name):
    config, census, batch, ranks = _ranks(measured, name)
    for pp_rank, record in ranks:
        predicted = rank_memory(census, config, pp_rank, 0, batch)["total"]  # no runtime reserve
        assert predicted == pytest.approx(record["peak_bytes"], rel=0.15), (name, pp_rank, record["peak_breakdown"])
