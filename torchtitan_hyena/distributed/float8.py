"""Float8 linear layers through torchao, gated on hardware that really has fp8 matmuls.

The gate never trusts ``torch.cuda.get_device_capability()`` alone: on ROCm it returns
gfx-derived tuples, and MI250X (gfx90a, no fp8 at all) reports (9, 0), which passes an
"SM89 or later" check. AMD devices are recognised by ``torch.version.hip`` and gated on the gfx
architecture string instead: gfx94x (MI300, FNUZ fp8, which torchao selects itself), gfx95x
(MI350) and gfx12xx have fp8; NVIDIA needs SM 8.9+. Anything else fails with a clear error unless
``float8.emulate`` is set (eager emulation on any device; this is how CPU tests run the path).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn

from torchtitan_hyena.config.job_config import Float8
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.tools.logging import logger

_GFX = re.compile(r"gfx(\d+)([0-9a-f])([0-9a-f])")


@dataclass(frozen=True)
class Accelerator:
    """What the float8 gate needs to know about a device (a plain value, so tests can fake any GPU)."""

    kind: str  # "cpu", "cuda" (NVIDIA) or "rocm" (AMD; torch still calls the device "cuda")
    name: str
    capability: tuple[int, int] = (0, 0)  # NVIDIA compute capability
    gfx_arch: str = ""  # AMD architecture, e.g. "gfx942" (feature suffixes such as ":sramecc+" stripped)


def describe_accelerator(device: torch.device) -> Accelerator:
    """The :class:`Accelerator` for ``device``, read from torch."""
    if device.type != "cuda":
        return Accelerator(kind=device.type, name=device.type)
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip is not None:
        return Accelerator(kind="rocm", name=props.name, gfx_arch=props.gcnArchName.split(":")[0])
    return Accelerator(kind="cuda", name=props.name, capability=(props.major, props.minor))


def float8_unsupported_reason(acc: Accelerator) -> str | None:
    """None when ``acc`` has hardware fp8 matmuls, else a short reason naming the device."""
    if acc.kind == "cuda":
        if acc.capability >= (8, 9):
            return None
        major, minor = acc.capability
        return f"{acc.name} (SM {major}.{minor}) has no fp8 tensor cores (needs SM 8.9+: Ada, Hopper, Blackwell)"
    if acc.kind == "rocm":
        m = _GFX.fullmatch(acc.gfx_arch)
        if m is not None:
            major, minor = int(m.group(1)), int(m.group(2), 16)
            if (major == 9 and minor >= 4) or major >= 12:
                return None
        return (
            f"{acc.name} ({acc.gfx_arch or 'unknown gfx arch'}) has no fp8 matrix units "
            "(needs AMD gfx942+: MI300/MI350; MI250X is gfx90a)"
        )
    return f"the {acc.kind} device has no fp8 matmuls"


def validate_float8(config: Float8, parallel_dims: ParallelDims, acc: Accelerator) -> None:
    """Reject float8 settings the hardware or the layout cannot honour, before any model is built."""
    if not config.enable:
        return
    if not config.emulate:
        reason = float8_unsupported_reason(acc)
        if reason is not None:
            raise ConfigError(
                f"float8.enable = true but {reason}; set float8.enable = false to train in bf16 "
                "(or float8.emulate = true for a slow functional test)"
            )
    if config.enable_fsdp_float8_all_gather:
        if config.recipe != "tensorwise":
            raise ConfigError(
                f"float8.enable_fsdp_float8_all_gather works with recipe 'tensorwise' only, not {config.recipe!r}; "
                "set one of them differently"
            )
        if not parallel_dims.fsdp_enabled:
            raise ConfigError(
                "float8.enable_fsdp_float8_all_gather needs FSDP (data_parallel_shard_degree > 1); "
                "set it to false or shard the parameters"
            )
        if acc.kind == "cpu":
            raise ConfigError(
                "float8.enable_fsdp_float8_all_gather needs NCCL/RCCL: gloo (CPU) cannot all-gather float8 tensors; "
                "set it to false on CPU"
            )
    if config.precompute_float8_dynamic_scale_for_fsdp and not config.enable_fsdp_float8_all_gather:
        raise ConfigError(
            "float8.precompute_float8_dynamic_scale_for_fsdp needs float8.enable_fsdp_float8_all_gather = true"
        )


def is_tensorwise(config: Float8) -> bool:
    """Whether float8 is on with tensorwise scaling (TP may then all-gather in float8)."""
    return config.enable and config.recipe == "tensorwise"


def convert_to_float8(model: nn.Module, config: Float8, *, tp_degree: int, compiled: bool) -> None:
    """Swap eligible ``nn.Linear`` modules of the meta-device ``model`` for torchao ``Float8Linear``.

    Skipped (kept in high precision): names containing a ``filter_fqns`` entry or one of the model's
    ``no_float8_keywords`` (e.g. Hyena filter MLPs), and linears whose dimensions are not multiples of 16
    on every tensor-parallel shard (fp8 GEMM constraint).
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.config import e4m3_dtype

    ao_config = dataclasses.replace(
        Float8LinearConfig.from_recipe_name(config.recipe),
        emulate=config.emulate,
        enable_fsdp_float8_all_gather=config.enable_fsdp_float8_all_gather,
    )
    if config.recipe != "tensorwise" and compiled:
        # Inductor must round like eager when casting to float8 (pytorch/pytorch#150859).
        torch._inductor.config.emulate_precision_casts = True
    filtered, small, converted = [], [], []
    multiple = 16 * tp_degree

    skip = (*config.filter_fqns, *getattr(model, "no_float8_keywords", ()))

    def keep_in_float8(module: nn.Module, fqn: str) -> bool:
        if any(f in fqn for f in skip):
            filtered.append(fqn)
            return False
        if module.in_features % multiple or module.out_features % multiple:
            small.append(fqn)
            return False
        converted.append(fqn)
        return True

    convert_to_float8_training(model, config=ao_config, module_filter_fn=keep_in_float8)
    if not converted:
        raise ConfigError(
            "float8.enable = true but no linear layer qualifies (filtered by float8.filter_fqns or dimensions not "
            f"multiples of {multiple}); set float8.enable = false or shorten filter_fqns"
        )
    unused = [f for f in config.filter_fqns if not any(f in fqn for fqn in filtered)]
    if unused:
        logger.warning(f"float8.filter_fqns entries match no linear layer: {unused}")
    logger.info(
        f"float8 ({config.recipe}, {e4m3_dtype}{', emulated' if config.emulate else ''}"
        f"{', fsdp float8 all-gather' if config.enable_fsdp_float8_all_gather else ''}): "
        f"{len(converted)} linear layers converted; kept in high precision: {', '.join(filtered + small) or 'none'}"
    )


def precompute_float8_scales(model_parts: list[nn.Module]) -> None:
    """After the optimizer step: every float8 weight's scale in one all-reduce (FSDP float8 all-gather)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for model in model_parts:
        precompute_float8_dynamic_scale_for_fsdp(model)
