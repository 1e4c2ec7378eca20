"""User-facing errors.

Anything a user can fix (a config key, a path, a checkpoint, a CLI argument) raises
:class:`UserError`. Entry points catch it and print one line, ``error: <message>``, and exit
non-zero instead of showing a traceback. Programming errors stay ordinary exceptions.

Under torchrun every rank usually meets the same mistake; the job still prints one line: the first
rank to fail claims the report in torchrun's store (which outlives the workers), the others exit
with the same status silently.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in user input; the message names the problem and the fix."""

    exit_code = EXIT_USER_ERROR  # the status run_cli exits with; subclasses may choose their own


class ConfigError(UserError):
    """An invalid configuration key or value."""


def _reports_for_the_job() -> bool:
    """Whether this process prints a user error: one line per job, however many ranks hit it."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return True
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun: its agent's store serves every rank
        try:
            from datetime import timedelta

            from torch.distributed import TCPStore

            store = TCPStore(
                env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=30)
            )
            attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
            return store.add(f"torchtitan_hyena/user_error/attempt_{attempt}", 1) == 1
        except Exception:  # no store to agree through: rank 0 speaks for the job
            pass
    return env.get("RANK", "0") == "0"


def fail(message: str, exit_code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print a one-line error (once per job) and exit with ``exit_code`` (:data:`EXIT_USER_ERROR` by default)."""
    if _reports_for_the_job():
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(exit_code)


def run_cli(main: Callable[[], T]) -> T:
    """Run an entry point, turning :class:`UserError` into a one-line message and exit code 2."""
    try:
        return main()
    except UserError as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
