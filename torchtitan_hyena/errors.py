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


class UserError(Exception):
    """A mistake in user input; the message names the problem and the fix."""


class ConfigError(UserError):
    """An invalid configuration key or value."""


EXIT_USER_ERROR = 2


def fail(message: str) -> NoReturn:
    """Print a one-line error and exit with :data:`EXIT_USER_ERROR`."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def run_cli(main: Callable[[], T]) -> T:
    """Run an entry point, turning :class:`UserError` into a one-line message and exit code 2."""
    try:
        return main()
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
