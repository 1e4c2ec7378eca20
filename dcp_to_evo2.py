"""Export a torchtitan_hyena DCP checkpoint (training step or converter output) to a vortex .pt.

    python dcp_to_evo2.py --input_dir outputs/run/checkpoint/step-1000 --output model.pt [--yaml model.yml]

The ``.pt`` follows vortex's format (bf16 by default; LI ``log_poles``/``residues`` and RoPE ``inv_freq``
fp32); ``--yaml`` also writes the matching vortex config.
"""

from __future__ import annotations

import argparse

from torchtitan_hyena.errors import run_cli


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input_dir", required=True, help="DCP folder with model_args.json")
    p.add_argument("--output", required=True, help="vortex .pt file to write")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"], help="tensor dtype")
    p.add_argument("--yaml", default="", help="also write the vortex YAML config here")
    args = p.parse_args(argv)
    from torchtitan_hyena.convert.evo2 import convert_dcp_to_evo2
    from torchtitan_hyena.tools.logging import init_logger

    init_logger()
    convert_dcp_to_evo2(args.input_dir, args.output, args.dtype, args.yaml)


if __name__ == "__main__":
    run_cli(main)
