"""User-facing errors.

Anything a user can fix (a config key, a path, a checkpoint, a CLI argument) raises
:class:`UserError`. Entry points catch it and print one line, ``error: <message>``, and exit
non-zero instead of showing a traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations

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


def fail(message: str, exit_code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print a one-line error and exit with ``exit_code`` (:data:`EXIT_USER_ERROR` by default)."""
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
