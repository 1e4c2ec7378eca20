"""The number of ranks a config's parallel layout needs, for launch scripts.

    python -m torchtitan_hyena.tools.world_size --job.config_file X.toml [--section.key value ...]

prints ``pp x replicate x shard x cp x tp``. The SLURM scripts divide it by the GPUs per node to get
``--nodes``, so the allocation always matches the mesh. It imports no torch (it runs at submission
on a login node, once per script).
"""

from __future__ import annotations

import sys

from torchtitan_hyena.config import ConfigManager, JobConfig
from torchtitan_hyena.errors import ConfigError, run_cli


def required_world_size(config: JobConfig) -> int:
    """Product of the parallel degrees; the layout must pin every degree (no ``-1``)."""
    p = config.parallelism
    if p.data_parallel_shard_degree == -1:
        raise ConfigError(
            f"{config.job.config_file or 'the config'} sets parallelism.data_parallel_shard_degree = -1, so it "
            "does not fix the number of ranks; set it explicitly to launch on a fixed allocation"
        )
    return (
        p.pipeline_parallel_degree
        * p.data_parallel_replicate_degree
        * p.data_parallel_shard_degree
        * p.context_parallel_degree
        * p.tensor_parallel_degree
    )


def main(argv: list[str] | None = None) -> None:
    config = ConfigManager().parse_args(sys.argv[1:] if argv is None else argv)
    print(required_world_size(config))


if __name__ == "__main__":
    run_cli(main)
