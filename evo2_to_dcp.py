"""Convert an Evo 2 (vortex) checkpoint into a DCP folder: ``python evo2_to_dcp.py --help``.

    python evo2_to_dcp.py --input evo2_7b.pt --config evo2-7b-8k.yml --output_dir OUT
    python evo2_to_dcp.py --input evo2_40b/ --config evo2_40b_1m --output_dir OUT   # byte shards, built-in flavor

The library is ``torchtitan_hyena.convert.evo2``; this script only parses the command line.
"""

from torchtitan_hyena.convert.cli import evo2_to_dcp_main
from torchtitan_hyena.errors import run_cli

if __name__ == "__main__":
    run_cli(evo2_to_dcp_main)
