"""count_collectives on 2 gloo processes: exact bytes and calls of c10d, functional, DTensor and p2p collectives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from torchtitan_hyena.distributed.comm_counter import count_collectives
from torchtitan_hyena.distributed.utils import all_gather_single, reduce_scatter_single

F = 4  # bytes per float32


def _scenarios(mesh: DeviceMesh, other: dist.ProcessGroup) -> dict[str, dict]:
    """Each scenario's counts on this rank, in a dict keyed by scenario name."""
    pg, rank = mesh.get_group(), dist.get_rank()
    x = torch.ones(4)
    out: dict[str, dict] = {}

    def run(name, fn):
        with count_collectives(mesh) as counts:
            fn()
        out[name] = counts.summary()

    run("c10d_all_gather", lambda: all_gather_single(torch.empty(8), x, group=pg))
    run("funcol_all_gather", lambda: funcol.all_gather_tensor(x, 0, pg).wait())
    run("c10d_reduce_scatter", lambda: reduce_scatter_single(torch.empty(4), torch.ones(8), group=pg))
    run("funcol_reduce_scatter", lambda: funcol.reduce_scatter_tensor(torch.ones(8), "sum", 0, pg).wait())
    run("c10d_all_reduce_world", lambda: dist.all_reduce(torch.ones(3)))
    run("c10d_all_reduce_other", lambda: dist.all_reduce(torch.ones(3), group=other))
    run("funcol_all_reduce", lambda: funcol.all_reduce(torch.ones(5), "sum", pg).wait())
    run("c10d_all_to_all", lambda: dist.all_to_all_single(torch.empty(6), torch.ones(6), group=pg))
    run("funcol_all_to_all", lambda: funcol.all_to_all_single(torch.ones(6), None, None, pg).wait())
    run("broadcast", lambda: dist.broadcast(torch.ones(2), group=pg, group_src=0))

    def send_recv():
        if rank == 0:
            dist.send(torch.ones(3), group=pg, group_dst=1)
        else:
            dist.recv(torch.empty(3), group=pg, group_src=0)

    run("send_recv", send_recv)

    def batch_p2p():
        peer = dist.get_global_rank(pg, 1 - rank)
        ops = [dist.P2POp(dist.isend, torch.ones(3), peer, pg), dist.P2POp(dist.irecv, torch.empty(5), peer, pg)]
        if rank == 1:
            ops = [dist.P2POp(dist.irecv, torch.empty(3), peer, pg), dist.P2POp(dist.isend, torch.ones(5), peer, pg)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    run("batch_p2p", batch_p2p)

    local = torch.ones(2, 3)  # global (4, 3) sharded on dim 0

    def redistribute(src, dst):
        return lambda: DTensor.from_local(local, mesh, [src]).redistribute(mesh, [dst]).to_local()

    run("dtensor_shard_to_replicate", redistribute(Shard(0), Replicate()))
    run("dtensor_partial_to_shard", redistribute(Partial(), Shard(0)))
    run("dtensor_partial_to_replicate", redistribute(Partial(), Replicate()))

    def autograd_all_gather():  # backward runs the adjoint reduce-scatter, and must be seen too
        leaf = torch.ones(4, requires_grad=True)
        funcol.all_gather_tensor_autograd(leaf, 0, pg).sum().backward()

    run("autograd_all_gather", autograd_all_gather)

    def dtensor_backward():
        leaf = torch.ones(2, 3, requires_grad=True)
        full = DTensor.from_local(leaf, mesh, [Shard(0)]).redistribute(mesh, [Replicate()])
        full.to_local(grad_placements=[Partial()]).sum().backward()  # backward: Partial -> Shard

    run("dtensor_backward", dtensor_backward)
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        tp = dist.new_group([0, 1])  # not the default group: "world" and "tp" must differ
        other = dist.new_group([0, 1])
        mesh = DeviceMesh.from_group(tp, "cpu", mesh_dim_names=("tp",))
        Path(out_dir, f"{rank}.json").write_text(json.dumps(_scenarios(mesh, other)))
    finally:
        dist.destroy_process_group()


def _c(key: str, nbytes: int, calls: int = 1) -> dict:
    return {key: {"bytes": nbytes, "calls": calls}}


EXPECTED = {
    "c10d_all_gather": _c("tp/all_gather", 4 * F),
    "funcol_all_gather": _c("tp/all_gather", 4 * F),
    "c10d_reduce_scatter": _c("tp/reduce_scatter", 8 * F),
    "funcol_reduce_scatter": _c("tp/reduce_scatter", 8 * F),
    "c10d_all_reduce_world": _c("world/all_reduce", 3 * F),
    "c10d_all_reduce_other": _c("tp/all_reduce", 3 * F),  # a group with the tp ranks counts as tp
    "funcol_all_reduce": _c("tp/all_reduce", 5 * F),
    "c10d_all_to_all": _c("tp/all_to_all", 6 * F),
    "funcol_all_to_all": _c("tp/all_to_all", 6 * F),
    "broadcast": _c("tp/broadcast", 2 * F),
    "batch_p2p": {"tp/recv": {"bytes": 5 * F, "calls": 1}, "tp/send": {"bytes": 3 * F, "calls": 1}},
    "dtensor_shard_to_replicate": _c("tp/all_gather", 6 * F),
    "dtensor_partial_to_shard": _c("tp/reduce_scatter", 6 * F),
    "dtensor_partial_to_replicate": _c("tp/all_reduce", 6 * F),
    "autograd_all_gather": {**_c("tp/all_gather", 4 * F), **_c("tp/reduce_scatter", 8 * F)},
    "dtensor_backward": {**_c("tp/all_gather", 6 * F), **_c("tp/reduce_scatter", 12 * F)},
}


@pytest.fixture(scope="module")
def counts(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("comm_counter")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return [json.loads((tmp / f"{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts(counts: list[dict], name: str) -> None:
    for rank in range(2):
        expected = EXPECTED[name]
        if name == "batch_p2p" and rank == 1:
            expected = {"tp/recv": {"bytes": 3 * F, "calls": 1}, "tp/send": {"bytes": 5 * F, "calls": 1}}
        assert counts[rank][name] == expected, f"rank {rank}"


def test_send_recv(counts: list[dict]) -> None:
    assert counts[0]["send_recv"] == _c("tp/send", 3 * F)
    assert counts[1]["send_recv"] == _c("tp/recv", 3 * F)
