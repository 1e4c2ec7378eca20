"""Command lines of the converter scripts (``llama_to_dcp.py``, ``dcp_to_llama.py``, ``evo2_to_dcp.py``,
``dcp_to_evo2.py``); the scripts only call these."""

from __future__ import annotations

import argparse
import contextlib
import signal
from collections.abc import Iterator

from torchtitan_hyena.convert import hub
from torchtitan_hyena.convert.foreign import ModelSource
from torchtitan_hyena.convert.llama import dcp_to_llama, llama_to_dcp
from torchtitan_hyena.dtypes import DTYPES, WEIGHT_DTYPES
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.tools.logging import init_logger, logger
from torchtitan_hyena.tools.outputs import check_output_dir, check_writable_file


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
        "checkpoint into a DCP folder with model_args.json, for checkpoint.initial_load_path and scoring; with "
        "--target hyena, into a StripedHyena 2 hybrid seeded from it.",
    )
    p.add_argument("--input_dir", required=True, help="Meta or HF checkpoint folder (format detected)")
    p.add_argument("--output_dir", required=True, help="DCP folder to create")
    p.add_argument("--keep_embeddings", action="store_true", help="keep tok_embeddings/output (default: drop)")
    p.add_argument("--dtype", choices=sorted(WEIGHT_DTYPES), help="stored precision (default: as in the source)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    p.add_argument(
        "--target",
        choices=("llama3", "hyena"),
        default="llama3",
        help="llama3: the Llama itself; hyena: a StripedHyena 2 hybrid seeded from it (attention, MLPs, norms)",
    )
    p.add_argument(
        "--layout",
        default="",
        help="hyena: one letter per Llama layer, S/D/H (fresh Hyena mixer) or * (Llama attention); "
        "default: Evo 2's SDH*SDH striping",
    )
    a = p.parse_args(argv)
    init_logger()
    check_output_dir(a.output_dir, a.overwrite)
    with _sigterm_as_interrupt():
        llama_to_dcp(
            a.input_dir,
            a.output_dir,
            keep_embeddings=a.keep_embeddings,
            dtype=DTYPES.get(a.dtype),
            overwrite=a.overwrite,
            target=a.target,
            layout=a.layout,
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
    p.add_argument("--dtype", choices=sorted(WEIGHT_DTYPES), help="exported precision (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    p.add_argument("--hf_repo_name", default="", help="Hub repo id (user/name) for --push_to_hub and the model card")
    p.add_argument("--push_to_hub", action="store_true", help="upload the export (token: HF_TOKEN or hf login)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    g = p.add_argument_group(
        "folders without model_args.json (TorchTitan, gpt-neuro)",
        "the model comes from these; what the tensors fix (vocabulary, layers, kv heads) is read from them, and "
        "every stored shape is checked",
    )
    g.add_argument("--config", default="", help="the run's training TOML (TorchTitan v0.2 / gpt-neuro keys)")
    g.add_argument("--flavor", default="", help="llama3 flavor (e.g. 8B); overrides the TOML's model.flavor")
    g.add_argument("--vocab_size", type=int, default=0, help="vocabulary size (default: the TOML's, else the tensors')")
    g.add_argument(
        "--rope_scaling",
        choices=("none", "llama3"),
        default="",
        help="RoPE of the run (default none, as gpt-neuro; TorchTitan >= 0.2 trains Llama 3 with llama3)",
    )
    a = p.parse_args(argv)
    init_logger()
    check_output_dir(a.output_dir, a.overwrite)
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
            source=ModelSource(a.config, a.flavor, a.vocab_size, a.rope_scaling),
        )
    if token is not None:
        url = hub.push_folder(out, a.hf_repo_name, token, private=a.private)
        logger.info(f"pushed {out} to {a.hf_repo_name}: {url}")


def evo2_to_dcp_main(argv: list[str] | None = None) -> None:
    from torchtitan_hyena.convert.evo2 import convert_evo2_to_dcp

    p = argparse.ArgumentParser(
        prog="python evo2_to_dcp.py",
        description="Convert an Evo 2 (vortex) checkpoint into a DCP folder with model_args.json, for "
        "checkpoint.initial_load_path and scoring.",
    )
    p.add_argument("--input", required=True, help="vortex .pt, its byte shards .pt.part0..N, or a folder holding them")
    p.add_argument("--config", required=True, help="vortex YAML (evo2-*.yml) or a hyena flavor (e.g. evo2_7b)")
    p.add_argument("--output_dir", required=True, help="DCP folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    a = p.parse_args(argv)
    init_logger()
    check_output_dir(a.output_dir, a.overwrite)
    with _sigterm_as_interrupt():
        convert_evo2_to_dcp(a.input, a.config, a.output_dir, overwrite=a.overwrite)


def dcp_to_evo2_main(argv: list[str] | None = None) -> None:
    from torchtitan_hyena.convert.evo2 import convert_dcp_to_evo2

    p = argparse.ArgumentParser(
        prog="python dcp_to_evo2.py",
        description="Export a hyena DCP step folder as a vortex-loadable Evo 2 .pt (bf16 by default; LI filters and "
        "RoPE inv_freq fp32), optionally with its vortex YAML.",
    )
    p.add_argument("--input_dir", required=True, help="step-N folder (training checkpoint or converter output)")
    p.add_argument("--output", required=True, help=".pt file to create")
    p.add_argument(
        "--dtype", choices=sorted(WEIGHT_DTYPES), default="bfloat16", help="exported precision (default bfloat16)"
    )
    p.add_argument("--yaml", default="", help="also write the vortex YAML config here")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    a = p.parse_args(argv)
    init_logger()
    check_writable_file(a.output, "--output", a.overwrite)
    if a.yaml:
        check_writable_file(a.yaml, "--yaml", a.overwrite)
    with _sigterm_as_interrupt():
        convert_dcp_to_evo2(a.input_dir, a.output, a.dtype, a.yaml, overwrite=a.overwrite)
