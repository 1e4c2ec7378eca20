"""ConfigManager: TOML + CLI precedence, typed parsing, validation and --help."""

from __future__ import annotations

import dataclasses

import pytest

from torchtitan_hyena.config import ConfigManager, JobConfig, config_table
from torchtitan_hyena.config.job_config import SECTIONS
from torchtitan_hyena.errors import ConfigError


def parse(*args: str) -> JobConfig:
    return ConfigManager().parse_args(list(args))


def test_toml_then_cli_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[training]\nsteps = 7\nseq_len = 256\n[optimizer]\nlr = 0.5\n")
    c = parse("--job.config_file", str(toml), "--training.steps", "9")
    assert c.training.steps == 9  # CLI wins
    assert c.training.seq_len == 256  # TOML wins over default
    assert c.optimizer.lr == 0.5
    assert c.training.local_batch_size == JobConfig().training.local_batch_size


def test_cli_forms():
    c = parse("--compile.enable", "--training.deterministic=true", "--metrics.enable_tensorboard", "false",
              "--checkpoint.exclude_from_loading", "optimizer,dataloader", "--optimizer.lr", "1e-3",
              "--parallelism.data_parallel_shard_degree", "-1")  # fmt: skip
    assert c.compile.enable is True and c.training.deterministic is True
    assert c.metrics.enable_tensorboard is False
    assert c.checkpoint.exclude_from_loading == ["optimizer", "dataloader"]
    assert c.optimizer.lr == 1e-3 and c.parallelism.data_parallel_shard_degree == -1


def test_every_key_is_overridable_from_cli():
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = getattr(getattr(JobConfig(), section), f.name)
            value = ",".join(default) if isinstance(default, list) else str(default)
            value = value.lower() if isinstance(default, bool) else value
            if section == "job" and f.name == "config_file":
                continue
            c = parse(f"--{section}.{f.name}", value) if value != "" else parse(f"--{section}.{f.name}=")
            assert getattr(getattr(c, section), f.name) == default


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--training.stepz", "3"], "unknown config key training.stepz"),
        (["--trainin.steps", "3"], "unknown config section 'trainin'"),
        (["--training.steps", "three"], "training.steps expects an integer"),
        (["--optimizer.lr", "fast"], "optimizer.lr expects a number"),
        (["--compile.enable", "maybe"], "compile.enable expects true or false"),
        (["--optimizer.lr", "-1e-3"], "optimizer.lr must be >= 0"),
        (["--training.steps", "0"], "training.steps must be positive"),
        (["--model.attention_backend", "xformers"], "model.attention_backend must be one of"),
        (["--checkpoint.keep_latest_k", "1"], "keep_latest_k = 1"),
        (["--training.local_batch_size", "4", "--training.global_batch_size", "6"], "multiple of"),
        (["--optimizer.beta2", "1.5"], "optimizer.beta2 must be in [0, 1)"),
        (["--checkpoint.exclude_from_loading", "model"], "exclude_from_loading has unknown entries"),
        (
            ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "x"],
            "selective_ac_option",
        ),
        (["steps", "3"], "unexpected argument"),
        (["--training.steps"], "needs a value"),
    ],
)
def test_bad_values_name_the_key(args, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        parse(*args)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_toml_errors(tmp_path):
    bad_type = tmp_path / "t.toml"
    bad_type.write_text('[training]\nsteps = "ten"\n')
    with pytest.raises(ConfigError, match=r"training.steps expects an integer"):
        parse("--job.config_file", str(bad_type))
    unknown = tmp_path / "u.toml"
    unknown.write_text("[training]\nbatch_size = 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key training.batch_size"):
        parse("--job.config_file", str(unknown))
    broken = tmp_path / "b.toml"
    broken.write_text("[training\nsteps = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse("--job.config_file", str(broken))
    with pytest.raises(ConfigError, match="does not exist"):
        parse("--job.config_file", str(tmp_path / "missing.toml"))


def test_help_lists_every_key_with_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"--{section}.{f.name} (" in out
    assert "default 'llama3'" in out


def test_config_table_marks_changed_values():
    table = config_table(parse("--training.steps", "3"))
    line = next(x for x in table.splitlines() if x.startswith("training.steps "))
    assert line.rstrip().endswith("3*")


def test_readme_config_reference_is_current():
    """The README's option table is generated; regenerate it with ``python scripts/update_readme.py``."""
    import subprocess
    import sys

    from tests.conftest import REPO, env

    proc = subprocess.run([sys.executable, "scripts/update_readme.py", "--check"], cwd=REPO, env=env(),
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
