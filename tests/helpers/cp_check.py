"""Context-parallel building blocks against one-process references, on real gloo processes.

    torchrun --nproc_per_node 4 -m tests.helpers.cp_check OUT.json

Runs on the whole world (CP 4) and on two CP 2 subgroups ({0, 1}, {2, 3}: group ranks differ from global
ranks, as under TP x CP). Every rank builds the same global tensors, computes the reference in-process and
the CP result on its shard; rank 0 writes the largest error of each check over all ranks (and the bytes the
ring sent) to OUT.json.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from torchtitan_hyena.distributed.context_parallel.attention import AllGatherAttention, RingAttention
from torchtitan_hyena.distributed.context_parallel.collectives import halo_exchange, track_communication
from torchtitan_hyena.distributed.context_parallel.convolution import (
    channels_to_sequence,
    fir_with_halo,
    sequence_to_channels,
)
from torchtitan_hyena.distributed.context_parallel.layout import ContextParallel, chunk_ids, shard_sequence
from torchtitan_hyena.models.common.attention import InnerAttention
from torchtitan_hyena.ops.conv import causal_conv_reference, gated_causal_conv_reference

CHUNK = 8


def seeded(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def check_halo(cp: ContextParallel, width: int) -> float:
    """Halo values and their gradients (sent back to the owners) against the global sequence."""
    n, c = cp.degree, CHUNK
    x_global = seeded(1, 2, 2 * n * c, 3)
    x = shard_sequence(x_global, cp.rank, n).requires_grad_()
    halo = halo_exchange(x, width, cp.rank, n, cp.group)
    padded = F.pad(x_global, (0, 0, width, 0))  # global position p sits at p + width
    err = 0.0
    padded_grad = torch.zeros_like(padded)  # every rank's halo weights, summed onto the positions they came from
    for r in range(n):
        weights = seeded(100 + r, 2, 2, width, 3)
        for slot, g in enumerate(chunk_ids(r, n)):
            if r == cp.rank:
                err = max(err, (halo[:, slot] - padded[:, g * c : g * c + width]).abs().max().item())
            padded_grad[:, g * c : g * c + width] += weights[:, slot]
    (halo * seeded(100 + cp.rank, 2, 2, width, 3)).sum().backward()
    expected = shard_sequence(padded_grad[:, width:], cp.rank, n)
    return max(err, (x.grad - expected).abs().max().item())


def check_fir(cp: ContextParallel, taps: int, gated: bool) -> float:
    """A causal FIR (taps may exceed a chunk) on shards with halos == on the whole sequence, with gradients."""
    n = cp.degree
    length = 2 * n * CHUNK
    inputs = [seeded(10 + i, 2, length, 4).requires_grad_() for i in range(3 if gated else 1)]
    weight = seeded(20, 2 if gated else 4, taps)

    def conv(*xs: torch.Tensor) -> torch.Tensor:
        if gated:
            return gated_causal_conv_reference(*xs, weight, seeded(21, 4), flip=True)
        return causal_conv_reference(*xs, weight)

    out_weight = seeded(22, 2, length, 4)
    (conv(*inputs) * out_weight).sum().backward()
    local = [shard_sequence(t.detach(), cp.rank, n).requires_grad_() for t in inputs]
    y = fir_with_halo(conv, local, [False, True, True] if gated else [True], taps, cp)
    (y * shard_sequence(out_weight, cp.rank, n)).sum().backward()
    err = (y - shard_sequence(conv(*inputs), cp.rank, n)).abs().max().item()
    for t, t_local in zip(inputs, local):
        err = max(err, (t_local.grad - shard_sequence(t.grad, cp.rank, n)).abs().max().item())
    return err


def check_all_to_all(cp: ContextParallel) -> float:
    """Sequence shards -> channel shards (in sequence order) -> back, with gradients."""
    n = cp.degree
    channels = 2 * n
    x_global = seeded(30, 2, 2 * n * CHUNK, channels)
    x = shard_sequence(x_global, cp.rank, n).requires_grad_()
    mine = slice(cp.rank * 2, cp.rank * 2 + 2)
    full = sequence_to_channels(x, cp)
    err = (full - x_global[..., mine]).abs().max().item()
    weights = seeded(31, 2, 2 * n * CHUNK, channels)
    (full * weights[..., mine]).sum().backward()
    err = max(err, (x.grad - shard_sequence(weights, cp.rank, n)).abs().max().item())
    return max(err, (channels_to_sequence(full, cp) - x).abs().max().item())


def check_attention(cp: ContextParallel, method: str) -> tuple[float, int]:
    """Causal GQA attention (4 query heads over 2 KV heads) on the load-balanced shards == SDPA on the whole.
    ``allgather_backend``: all-gather through the model's attention backend (bottom-right masked SDPA) as on GPUs,
    rather than CPU's two-block path."""
    n = cp.degree
    length = 2 * n * CHUNK
    q, k, v = (seeded(40 + i, 2, h, length, 8).requires_grad_() for i, h in enumerate((4, 2, 2)))
    out_weight = seeded(43, 2, 4, length, 8)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    (ref * out_weight).sum().backward()
    local = [shard_sequence(t.detach(), cp.rank, n, dim=2).requires_grad_() for t in (q, k, v)]
    module = (RingAttention if method == "ring" else AllGatherAttention)(InnerAttention("sdpa"), cp)
    if method == "allgather_backend":
        module.blockwise = lambda q: False
    with track_communication() as sent:
        out = module(*local)
        (out * shard_sequence(out_weight, cp.rank, n, dim=2)).sum().backward()
    err = (out - shard_sequence(ref, cp.rank, n, dim=2)).abs().max().item()
    for t, t_local in zip((q, k, v), local):
        err = max(err, (t_local.grad - shard_sequence(t.grad, cp.rank, n, dim=2)).abs().max().item())
    return err, sent["p2p"]


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    layouts = {
        f"cp{world}": ContextParallel(dist.group.WORLD, rank, world),
        "cp2": ContextParallel(pairs[rank // 2], rank % 2, 2),
    }
    results: dict[str, float] = {}
    for name, cp in layouts.items():
        for width in (1, 2, 6, CHUNK, 2 * CHUNK + 4):
            results[f"{name}/halo{width}"] = check_halo(cp, width)
        for taps, gated in ((3, False), (7, True), (2 * CHUNK + 5, True)):
            results[f"{name}/fir{taps}{'_gated' if gated else ''}"] = check_fir(cp, taps, gated)
        results[f"{name}/all_to_all"] = check_all_to_all(cp)
        for method in ("allgather", "allgather_backend", "ring"):
            err, sent = check_attention(cp, method)
            results[f"{name}/{method}"] = err
            results[f"{name}/{method}_p2p_bytes"] = float(sent)
    values = torch.tensor(list(results.values()), dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(dict(zip(results, values.tolist())), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
