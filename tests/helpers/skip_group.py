"""comm_check where one rank never joins one mesh group's first collective: a group that cannot form.

RANK=r WORLD_SIZE=n ... python -m tests.helpers.skip_group SKIP_RANK GROUP [comm_check arguments ...]
"""

from __future__ import annotations

import os
import sys

from torchtitan_hyena.distributed import warmup
from torchtitan_hyena.errors import run_cli
from torchtitan_hyena.tools import comm_check

if __name__ == "__main__":
    skip_rank, skip = int(sys.argv[1]), sys.argv[2]
    if int(os.environ["RANK"]) == skip_rank:
        listed, first, never = warmup.mesh_groups, warmup._first_collective, set()

        def mesh_groups(pd):
            groups = listed(pd)
            never.update(id(group) for name, group in groups if name == skip)
            return groups

        def first_collective(group, device, outcome):
            if id(group) not in never:  # the skipped group's collective is never issued
                first(group, device, outcome)

        warmup.mesh_groups, warmup._first_collective = mesh_groups, first_collective
    run_cli(lambda: comm_check.main(sys.argv[3:]))
