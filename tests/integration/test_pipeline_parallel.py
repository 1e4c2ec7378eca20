"""Pipeline parallelism against one process, and checkpoints across pipeline and non-pipeline layouts.

The debug Llama and hybrid under PP 2 (GPipe and 1F1B), PP 2 x FSDP 2, PP 2 x TP 2, PP 2 x HSDP 2 with compiled
blocks (aot_eager) and a looped schedule
(Interleaved1F1B, 4 stages) over PP 2 x CP 2 with full activation checkpointing: the first 10 of the 20 steps of
``tests/integration/test_baselines.py``'s settings (same schedule, so the same learning rates), compared with the stored
one-process curves (no extra run). The stored curves ran 2 accumulation steps of 1 sequence; a pipeline with 2
microbatches of 1 sequence takes the same batches, summed in another order. Where the environment matches the
recording one the loss must agree within 1e-5 relative (measured: <= 8.3e-6, PP 2 x FSDP 2 Llama); elsewhere the
baselines' cross-environment tolerance is added.

Checkpoints: the hybrid (tied embeddings: the last stage holds a copy) saved under PP 2 x FSDP 2 resumes under
FSDP 4 with every model and optimizer tensor bit-identical, and the reverse (``tests/helpers/pp_resume.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY, env, run_cli, torchrun_runs
from tests.integration.test_baselines import BASELINES, COMMON, LOSS_RTOL, MODELS, environment

pytestmark = pytest.mark.slow

STEPS = 10
PP = ["--parallelism.pipeline_parallel_degree", "2", "--training.stop_at_step", str(STEPS)]
BATCH2 = ["--training.local_batch_size", "2"]  # 2 microbatches: what 1F1B needs with 2 stages
# name -> (ranks, model, overrides)
LAYOUTS = {
    "pp2_gpipe": (2, "llama3", ["--parallelism.pipeline_parallel_schedule", "GPipe"]),
    "pp2_1f1b": (2, "llama3", ["--parallelism.pipeline_parallel_schedule", "1F1B", *BATCH2]),
    "hybrid_pp2_gpipe": (2, "hyena", ["--parallelism.pipeline_parallel_schedule", "GPipe"]),
    "hybrid_pp2_1f1b": (2, "hyena", ["--parallelism.pipeline_parallel_schedule", "1F1B", *BATCH2]),
    "pp2_fsdp2": (4, "llama3", ["--parallelism.data_parallel_shard_degree", "2",
                                "--parallelism.pipeline_parallel_schedule", "GPipe"]),
    "hybrid_pp2_tp2": (4, "hyena", ["--parallelism.tensor_parallel_degree", "2", *BATCH2]),
    "pp2_hsdp2_compiled": (4, "llama3", ["--parallelism.data_parallel_replicate_degree", "2",
                                         "--parallelism.pipeline_parallel_schedule", "GPipe",
                                         "--compile.enable", "true", "--compile.backend", "aot_eager"]),
    "hybrid_interleaved_cp2_ac": (4, "hyena", [
        "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B", "--parallelism.context_parallel_degree", "2",
        "--activation_checkpoint.mode", "full", *BATCH2,
    ]),
}  # fmt: skip


@pytest.fixture(scope="module")
def curves(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("pipeline")
    out: dict[str, dict] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        for nproc in (2, 4):
            names = [n for n, (ranks, _, _) in LAYOUTS.items() if ranks == nproc]
            runs = [
                ["--job.config_file", MODELS[LAYOUTS[n][1]], *COMMON, *PP, *LAYOUTS[n][2], "--job.dump_folder",
                 str(root / n)]
                for n in names
            ]  # fmt: skip
            folder = root / f"ranks{nproc}"
            folder.mkdir()
            out.update(zip(names, torchrun_runs(nproc, runs, folder)))
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_matches_one_process(curves, layout):
    model = LAYOUTS[layout][1]
    baseline = json.loads((BASELINES / f"{model}.json").read_text())
    stored = baseline["layouts"]["one_process"]
    rtol = 1e-5 if baseline["recorded_with"] == environment() else 1e-5 + LOSS_RTOL
    losses = curves[layout]["losses"]
    assert len(losses) == STEPS
    for step, (a, e) in enumerate(zip(losses, stored["loss"]), start=1):
        assert abs(a - e) <= rtol * e, f"{layout} step {step}: loss {a!r} vs one process {e!r}"
    for step, (a, e) in enumerate(zip(curves[layout]["grad_norms"], stored["grad_norm"]), start=1):
        assert abs(a - e) <= 2e-4 * e, f"{layout} step {step}: grad norm {a!r} vs one process {e!r}"


def test_checkpoint_moves_between_pipeline_and_fsdp(tmp_path):
    out = tmp_path / "out.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
        "-m", "tests.helpers.pp_resume", str(out), str(tmp_path / "runs"), MODELS["hyena"],
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env={**env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(out.read_text())[MODELS["hyena"]]
    assert result["entries"] > 100 and result["steps_moved_the_state"]
    assert result["pp_to_fsdp"] == [], "resumed under FSDP 4, these differ from the PP 2 x FSDP 2 save"
    assert result["fsdp_to_pp"] == [], "resumed under PP 2 x FSDP 2, these differ from the FSDP 4 save"


def test_validation_under_pipeline_matches_one_process(tmp_path):
    """The schedule's forward-only pass (``Pipeline.evaluate``) gives the one-process validation loss (the hybrid:
    its tied head on the last stage)."""
    args = [*TINY, "--job.config_file", MODELS["hyena"], "--training.seq_len", "64", "--training.steps", "2",
            "--validation.enable", "true", "--validation.freq", "1", "--validation.steps", "2"]  # fmt: skip
    pp = [*PP[:2], "--parallelism.pipeline_parallel_schedule", "1F1B", "--job.dump_folder", str(tmp_path / "pp")]
    torchrun_runs(2, [[*args, *pp]], tmp_path)
    one = run_cli([*args, "--job.dump_folder", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    records = [[json.loads(line) for line in (tmp_path / run / "validation.jsonl").read_text().splitlines()]
               for run in ("pp", "one")]  # fmt: skip
    assert [r["tokens"] for r in records[0]] == [r["tokens"] for r in records[1]] == [256, 256]
    for ours, theirs in zip(*records):
        assert ours["validation_loss"] == pytest.approx(theirs["validation_loss"], rel=1e-5)
