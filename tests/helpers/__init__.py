"""Launchers, checkpoint builders and workers shared by the tests."""

from __future__ import annotations

import traceback
from collections.abc import Callable


def run_worker(main: Callable[[], None]) -> None:
    """A torchrun worker's entry: a failure prints its traceback and exits 1 (the launcher then names the rank)."""
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise SystemExit(1) from None
