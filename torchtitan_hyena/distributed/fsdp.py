"""FSDP2 / HSDP wrapping shared by the model families."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from torchtitan_hyena.dtypes import DTYPES
from torchtitan_hyena.tools.logging import logger


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: str,
    reduce_dtype: str,
    reshard_after_forward: str,
    cpu_offload: bool,
    units: Sequence[nn.Module | Sequence[nn.Module]],
    last_unit: Sequence[nn.Module],
    fp32_units: Sequence[nn.Module] = (),
) -> None:
    """Shard ``units`` (embedding, each block), then ``last_unit`` (final norm + head), then the root.

    ``fp32_units`` (e.g. Hyena-LI filters) are sharded first as their own units whose parameters are
    gathered and reduced in fp32 whatever ``param_dtype`` is; their inputs are not cast.

    ``reshard_after_forward``: "default"/"always" free gathered parameters after forward,
    "never" keeps them (more memory, no re-gather in backward). The last unit reshards only
    with "always": FSDP would prefetch it straight back for backward.
    Gradient division is disabled: the loss is already normalised by the global token count.
    """
    kwargs = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype]),
    }
    if cpu_offload:
        # Pinned host memory needs an accelerator; on CPU runs offloading only exercises the code path.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu")
    reshard = reshard_after_forward != "never"
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for module in fp32_units:
        fully_shard(module, reshard_after_forward=reshard, **{**kwargs, "mp_policy": fp32})
    for unit in units:
        modules = [m for m in ([unit] if isinstance(unit, nn.Module) else unit) if m is not None]
        if modules:
            fully_shard(modules if len(modules) > 1 else modules[0], reshard_after_forward=reshard, **kwargs)
    last = [m for m in last_unit if m is not None]
    if last:
        fully_shard(last, reshard_after_forward=reshard_after_forward == "always", **kwargs)
    fully_shard(model, reshard_after_forward=reshard, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # Plain SUM collectives: gloo has no PREMUL_SUM, and NCCL's zero-copy path wants SUM too.
            module.set_force_sum_reduction_for_comms(True)
    hsdp = mesh.ndim == 2
    logger.info(f"applied {'HSDP' if hsdp else 'FSDP'} over mesh {mesh.mesh_dim_names} ({param_dtype} params)")
