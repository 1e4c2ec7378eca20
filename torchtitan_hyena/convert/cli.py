"""Command lines of ``llama_to_dcp.py`` and ``dcp_to_llama.py`` (the scripts only call these)."""

from __future__ import annotations

import argparse
import contextlib
import signal
from collections.abc import Iterator

from torchtitan_hyena.convert import hub
from torchtitan_hyena.convert.common import DTYPES
from torchtitan_hyena.convert.llama import dcp_to_llama, llama_to_dcp
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.tools.logging import init_logger, logger


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SLURM ends jobs with SIGTERM: while converting, unwind like Ctrl-C so the partial output is removed."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def llama_to_dcp_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python llama_to_dcp.py",
        description="Convert a Meta (params.json + consolidated.*.pth) or HF (config.json + safetensors) Llama "
        "checkpoint into a DCP folder with model_args.json, for checkpoint.initial_load_path and scoring.",
    )
    p.add_argument("--input_dir", required=True, help="Meta or HF checkpoint folder (format detected)")
    p.add_argument("--output_dir", required=True, help="DCP folder to create")
    p.add_argument("--keep_embeddings", action="store_true", help="keep tok_embeddings/output (default: drop)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="stored precision (default: as in the source)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    a = p.parse_args(argv)
    init_logger()
    with _sigterm_as_interrupt():
        llama_to_dcp(
            a.input_dir,
            a.output_dir,
            keep_embeddings=a.keep_embeddings,
            dtype=DTYPES.get(a.dtype),
            overwrite=a.overwrite,
        )


def dcp_to_llama_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python dcp_to_llama.py",
        description="Export the model weights of a DCP step folder as a Meta .pth or a transformers Llama folder, "
        "optionally pushed to the Hugging Face Hub.",
    )
    p.add_argument("--input_dir", required=True, help="step-N folder (training checkpoint or converter output)")
    p.add_argument("--output_dir", required=True, help="folder to create")
    p.add_argument("--format", choices=("hf", "pth"), default="hf", help="hf: transformers folder; pth: Meta layout")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="exported precision (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    p.add_argument("--hf_repo_name", default="", help="Hub repo id (user/name) for --push_to_hub and the model card")
    p.add_argument("--push_to_hub", action="store_true", help="upload the export (token: HF_TOKEN or hf login)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    a = p.parse_args(argv)
    init_logger()
    token = None
    if a.push_to_hub:
        if not a.hf_repo_name:
            raise UserError("--push_to_hub needs --hf_repo_name user/name")
        token = hub.require_token(a.hf_repo_name)
    with _sigterm_as_interrupt():
        out = dcp_to_llama(
            a.input_dir,
            a.output_dir,
            fmt=a.format,
            dtype=DTYPES.get(a.dtype),
            overwrite=a.overwrite,
            repo_name=a.hf_repo_name,
        )
    if token is not None:
        url = hub.push_folder(out, a.hf_repo_name, token, private=a.private)
        logger.info(f"pushed {out} to {a.hf_repo_name}: {url}")
