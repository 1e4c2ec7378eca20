"""Impossible parallel layouts fail before any model is built, with one-line errors naming the fix."""

from __future__ import annotations

import pytest

from tests.conftest import TINY, run_cli
from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.distributed.float8 import Accelerator, validate_float8
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.distributed.parallelize import validate_parallelism
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.models.llama3 import llama3_flavors
from torchtitan_hyena.models.llama3.args import Llama3Args
from torchtitan_hyena.models.llama3.parallelize import validate_llama_parallelism

CPU = Accelerator(kind="cpu", name="cpu")
H100 = Accelerator(kind="cuda", name="NVIDIA H100", capability=(9, 0))


def dims(world: int, tp: int = 1, shard: int = -1, replicate: int = 1, cp: int = 1) -> ParallelDims:
    return ParallelDims(dp_replicate=replicate, dp_shard=shard, cp=cp, tp=tp, world_size=world)


def config(*args: str):
    return ConfigManager().parse_args(list(args))


def layout_error(world: int, args: Llama3Args, *cli: str, acc: Accelerator = CPU, **degrees) -> str:
    """The message of the error a layout raises (ParallelDims, options, model and float8 checks)."""
    c = config(*cli)
    with pytest.raises(ConfigError) as e:
        pd = dims(world, **degrees)
        validate_parallelism(c, pd)
        validate_float8(c.float8, pd, acc)
        validate_llama_parallelism(args, pd, c)
    message = str(e.value)
    assert "\n" not in message
    return message


DEBUG = llama3_flavors["debugmodel"]  # 16 heads, 4 KV heads, FFN hidden 768
ODD_FFN = Llama3Args(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, multiple_of=3)  # FFN hidden 171


@pytest.mark.parametrize(
    ("world", "args", "cli", "degrees", "fragment"),
    [
        (4, DEBUG, [], {"tp": 2, "shard": 4}, "multiply to 8"),
        (6, DEBUG, [], {"tp": 4}, "world size 6 is not divisible"),
        (8, DEBUG, [], {"tp": 8, "shard": 2, "replicate": 2}, "multiply to 32"),
        (3, DEBUG, [], {"tp": 3}, "does not divide the llama3 model's n_heads = 16"),
        (8, DEBUG, [], {"tp": 8}, "does not divide the llama3 model's n_kv_heads = 4"),
        (2, ODD_FFN, [], {"tp": 2}, "does not divide the llama3 model's ffn hidden dim = 171"),
        (4, DEBUG, ["--parallelism.enable_loss_parallel", "true"], {}, "enable_loss_parallel needs tensor_parallel"),
        (4, DEBUG, ["--parallelism.enable_async_tensor_parallel", "true"], {"shard": 4}, "async_tensor_parallel needs"),
        (2, DEBUG, ["--training.enable_cpu_offload", "true"], {"tp": 2}, "enable_cpu_offload offloads FSDP"),
        (2, DEBUG, ["--float8.enable", "true"], {"tp": 2}, "float8.enable = true but the cpu device has no fp8"),
        (
            2, DEBUG, ["--float8.enable", "true", "--float8.emulate", "true", "--float8.recipe", "rowwise",
                       "--float8.enable_fsdp_float8_all_gather", "true"], {}, "works with recipe 'tensorwise' only",
        ),
        (
            2, DEBUG, ["--float8.enable", "true", "--float8.emulate", "true",
                       "--float8.enable_fsdp_float8_all_gather", "true"], {"tp": 2}, "needs FSDP",
        ),
        (
            2, DEBUG, ["--float8.enable", "true", "--float8.emulate", "true",
                       "--float8.enable_fsdp_float8_all_gather", "true"], {}, "gloo (CPU) cannot all-gather float8",
        ),
        (
            2, DEBUG, ["--float8.enable", "true", "--float8.emulate", "true",
                       "--float8.precompute_float8_dynamic_scale_for_fsdp", "true"], {}, "needs float8.enable_fsdp",
        ),
    ],
)  # fmt: skip
def test_invalid_layouts_fail_with_one_line(world, args, cli, degrees, fragment):
    assert fragment in layout_error(world, args, *cli, **degrees)


def test_valid_layouts_pass():
    for world, degrees, cli in [
        (4, {"tp": 4}, ["--parallelism.enable_loss_parallel", "true"]),
        (4, {"tp": 2, "shard": 2}, ["--training.enable_cpu_offload", "true"]),
        (4, {"tp": 2, "shard": 1, "replicate": 2}, ["--training.enable_cpu_offload", "true"]),
        (512, {"tp": 8, "shard": 32, "replicate": 2}, ["--parallelism.enable_loss_parallel", "true"]),
        (8, {"cp": 2, "tp": 2, "shard": 2}, ["--parallelism.context_parallel_rotate_method", "ring"]),
        (512, {"cp": 2, "tp": 4, "shard": 32, "replicate": 2}, ["--parallelism.enable_loss_parallel", "true"]),
    ]:
        c, pd = config(*cli), dims(world, **degrees)
        validate_parallelism(c, pd)
        validate_llama_parallelism(llama3_flavors["8B"], pd, c)
    # Real float8 with FSDP float8 all-gather on an SM90 part with FSDP 4.
    f8 = config("--float8.enable", "true", "--float8.enable_fsdp_float8_all_gather", "true",
                "--float8.precompute_float8_dynamic_scale_for_fsdp", "true")  # fmt: skip
    validate_float8(f8.float8, dims(8, tp=2), H100)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--float8.enable", "true"], "error: float8.enable = true but the cpu device has no fp8 matmuls"),
        (
            ["--parallelism.tensor_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1"],
            "error: parallel degrees multiply to 2",
        ),
    ],
)
def test_cli_rejects_before_building_the_model(tmp_path, extra, fragment):
    proc = run_cli([*TINY, "--job.dump_folder", str(tmp_path), *extra])
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "parameters" not in proc.stderr + proc.stdout  # the model-size log line comes after the build
