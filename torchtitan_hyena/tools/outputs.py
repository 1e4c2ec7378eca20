"""Where the command-line tools write, and how: nothing half-written, whatever happens.

* :func:`check_writable_dir` / :func:`check_writable_file` run before any work, so a read-only location or
  a file where a folder belongs is one line at start-up, not a traceback after an hour of converting.
* :func:`atomic_output_dir` / :func:`atomic_output_file` write under a hidden temporary name beside the target
  (``.NAME.partial-<host>-<pid>-XXXX``) and move it into place only when the block succeeds; an error or
  Ctrl-C removes it.
* A run killed outright (SIGKILL, a lost node) cannot clean up; the next run into the same folder removes the
  temporary outputs whose process is gone, with a note (:func:`remove_stale_partials`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from torchtitan_hyena.errors import UserError
from torchtitan_hyena.tools.logging import logger

_KINDS = ("partial", "old")  # in-progress outputs, and targets set aside while --overwrite swaps in the new one
_LEGACY_AGE_S = 3600  # temporary names without an owner (older versions): stale once untouched this long


def _temp_path(target: Path, kind: str = "partial") -> Path:
    """A fresh hidden name beside ``target`` recording this run (created by the caller, with the usual umask)."""
    return target.parent / f".{target.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def check_writable_dir(path: str | Path, what: str) -> None:
    """``path`` is, or can be created as, a folder this process can write in; else a one-line :class:`UserError`.

    The probe is an unnamed temporary file in the nearest existing folder: nothing is created.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {p} is a file, not a folder; choose another path")
    probe = p
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {p} cannot be created because {probe} is a file; choose another path")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UserError(
            f"{what} {p} is not writable ({e.strerror or e} in {probe}); choose another path or fix its permissions"
        ) from None


def check_writable_file(path: str | Path, what: str, overwrite: bool = True) -> None:
    """``path`` can be created as a file (replacing an existing one only with ``overwrite``)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {p} is a folder; give a file name")
    if p.exists() and not overwrite:
        raise UserError(f"{what} {p} already exists; pass --overwrite or choose another path")
    check_writable_dir(p.parent, f"{what} {p}: its folder")


def check_output_dir(target: str | Path, overwrite: bool, what: str = "--output_dir") -> None:
    """``target`` can become a new folder: it is absent or empty (or ``overwrite``), and its parent is writable."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"{what} {target} exists and is not a folder; choose another path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UserError(f"{what} {target} exists and is not empty; pass --overwrite or choose another")
    check_writable_dir(target.parent, f"{what} {target}: its folder")


def _owner_is_gone(name: str, prefix: str, path: Path) -> bool:
    """Whether the run that made the temporary output ``name`` has ended (on this host; unknown hosts are live)."""
    host, _, rest = name[len(prefix) :].rpartition("-")[0].rpartition("-")
    if not rest.isdigit():  # no owner recorded (an older version): judged by age
        return time.time() - path.stat().st_mtime > _LEGACY_AGE_S
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(rest), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def remove_stale_partials(target: str | Path) -> None:
    """Remove the temporary outputs for ``target`` that runs killed before they could clean up left beside it."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for kind in _KINDS:
        prefix = f".{target.name}.{kind}-"
        for path in target.parent.iterdir():
            if not path.name.startswith(prefix) or not _owner_is_gone(path.name, prefix, path):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            logger.warning(f"removed {path}: a temporary output left by an interrupted run")


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, innermost first (to undo on failure)."""
    created = []
    probe = folder
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def staging_dir(target: str | Path) -> Iterator[Path]:
    """A hidden temporary folder beside ``target`` (same filesystem, so its contents move into place by rename),
    removed on exit whatever happens; folders created for it are removed again if the block fails."""
    target = Path(target)
    created = _make_folder(target.parent)
    remove_stale_partials(target)
    tmp = _temp_path(target)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # gone already when the block moved it into place


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` that becomes ``target`` only if the block succeeds.

    A crash, an error or Ctrl-C leaves no partial output: the temporary folder is removed. An
    existing non-empty ``target`` is refused unless ``overwrite``; it is replaced only at the end.
    """
    target = Path(target)
    check_output_dir(target, overwrite)
    with staging_dir(target) as tmp:
        yield tmp
        if target.exists():  # empty, or --overwrite: set it aside, then swap the new folder in
            old = _temp_path(target, "old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)


@contextlib.contextmanager
def atomic_output_file(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside ``target`` (for the block to create) that replaces ``target`` only if
    the block succeeds."""
    target = Path(target)
    check_writable_file(target, "output", overwrite)
    created = _make_folder(target.parent)
    remove_stale_partials(target)
    tmp = _temp_path(target)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_empty(created)
        raise
    os.replace(tmp, target)
