"""Data parallelism on real gloo processes matches one process with the same global batch."""

from __future__ import annotations

import pytest

from tests.conftest import TINY, assert_losses_close, torchrun_losses

pytestmark = pytest.mark.slow


def test_fsdp_and_hsdp_match_one_process(tmp_path):
    # 6 steps of 8 x 64 tokens; lr 1e-3 keeps the early loss spike from amplifying summation-order noise
    batch = ["--training.global_batch_size", "8", "--training.local_batch_size", "2", "--training.seq_len", "64",
             "--training.steps", "6", "--optimizer.lr", "1e-3"]  # fmt: skip
    (single,) = torchrun_losses(1, [[*TINY, *batch, "--job.dump_folder", str(tmp_path / "one")]], tmp_path)
    fsdp, hsdp = torchrun_losses(
        4,
        [
            [*TINY, *batch, "--parallelism.data_parallel_shard_degree", "4", "--job.dump_folder", str(tmp_path / "f")],
            [*TINY, *batch, "--parallelism.data_parallel_replicate_degree", "2",
             "--parallelism.data_parallel_shard_degree", "2", "--job.dump_folder", str(tmp_path / "h")],
        ],
        tmp_path,
    )  # fmt: skip
    assert single[-1] < single[0]
    assert_losses_close(fsdp, single, rtol=1e-5)
    assert_losses_close(hsdp, single, rtol=1e-5)


def _clip_on_mixed_meshes(rank: int, world: int, store: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from torchtitan_hyena.distributed.utils import clip_grad_norm_

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        torch.manual_seed(0)  # the same full gradients on every rank
        full = [torch.randn(8, 6), torch.randn(4, 6), torch.randn(5), torch.randn(3, 3), torch.randn(7)]
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in full]
        params[0].grad = distribute_tensor(full[0], mesh, [Shard(0), Shard(1)])  # FSDP x TP matrix
        params[1].grad = distribute_tensor(full[1], mesh, [Shard(0), Replicate()])  # FSDP-only weight
        params[2].grad = distribute_tensor(full[2], mesh["tp"], [Replicate()])  # a 1-D sub-mesh
        params[3].grad = DTensor.from_local(full[3] / 2, mesh["tp"], [Partial()])  # sums to full[3] over tp
        params[4].grad = full[4].clone()  # a plain tensor, identical on every rank
        expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in full]))  # before clipping in place
        full0 = full[0].clone()
        total = clip_grad_norm_(params, max_norm=1.0)
        clipped = params[0].grad.full_tensor()
        torch.save({"total": total, "expected": expected, "clipped": clipped, "full0": full0}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_grad_norm_and_clipping_across_meshes_and_placements(tmp_path):
    """Shards add up, replicas and ranks outside a sub-mesh count once, partial gradients are reduced first."""
    import torch

    out = str(tmp_path / "clip")
    torch.multiprocessing.spawn(_clip_on_mixed_meshes, args=(4, str(tmp_path / "store"), out), nprocs=4)
    for rank in range(4):
        r = torch.load(f"{out}.{rank}")
        assert torch.allclose(r["total"], r["expected"], rtol=1e-6), (rank, r["total"], r["expected"])
        assert torch.allclose(r["clipped"], r["full0"] / r["expected"], rtol=1e-5)
