"""What the self-test records: the environment, its checks (pass, fail or skipped, with the numbers behind them) and
its measurements, printed as tables and written as one JSON file."""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import triton
from tabulate import tabulate

from torchtitan_hyena.tools.logging import logger
from torchtitan_hyena.tools.outputs import atomic_output_file

GIB = 2**30


def device_info(device: torch.device) -> dict[str, Any]:
    """Name, architecture (gfx arch on ROCm, sm_XY on CUDA), memory and count of the device type."""
    if device.type != "cuda":
        return {"type": device.type, "name": platform.processor() or platform.machine(), "arch": platform.machine()}
    props = torch.cuda.get_device_properties(device)
    arch = props.gcnArchName.split(":")[0] if torch.version.hip else f"sm_{props.major}{props.minor}"
    return {
        "type": "rocm" if torch.version.hip else "cuda",
        "name": props.name,
        "arch": arch,
        "memory_gib": props.total_memory / GIB,
        "count": torch.cuda.device_count(),
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hip": torch.version.hip,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,  # the module the kernels run on (pytorch-triton-rocm on ROCm)
        "flash_attn": _version("flash_attn"),
        "torchao": _version("torchao"),
    }


def default_output(device: torch.device, date: datetime.date) -> Path:
    """``bench/results/selftest_<device>_<date>.json`` under the working directory (the repository on a cluster)."""
    name = device_info(device)["name"] if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    return Path("bench") / "results" / f"selftest_{slug}_{date.isoformat()}.json"


@dataclass
class Report:
    """Rows of every section; ``checks`` are the correctness rows that decide the exit status."""

    mode: str
    device: torch.device
    started: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc))
    sections: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each part of the run

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Time one part of the run; an exception in it becomes a failed row in ``errors`` (logged with its
        traceback) instead of ending the run, so one broken piece does not hide the others' results."""
        start = time.perf_counter()
        try:
            yield
        except Exception as e:
            logger.exception(f"selftest: {name} raised")
            self.check("errors", name, False, f"{type(e).__name__}: {e}")
        finally:
            self.seconds[name] = time.perf_counter() - start

    def add(self, section: str, row: dict[str, Any]) -> None:
        self.sections.setdefault(section, []).append(row)

    def check(self, section: str, name: str, passed: bool | None, detail: str = "", **numbers: Any) -> None:
        """A correctness row: ``passed`` None means skipped (``detail`` says why)."""
        status = "skipped" if passed is None else ("pass" if passed else "FAIL")
        self.add(section, {"check": name, "status": status, "detail": detail, **numbers})

    @property
    def failures(self) -> list[str]:
        return [f"{s}: {r['check']}" for s, rows in self.sections.items() for r in rows if r.get("status") == "FAIL"]

    def to_json(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "date": self.started.isoformat(timespec="seconds"),
            "hostname": socket.gethostname(),
            "mode": self.mode,
            "device": device_info(self.device),
            "versions": versions(),
            **extra,
            "passed": not self.failures,
            "failures": self.failures,
            "seconds": self.seconds,
            "sections": self.sections,
        }

    def print_tables(self, columns: dict[str, list[str]]) -> None:
        """One table per section, with that section's ``columns`` (every key when none are given)."""
        for section, rows in self.sections.items():
            cols = columns.get(section) or list(dict.fromkeys(k for r in rows for k in r))
            cols = [c for c in cols if any(c in r for r in rows)]
            table = [[_cell(r.get(c)) for c in cols] for r in rows]
            print(f"\n{section}\n" + tabulate(table, headers=cols, floatfmt=".3g", missingval="-"), flush=True)

    def write(self, path: Path, extra: dict[str, Any]) -> None:
        with atomic_output_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_json(extra), indent=1) + "\n")


def _cell(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 100:
        return value[:97] + "..."
    return value
