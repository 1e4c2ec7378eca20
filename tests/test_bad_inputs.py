"""User mistakes end with one line on stderr, exit code 2, no traceback and nothing on disk."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, TINY, run_cli

pytestmark = pytest.mark.slow

CASES = {
    "typo_key": (["--training.stepz", "3"], "unknown config key training.stepz"),
    "wrong_type": (["--training.steps", "ten"], "training.steps expects an integer"),
    "bad_bool": (["--compile.enable", "maybe"], "compile.enable expects true or false"),
    "negative_lr": (["--optimizer.lr", "-0.1"], "optimizer.lr must be >= 0"),
    "bad_choice": (["--checkpoint.async_mode", "sometimes"], "checkpoint.async_mode must be one of"),
    "positional": (["train"], "unexpected argument"),
    "mesh_product": (["--parallelism.data_parallel_shard_degree", "4"], "but the world size is 1"),
    "batch_not_multiple": (["--training.local_batch_size", "4", "--training.global_batch_size", "6"], "multiple of"),
    "unknown_model": (["--model.name", "gpt5"], "is not a registered model"),
    "unknown_flavor": (["--model.flavor", "3B"], "is not a llama3 flavor"),
    "other_family_key": (["--model.layout", "SDH*"], "model.layout = 'SDH*' is hyena's option and model.name 'llama3'"),
    "missing_dataset": (["--training.dataset_path", "/no/such/neural_pile"], "does not exist"),
    "missing_split": (["--training.dataset_split", "validation"], "has no split 'validation'"),
    "unknown_dataset": (["--training.dataset", "imagenet"], "training.dataset 'imagenet' is unknown"),
    "vocab_too_small": (["--model.vocab_size", "200"], "model.vocab_size 200 is smaller than"),
    "seq_len_too_long": (["--training.seq_len", "10000000"], "fewer than one window"),
    "unreadable_checkpoint": (["--checkpoint.initial_load_path", str(REPO / "README.md")], "does not exist or is not"),
    "missing_load_step": (["--checkpoint.enable", "true", "--checkpoint.load_step", "5"], "has no complete checkpoint"),
    "missing_config": (
        ["--job.config_file", "train_configs/nope.toml"],
        "config file train_configs/nope.toml does not",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, tmp_path):
    args, fragment = CASES[name]
    dump = tmp_path / "out"
    proc = run_cli([*TINY, "--job.dump_folder", str(dump), *args])
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, last
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not dump.exists()


def test_seq_len_must_split_across_tp_and_cp():
    """Checked before any model is built; needs no processes (the check only reads the degrees)."""
    from torchtitan_hyena.build import validate_layout
    from torchtitan_hyena.config import ConfigManager
    from torchtitan_hyena.distributed.float8 import Accelerator
    from torchtitan_hyena.distributed.parallel_dims import ParallelDims
    from torchtitan_hyena.errors import ConfigError

    def check(seq_len: int, tp: int, cp: int) -> None:
        config = ConfigManager().parse_args(["--training.seq_len", str(seq_len)])
        dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=cp, tp=tp, world_size=tp * cp)
        validate_layout(config, dims, Accelerator("cpu", "cpu"))

    check(128, tp=2, cp=2)
    with pytest.raises(ConfigError, match=r"training.seq_len 130 must be divisible by 8"):
        check(130, tp=2, cp=2)
    with pytest.raises(ConfigError, match=r"training.seq_len 127 must be divisible by 2"):
        check(127, tp=2, cp=1)
