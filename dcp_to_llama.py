"""Export a DCP step folder as a Meta .pth or a transformers Llama (optionally to the Hub): ``--help``.

The library is ``torchtitan_hyena.convert.llama`` and ``.hub``; this script only parses the command line.
"""

from torchtitan_hyena.convert.cli import dcp_to_llama_main
from torchtitan_hyena.errors import run_cli

if __name__ == "__main__":
    run_cli(dcp_to_llama_main)
