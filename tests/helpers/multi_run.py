"""Run several training configs inside one torchrun job and record rank 0's per-step losses.

    torchrun --nproc_per_node N -m tests.helpers.multi_run RUNS.json OUT.json

RUNS.json is a list of argument lists (as for ``python -m torchtitan_hyena.train``). Reusing one
process group for many configs keeps multi-process tests affordable on a 2-core machine.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch.distributed as dist

from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.train import Trainer


def main() -> None:
    runs = json.loads(Path(sys.argv[1]).read_text())
    results = []
    for args in runs:
        trainer = Trainer(ConfigManager().parse_args(args))
        try:
            results.append({"losses": trainer.train(), "steps": trainer.state.step})
        finally:
            trainer.close()
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise SystemExit(1) from None
