"""Evaluate a checkpoint: token-weighted loss on a held-out split, with the training layout.

    python -m torchtitan_hyena.evaluate --job.config_file X.toml --checkpoint.initial_load_path STEP_DIR \
        [--validation.dataset_split test] [--validation.steps -1] [--section.key value ...]

The set-up, model and data are built as for training (same config, same launch, ``build.py``), the weights come
from ``checkpoint.initial_load_path`` (every tensor must match), and nothing is saved. Rank 0 appends one line to
``<job.dump_folder>/eval.jsonl``: ``{"checkpoint", "step", "split", "loss" (nats/token), "perplexity", "tokens"}``.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import torch.distributed as dist

from torchtitan_hyena import build
from torchtitan_hyena.components.checkpoint import load_model_weights
from torchtitan_hyena.components.validate import Validator
from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.distributed.utils import set_determinism
from torchtitan_hyena.errors import UserError, run_cli
from torchtitan_hyena.tools.logging import init_logger, logger


def main(argv: list[str] | None = None) -> dict:
    config = ConfigManager().parse_args(sys.argv[1:] if argv is None else argv)
    path = config.checkpoint.initial_load_path
    if not path:
        raise UserError("nothing to evaluate: pass --checkpoint.initial_load_path outputs/<run>/checkpoint/step-N")
    config.checkpoint.enable = False  # evaluate exactly these weights: the start-up checks judge them as the seed
    init_logger()
    try:
        s = build.setup(config)
        set_determinism(config.training.seed, config.training.deterministic)
        validator = Validator(
            build.build_dataloader(s, build.build_tokenizer(s), validation=True),
            s.spec.build_loss_fn(config),
            config.validation.steps,
            s.device,
            s.loss_group(),
            prepare_batch=s.prepare_batch,
        )
        model = build.build_model(s).model
        load_model_weights([model], Path(path), strict_shapes=True)
        with s.loss_parallel():
            loss, tokens = validator.validate([model], validator.model_loss(model, s.forward))
        match = re.fullmatch(r"step-(\d+)", Path(path).name)
        record = {
            "checkpoint": str(path),
            "step": int(match.group(1)) if match else None,
            "split": config.validation.dataset_split,
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "tokens": tokens,
        }
        if dist.get_rank() == 0:
            logger.info(f"evaluation of {path} on {record['split']}: loss {loss:.4f} over {tokens} tokens")
            dump = Path(config.job.dump_folder)
            dump.mkdir(parents=True, exist_ok=True)
            with (dump / "eval.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        return record
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
