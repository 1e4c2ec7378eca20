"""``python -m torchtitan_hyena.tools.selftest``; see the package docstring."""

import os
import sys

if "--smoke" in sys.argv[1:]:
    # The smoke run is the CPU path: hide the GPUs, and interpret the Triton kernels (decided when they are defined).
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["HIP_VISIBLE_DEVICES"] = ""
    os.environ["TRITON_INTERPRET"] = "1"

from torchtitan_hyena.errors import run_cli


def _main() -> None:
    # Imported inside run_cli: a Triton build that does not match torch is then a one-line error, not a traceback.
    from torchtitan_hyena.tools.selftest.runner import main

    main()


run_cli(_main)
