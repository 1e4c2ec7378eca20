"""The safe DCP reader and the allow-list unpickler; temporary outputs; nothing else in the package unpickles."""

from __future__ import annotations

import logging
import os
import pickle
import re
import socket
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.conftest import REPO
from tests.helpers.bad_inputs import Canary
from torchtitan_hyena.components.dcp_reader import load_dcp, read_dcp_metadata
from torchtitan_hyena.components.safe_pickle import UnsafePickleError, restricted_loads
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.tools.logging import logger
from torchtitan_hyena.tools.outputs import atomic_output_dir, atomic_output_file, remove_stale_partials


def save(state: dict, folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_round_trips_in_every_protocol(protocol):
    data = {"a": [1, -2, 2**70, 2.5, "é" * 300, None, True, (1,), (1, 2), (1, 2, 3, 4)], "s": {1, 2},
            "f": frozenset([3]), "o": OrderedDict(x=1), "p": Point(3), "size": torch.Size([2, 3]),
            "t": torch.int8}  # fmt: skip
    if protocol >= 3:
        data["b"] = b"bytes"
    if protocol < 4:  # older protocols pickle sets through builtins.set: not plain data here
        del data["s"], data["f"]
    allowed = {(__name__, "Point"): Point, ("collections", "OrderedDict"): OrderedDict, ("torch", "Size"): torch.Size,
               ("torch", "int8"): torch.int8}  # fmt: skip
    out = restricted_loads(pickle.dumps(data, protocol=protocol), allowed)
    assert out["p"].x == 3 and {k: v for k, v in out.items() if k != "p"} == {k: v for k, v in data.items() if k != "p"}


def test_only_the_allow_list_is_reachable(tmp_path):
    canary = tmp_path / "CANARY"
    with pytest.raises(UnsafePickleError, match="refers to posix.system"):
        restricted_loads(pickle.dumps(Canary(canary)), {})
    with pytest.raises(UnsafePickleError, match="refers to .*Point"):
        restricted_loads(pickle.dumps(Point(1)), {})
    # BUILD on an allowed *class* would set class attributes: refused (the class's type is not allowed)
    evil = b"\x80\x04c" + f"{__name__}\nPoint\n".encode() + b"N}\x8c\x06__eq__K\x01s\x86b."
    with pytest.raises(UnsafePickleError, match="sets the state of a type"):
        restricted_loads(evil, {(__name__, "Point"): Point})
    assert not hasattr(Point, "__eq__") or Point.__eq__ is object.__eq__
    for bad in (b"", b"garbage", pickle.dumps([1, 2])[:-3]):
        with pytest.raises(UnsafePickleError):
            restricted_loads(bad, {})
    assert not canary.exists()


def test_metadata_of_a_real_checkpoint_reads_like_torch(tmp_path):
    path = save({"w": torch.arange(6.0).reshape(2, 3), "step": 7, "lr": 0.5, "betas": (0.9, 0.95)}, tmp_path / "c")
    meta = read_dcp_metadata(path)
    with (path / ".metadata").open("rb") as f:
        reference = pickle.load(f)  # our own file: safe to compare against the unrestricted reader
    assert meta.state_dict_metadata == reference.state_dict_metadata and meta.storage_data == reference.storage_data
    state = {"w": torch.zeros(2, 3), "step": 0, "lr": 0.0, "betas": None}
    load_dcp(state, path)
    assert torch.equal(state["w"], torch.arange(6.0).reshape(2, 3))
    assert (state["step"], state["lr"], state["betas"]) == (7, 0.5, (0.9, 0.95))


def test_non_tensor_entries_load_weights_only(tmp_path):
    """DCP's own planner unpickles non-tensor entries with weights_only=False; the reader's does not."""
    canary = tmp_path / "CANARY"
    path = save({"w": torch.ones(2), "train_state": {"step": Canary(canary)}}, tmp_path / "c")
    assert not canary.exists()
    with pytest.raises(UserError, match="objects that could run code, refused"):
        load_dcp({"w": torch.zeros(2), "train_state": {"step": 0}}, path)
    assert not canary.exists()


def test_stale_partial_outputs_are_removed_with_a_note(tmp_path):
    target = tmp_path / "out"
    host, me = socket.gethostname(), os.getpid()
    dead = 2**22 + 12345  # above the default pid_max: never a live process
    stale = [tmp_path / f".out.partial-{host}-{dead}-ab12", tmp_path / f".out.old-{host}-{dead}-cd34"]
    live = [tmp_path / f".out.partial-{host}-{me}-ef56", tmp_path / f".out.partial-elsewhere-{dead}-0000",
            tmp_path / ".other.partial-x-1-2"]  # fmt: skip
    for path in stale + live:
        path.mkdir()
    (tmp_path / f".out.partial-{host}-{dead}-file").write_text("half")
    notes: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: notes.append(record.getMessage())
    logger.addHandler(handler)
    try:
        remove_stale_partials(target)
    finally:
        logger.removeHandler(handler)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in live)
    assert len(notes) == 3 and all("left by an interrupted run" in n for n in notes)


def test_failed_outputs_leave_nothing_even_created_parents(tmp_path):
    for make in (lambda: atomic_output_dir(tmp_path / "a" / "b" / "out"), lambda: atomic_output_file(tmp_path / "a")):
        with pytest.raises(RuntimeError), make() as tmp:
            (tmp / "x").write_text("half") if tmp.is_dir() else tmp.write_text("half")
            raise RuntimeError("killed")
        assert list(tmp_path.iterdir()) == []
    with atomic_output_file(tmp_path / "new" / "f.txt") as tmp:
        tmp.write_text("done")
    assert (tmp_path / "new" / "f.txt").read_text() == "done" and len(list((tmp_path / "new").iterdir())) == 1


def test_nothing_else_in_the_package_unpickles_or_opens_dcp():
    """Every checkpoint read goes through components/dcp_reader.py; torch.load only with weights_only=True."""
    allowed = {"components/dcp_reader.py", "components/safe_pickle.py"}
    pattern = re.compile(r"dcp\.load\(|FileSystemReader\(|pickle\.loads?\(|Unpickler|weights_only=False|dcp_to_torch")
    offenders = []
    for path in [*(REPO / "torchtitan_hyena").rglob("*.py"), *REPO.glob("*.py")]:
        rel = path.relative_to(REPO / "torchtitan_hyena").as_posix() if "torchtitan_hyena" in path.parts else path.name
        if rel not in allowed and pattern.search(path.read_text()):
            offenders.append(rel)
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            if "weights_only=True" not in call:
                offenders.append(f"{rel}: {call}")
    assert offenders == []
