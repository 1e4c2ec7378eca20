"""Fold a LoRA run's adapters into its base weights: ``python -m torchtitan_hyena.merge_lora --input_dir STEP_DIR
--output_dir OUT [--dtype float32|bfloat16|float16] [--overwrite]``.

A LoRA checkpoint holds the adapters (and anything else trained) but not the frozen base weights: those come from
the run's ``checkpoint.initial_load_path`` recorded in the step's ``job_config.json`` (relative paths resolve
against the current folder, as in training), or are re-drawn from ``training.seed`` when the run had no seed.
The output is an ordinary model-only DCP step folder with ``model_args.json``, for ``score``, ``generate``,
``dcp_to_llama.py`` and ``dcp_to_evo2.py``. The merge runs in fp32; ``--dtype`` then stores the weights in that
dtype (half the size in bf16), except modules that keep fp32 parameters (Hyena-LI filters), as training does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from torchtitan_hyena.build import init_lora, meta_model
from torchtitan_hyena.components.checkpoint import COMPLETE_MARKER, check_model_family, load_model_weights
from torchtitan_hyena.components.lora import apply_lora, merge_adapters
from torchtitan_hyena.config.job_config import Lora
from torchtitan_hyena.dtypes import DTYPES
from torchtitan_hyena.errors import UserError, run_cli
from torchtitan_hyena.models.common.precision import cast_model_
from torchtitan_hyena.protocols.model import MODEL_ARGS_FILE, read_model_args, write_model_args
from torchtitan_hyena.protocols.train_spec import get_train_spec
from torchtitan_hyena.tools.logging import init_logger, logger
from torchtitan_hyena.tools.outputs import atomic_output_dir, check_output_dir

JOB_CONFIG_FILE = "job_config.json"


def read_lora_run(step_dir: Path) -> tuple[dict, Lora]:
    """The step's recorded job config and its ``[lora]`` section; a one-line error unless it is a LoRA run's."""
    path = step_dir / JOB_CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: --input_dir must be a step folder of a LoRA training run")
    try:
        job = json.loads(path.read_text())
        lora = Lora(**job["lora"])
        seed_path = str(job["checkpoint"]["initial_load_path"])
        int(job["training"]["seed"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is not a valid job config ({type(e).__name__}: {e}); restore the run's") from None
    if not lora.enable:
        raise UserError(f"{step_dir} is not a LoRA checkpoint (its {JOB_CONFIG_FILE} has lora.enable = false)")
    if seed_path and not Path(seed_path).is_dir():
        raise UserError(
            f"the base weights of {step_dir}, checkpoint.initial_load_path {seed_path}, are not a folder; run "
            "merge_lora from the folder training ran in, or restore that checkpoint"
        )
    return job, lora


def merge_lora(input_dir: str | Path, output_dir: str | Path, overwrite: bool = False, dtype: str = "float32") -> Path:
    """Rebuild the run's adapted model on one CPU process, load base and adapters, merge, write ``output_dir``."""
    step = Path(input_dir)
    name, flavor, values = read_model_args(step)
    job, lora = read_lora_run(step)
    check_output_dir(output_dir, overwrite)
    spec = get_train_spec(name)
    args = spec.args_cls.from_dict(values, str(step / MODEL_ARGS_FILE))
    model = meta_model(spec, args)
    apply_lora(model, lora)
    model.to_empty(device=torch.device("cpu"))
    seed = int(job["training"]["seed"])
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"), seed=seed)
        init_lora(model, seed)
    base = job["checkpoint"]["initial_load_path"]
    if base:
        check_model_family(Path(base), name)
        load_model_weights([model], Path(base), strict_shapes=False)
        logger.info(f"base weights from {base}")
    else:
        logger.info(f"base weights re-drawn from training.seed {seed} (the run had no checkpoint.initial_load_path)")
    load_model_weights([model], step, trainable_only=True, fix="the step folder does not match its job_config.json")
    merged = merge_adapters(model)
    state = cast_model_(model, DTYPES[dtype]).state_dict()
    job["lora"] = dataclasses.asdict(dataclasses.replace(lora, enable=False))
    with atomic_output_dir(output_dir, overwrite) as tmp:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=str(tmp), no_dist=True)
        write_model_args(tmp, name, flavor, args)
        (tmp / JOB_CONFIG_FILE).write_text(json.dumps(job, indent=2) + "\n")
        (tmp / COMPLETE_MARKER).write_text(f"{step.name}\n")
    logger.info(f"merged {merged} LoRA adapters of {step} into {output_dir}")
    return Path(output_dir)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m torchtitan_hyena.merge_lora", description=__doc__.splitlines()[0])
    p.add_argument("--input_dir", required=True, help="step-N folder of a LoRA training run")
    p.add_argument("--output_dir", required=True, help="DCP step folder to create (model weights + model_args.json)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the stored weights (the merge itself runs in fp32)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    a = p.parse_args(argv)
    init_logger()
    merge_lora(a.input_dir, a.output_dir, overwrite=a.overwrite, dtype=a.dtype)


if __name__ == "__main__":
    run_cli(main)
