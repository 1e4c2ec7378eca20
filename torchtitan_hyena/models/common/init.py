"""Layout-invariant parameter initialisation.

Each parameter is drawn as a *full* tensor from its own generator, seeded by the run seed and
the parameter's name, and each rank keeps its shard. The weights therefore do not depend on the
parallel layout (1 rank, FSDP 4, TP 2, ...) or on the order of initialisation, which is what lets
distributed runs be compared with one process and checkpoints move between layouts.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from torchtitan_hyena.distributed.utils import clean_fqn

InitFn = Callable[[torch.Tensor, torch.Generator], None]


def param_seed(seed: int, fqn: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(clean_fqn(fqn).encode())) % (2**63 - 1)


@torch.no_grad()
def init_param_(param: torch.Tensor, fn: InitFn, seed: int, fqn: str) -> None:
    """Initialise ``param`` (plain tensor or DTensor shard) as the full tensor ``fn`` would draw."""
    gen = torch.Generator(device=param.device).manual_seed(param_seed(seed, fqn))
    if isinstance(param, DTensor):
        full = torch.empty(param.shape, dtype=param.dtype, device=param.device)
        fn(full, gen)
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        fn(param, gen)


def normal(std: float, mean: float = 0.0) -> InitFn:
    return lambda t, g: t.normal_(mean, std, generator=g)


def trunc_normal(std: float, cutoff: float = 2.0) -> InitFn:
    """Truncated normal at +-cutoff (TorchTitan truncates at +-2 absolute unless a cutoff in stds is given)."""
    return lambda t, g: torch.nn.init.trunc_normal_(t, 0.0, std, -cutoff, cutoff, generator=g)


def constant(value: float) -> InitFn:
    return lambda t, g: t.fill_(value)


def uniform(bound: float) -> InitFn:
    """U(-bound, bound): PyTorch's default for convolutions and linear layers is bound = 1/sqrt(fan_in)."""
    return lambda t, g: t.uniform_(-bound, bound, generator=g)
