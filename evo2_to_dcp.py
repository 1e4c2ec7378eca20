"""Convert an Evo 2 (vortex) checkpoint to a torchtitan_hyena DCP checkpoint.

    python evo2_to_dcp.py --input evo2_7b.pt --config evo2-7b-8k.yml --output_dir OUT
    python evo2_to_dcp.py --input evo2_40b/ --config evo2_40b_1m --output_dir OUT   # byte shards, built-in flavor

``--input`` is a vortex ``.pt`` state dict, its byte shards ``.pt.part0..N`` (any one of them), or a folder
holding them; ``--config`` is the vortex YAML or a built-in hyena flavor. OUT is a DCP folder with
``model_args.json``, usable by ``torchtitan_hyena.score`` and ``checkpoint.initial_load_path``.
"""

from __future__ import annotations

import argparse

from torchtitan_hyena.errors import run_cli


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="vortex .pt, .pt.part0..N shards, or a folder holding them")
    p.add_argument("--config", required=True, help="vortex YAML (evo2-*.yml) or a hyena flavor (e.g. evo2_7b)")
    p.add_argument("--output_dir", required=True, help="new DCP folder to write")
    args = p.parse_args(argv)
    from torchtitan_hyena.convert.evo2 import convert_evo2_to_dcp
    from torchtitan_hyena.tools.logging import init_logger

    init_logger()
    convert_evo2_to_dcp(args.input, args.config, args.output_dir)


if __name__ == "__main__":
    run_cli(main)
