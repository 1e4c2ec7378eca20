"""Evaluate a checkpoint: token-weighted loss on a held-out split, with the training layout.

    python -m torchtitan_hyena.evaluate --job.config_file X.toml --checkpoint.initial_load_path STEP_DIR \
        [--validation.dataset_split test] [--validation.steps -1] [--section.key value ...]

The trainer builds the mesh, model and data exactly as for training (same config, same launch), the
weights come from ``checkpoint.initial_load_path`` (every tensor must match), and nothing is saved.
Rank 0 appends one line to ``<job.dump_folder>/eval.jsonl``:
``{"checkpoint", "step", "split", "loss" (nats/token), "perplexity", "tokens"}``.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import torch.distributed as dist

from torchtitan_hyena.components.checkpoint import load_model_weights
from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.errors import UserError, run_cli
from torchtitan_hyena.tools.logging import logger
from torchtitan_hyena.train import Trainer, remove_if_created


def main(argv: list[str] | None = None) -> dict:
    config = ConfigManager().parse_args(sys.argv[1:] if argv is None else argv)
    path = config.checkpoint.initial_load_path
    if not path:
        raise UserError("nothing to evaluate: pass --checkpoint.initial_load_path outputs/<run>/checkpoint/step-N")
    config.checkpoint.enable = False  # evaluate exactly these weights: never resume, never save
    config.validation.enable = True
    trainer = None
    dump = Path(config.job.dump_folder)
    created = not dump.exists()
    try:
        try:
            trainer = Trainer(config)
            load_model_weights(trainer.model_parts, Path(path), strict_shapes=True)
        except BaseException:
            remove_if_created(dump, created)
            raise
        loss, tokens = trainer.validator.validate(trainer.model_parts[0], trainer.forward)
        match = re.fullmatch(r"step-(\d+)", Path(path).name)
        record = {
            "checkpoint": str(path),
            "step": int(match.group(1)) if match else None,
            "split": config.validation.dataset_split,
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "tokens": tokens,
        }
        if trainer.rank == 0:
            logger.info(f"evaluation of {path} on {record['split']}: loss {loss:.4f} over {tokens} tokens")
            with (trainer.dump_folder / "eval.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        return record
    finally:
        if trainer is not None:
            trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
