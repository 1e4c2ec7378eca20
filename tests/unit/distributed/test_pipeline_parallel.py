"""The pipeline split (``distributed/pipeline_parallel.py``): balanced, explicit and per-stage-count splits, the
stages a rank runs, what each stage holds, the layouts refused before anything is built; and the dry run's
per-stage memory (in-flight microbatches, blocks per stage)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from torchtitan_hyena.build import meta_model
from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.config.job_config import Parallelism
from torchtitan_hyena.distributed.pipeline_parallel import (
    balanced_ranges,
    split_stage,
    stage_ids,
    stage_ranges,
    validate_pipeline,
)
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.models.llama3.activations import llama3_activations
from torchtitan_hyena.protocols.train_spec import get_flavor_args, get_train_spec
from torchtitan_hyena.tools.activation_memory import ActivationInputs, in_flight_microbatches
from torchtitan_hyena.tools.dry_run import dry_run


def parallelism(**kw) -> Parallelism:
    return Parallelism(**{"pipeline_parallel_degree": 2, **{f"pipeline_parallel_{k}": v for k, v in kw.items()}})


def test_balanced_ranges_minimize_the_costliest_stage():
    assert balanced_ranges([1.0] * 6, 2) == [(0, 3), (3, 6)]
    assert balanced_ranges([1.0] * 6, 3) == [(0, 2), (2, 4), (4, 6)]
    # A costly block gets a stage to itself; the head's cost pushes blocks off the last stage.
    assert balanced_ranges([1, 1, 1, 6, 1, 1], 3) == [(0, 3), (3, 4), (4, 6)]
    assert balanced_ranges([1.0] * 4, 2, head_cost=2.0) == [(0, 3), (3, 4)]


def test_hybrid_split_follows_block_costs():
    """The hybrid's attention blocks cost more at long context than its Hyena blocks: balancing by FLOPs (not by
    block count) moves the cut."""
    args = dataclasses.replace(get_flavor_args(get_train_spec("hyena"), "debugmodel"), layout="**SDHSDH")
    costs = args.layer_flops(1 << 20)
    assert costs[0] > 10 * costs[2]
    assert balanced_ranges(costs, 2) == [(0, 1), (1, 8)]  # not four blocks each


def test_explicit_splits_and_stage_placement():
    assert stage_ranges(parallelism(split_points=["layers.2"]), [1.0] * 6, 0.0) == [(0, 2), (2, 6)]
    assert stage_ranges(parallelism(layers_per_stage=4), [1.0] * 6, 0.0) == [(0, 4), (4, 6)]
    assert stage_ids(0, 2, 4) == [0, 2] and stage_ids(1, 2, 4) == [1, 3]


def test_stage_holds_its_blocks_and_ends():
    spec = get_train_spec("hyena")
    model = meta_model(spec, get_flavor_args(spec, "debugmodel"))
    ranges, plan = [(0, 4), (4, 8)], spec.parallelize_plan.pipeline
    first, last = (split_stage(model, plan, ranges, s) for s in (0, 1))
    assert list(first.layers) == ["0", "1", "2", "3"] and first.norm is None
    assert list(last.layers) == ["4", "5", "6", "7"] and last.norm is not None
    # Tied embeddings: the last stage keeps a copy under the same name (checkpoints keep their keys).
    assert last.tok_embeddings is not None
    names = {n for part in (first, last) for n, _ in part.named_parameters()}
    assert names == {n for n, _ in model.named_parameters()}
    with torch.device("meta"):
        h = last(torch.zeros(2, 16, model.args.dim), torch.arange(16).expand(2, -1))
    assert h.shape == (2, 16, model.args.vocab_size)


@pytest.mark.parametrize(
    "kw, local_batch, fragment",
    [
        (dict(schedule="1F1B"), 1, "needs at least pipeline_parallel_degree (2) microbatches"),
        (dict(microbatch_size=3), 4, "must divide training.local_batch_size"),
        (dict(split_points=["layers.2"], layers_per_stage=2), 2, "set only one"),
        (dict(split_points=["layers.9"]), 2, "must be increasing blocks between layers.1 and layers.5"),
        (dict(split_points=["block4"]), 2, "is not a block name"),
        (dict(layers_per_stage=1), 2, "gives 6 stages but schedule 1F1B"),
        (dict(schedule="Interleaved1F1B", split_points=["layers.3"]), 2, "at least 4"),
        (dict(schedule="Interleaved1F1B"), 3, "multiple of pipeline_parallel_degree"),
    ],
)
def test_impossible_layouts_are_one_line(kw, local_batch, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        validate_pipeline(parallelism(**kw), 6, local_batch)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_validation_batch_must_be_the_training_schedules():
    validate_pipeline(parallelism(), 6, 2, validation_batch=2)
    with pytest.raises(ConfigError, match="set validation.local_batch_size -1"):
        validate_pipeline(parallelism(), 6, 2, validation_batch=4)


def test_stage_activations_add_up_to_the_whole_model():
    """A stage's estimate covers its blocks (the head on the last stage only), times its in-flight microbatches."""
    args = get_flavor_args(get_train_spec("llama3"), "debugmodel")
    base = ActivationInputs(
        microbatch=1, seq_len=64, tp=1, cp=1, act_bytes=4, ac_mode="none", ac_option="2", loss_parallel=False
    )
    whole = llama3_activations(args, base).saved
    first = llama3_activations(args, dataclasses.replace(base, blocks=(0, 1, 2), head=False)).saved
    last = llama3_activations(args, dataclasses.replace(base, blocks=(3, 4, 5))).saved
    assert abs(first + last - whole) <= 1
    gpipe = llama3_activations(args, dataclasses.replace(base, blocks=(0, 1, 2), head=False, in_flight=4.0))
    assert abs(gpipe.saved - 4 * first) <= 4


def test_in_flight_microbatches_per_schedule():
    assert in_flight_microbatches("GPipe", 0, 2, 8, 1) == 8
    assert in_flight_microbatches("1F1B", 0, 4, 8, 1) == 4 and in_flight_microbatches("1F1B", 3, 4, 8, 1) == 1
    assert in_flight_microbatches("Interleaved1F1B", 0, 2, 4, 2) == 2.5  # 5 chunks of half the blocks
    assert in_flight_microbatches("Interleaved1F1B", 1, 2, 4, 2) == 1.5


def test_dry_run_sizes_every_pipeline_rank():
    c = ConfigManager().parse_args(
        ["--job.config_file", "train_configs/debug_model.toml", "--validation.enable", "false",
         "--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "4"]
    )  # fmt: skip
    report = dry_run(c, 4)
    assert report.mesh == {"pp": 2, "dp_shard": 2} and len(report.pipeline_totals) == 2
    assert report.total_bytes == max(report.pipeline_totals)
    assert "pipeline ranks 0..1" in report.table()
