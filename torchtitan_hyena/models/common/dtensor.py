"""Plain local tensors from parameters that tensor parallelism may have turned into DTensors.

Under TP every parameter is a DTensor on the TP mesh (sharded or replicated), which keeps the optimizer
and FSDP on one mesh, while activations between blocks stay plain tensors. Modules that use a parameter
outside an ``nn.Linear`` handled by a TP style (norms, embeddings, convolution filters) take its local
shard with :func:`local`; the gradient flows back into the DTensor with the same placement.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` (``t`` itself when it is a plain tensor)."""
    return t.to_local() if isinstance(t, DTensor) else t
