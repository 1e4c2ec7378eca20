"""A checkpoint writer process that ends quietly with its trainer (``checkpoint.async_mode = "async_with_pinned_mem"``).

DCP writes each rank's shards from a spawned process that serves save requests over a pipe. When the trainer dies
(kill -9, a failed rank torn down by torchrun, the end of a SLURM allocation), DCP's writer outlives it: it finishes
or hangs in its current save, then meets the closed pipe and prints a broken-pipe traceback into the job log.
:func:`install` makes DCP spawn its writer through :func:`_serve_quietly` instead: DCP's own serving loop, with
the pipe's EOF or breakage ending the process silently, a watchdog ending it once the trainer is gone, and no
log lines after that.
Kept apart from ``checkpoint.py`` so the spawned process imports little.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from torch.distributed.checkpoint import _async_process_executor as _executor

_WRITER = getattr(_executor, "_AsyncCheckpointProcess", None)
_dcp_serve = getattr(_WRITER, "_checkpointing_subprocess", None)


class _TrainerPipe:
    """The writer's end of the pipe: when the trainer is gone (EOF, broken pipe), the writer exits at once, silently."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def recv(self) -> Any:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            os._exit(0)

    def send(self, obj: Any) -> None:
        try:
            self._conn.send(obj)
        except OSError:
            os._exit(0)

    def close(self) -> None:
        self._conn.close()


def _exit_when_orphaned(trainer_pid: int) -> None:
    """Ends a writer still busy (in a save, or a collective with other ranks' writers) once its trainer has died."""
    while os.getppid() == trainer_pid:
        time.sleep(0.2)
    os._exit(0)


def _serve_quietly(pg_init_info: Any, parent_conn: Any) -> None:
    trainer_pid = os.getppid()
    threading.Thread(target=_exit_when_orphaned, args=(trainer_pid,), daemon=True).start()
    # DCP's writer logs on the root logger; once the trainer is gone, a save cut short by a peer writer's exit is
    # not worth a line in the job log.
    logging.getLogger().addFilter(lambda record: os.getppid() == trainer_pid)
    _dcp_serve(pg_init_info, _TrainerPipe(parent_conn))


def install() -> None:
    """Make DCP start its writer processes through :func:`_serve_quietly` (a no-op where DCP has no such process)."""
    if _dcp_serve is not None:
        _WRITER._checkpointing_subprocess = staticmethod(_serve_quietly)
