"""Convert a Meta or HF Llama checkpoint into a DCP folder: ``python llama_to_dcp.py --help``.

The library is ``torchtitan_hyena.convert.llama``; this script only parses the command line.
"""

from torchtitan_hyena.convert.cli import llama_to_dcp_main
from torchtitan_hyena.errors import run_cli

if __name__ == "__main__":
    run_cli(llama_to_dcp_main)
