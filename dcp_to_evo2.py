"""Export a hyena DCP checkpoint as a vortex-loadable Evo 2 .pt: ``python dcp_to_evo2.py --help``.

    python dcp_to_evo2.py --input_dir outputs/run/checkpoint/step-1000 --output model.pt [--yaml model.yml]

The library is ``torchtitan_hyena.convert.evo2``; this script only parses the command line.
"""

from torchtitan_hyena.convert.cli import dcp_to_evo2_main
from torchtitan_hyena.errors import run_cli

if __name__ == "__main__":
    run_cli(dcp_to_evo2_main)
