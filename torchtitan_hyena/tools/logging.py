"""Logging set-up: one logger for the package, rank-prefixed, rank 0 at INFO by default."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("torchtitan_hyena")


def init_logger() -> None:
    """Configure the package logger once; non-zero ranks log warnings and errors only."""
    if logger.handlers:
        return
    rank = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler()
    prefix = f"[rank{rank}]" if "RANK" in os.environ else ""
    handler.setFormatter(logging.Formatter(f"{prefix}[titan-hyena] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
