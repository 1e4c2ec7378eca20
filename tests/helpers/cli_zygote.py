"""Run many command lines from one warm process: each runs in a forked child, so no case pays for importing torch.

    python -m tests.helpers.cli_zygote      # one JSON request per stdin line, one JSON reply per stdout line

Request: ``{"argv": [...], "module": "torchtitan_hyena.train"}`` (or ``"script": "dcp_to_llama.py"``), plus
``cwd``, ``env`` (set), ``unset`` (names), ``ranks`` (default 1), ``log`` (path prefix) and ``timeout`` (s). Each
rank runs exactly like ``python -m module argv`` / ``python script argv`` (``runpy`` as ``__main__``; an uncaught
exception prints its traceback and exits 1), with stdout and stderr in ``<log>.<rank>``. With several ranks,
every child gets the environment torchrun gives its workers, including an agent store served by a sibling
process (a fresh one per request), and all ranks run to their end as they would if torchrun did not stop the
others; a request past its timeout is killed. Reply: ``{"returncodes": [...], "timed_out": bool}``.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import signal
import socket
import sys
import threading
import time
import traceback
import warnings

import torch.distributed as dist

# Imported once here, not in every child.
PRELOAD = [f"torchtitan_hyena.{m}" for m in ("train", "evaluate", "score", "preprocess", "convert.cli", "convert.evo2",
                                             "models.llama3", "models.hyena")]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fork(body, *args) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            body(*args)
        finally:
            os._exit(1)
    return pid


def _serve_store(port: int) -> None:
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    while store:  # serve until the request is done (SIGTERM)
        time.sleep(60)


def _run_rank(request: dict, rank: int, ranks: int, port: int | None) -> None:
    log = os.open(f"{request['log']}.{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.chdir(request["cwd"])
    for name in request.get("unset", []):
        os.environ.pop(name, None)
    os.environ.update(request.get("env", {}))
    if ranks > 1:  # what torchrun --standalone gives each worker
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks),
            GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
            TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0", TORCHELASTIC_RUN_ID="zygote",
        )  # fmt: skip
    warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package")  # runpy, re-run
    code = 0
    try:
        if "module" in request:
            sys.argv = [request["module"], *request["argv"]]
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [request["script"], *request["argv"]]
            runpy.run_path(request["script"], run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run(request: dict) -> dict:
    ranks = int(request.get("ranks", 1))
    store, port = None, None
    if ranks > 1:
        port = _free_port()
        store = _fork(_serve_store, port)
    pids = [_fork(_run_rank, request, rank, ranks, port) for rank in range(ranks)]
    codes: dict[int, int] = {}
    deadline = time.monotonic() + float(request.get("timeout", 300))
    while len(codes) < ranks and time.monotonic() < deadline:
        for i, pid in enumerate(pids):
            if i not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[i] = os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    timed_out = len(codes) < ranks
    for i, pid in enumerate(pids):
        if i not in codes:
            os.kill(pid, signal.SIGKILL)
            codes[i] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if store is not None:
        os.kill(store, signal.SIGTERM)
        os.waitpid(store, 0)
    return {"returncodes": [codes[i] for i in range(ranks)], "timed_out": timed_out}


def main() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    # Forking is only safe while this process has no other thread.
    assert threading.active_count() == 1, threading.enumerate()
    for line in sys.stdin:
        print(json.dumps(run(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
