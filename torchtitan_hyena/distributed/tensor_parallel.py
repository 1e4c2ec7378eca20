"""Tensor (+ sequence) parallel building blocks shared by the model families' TP plans.

Activations between blocks are sequence-sharded (``Shard(1)``): the embedding scatters its output
over the sequence, norms run on their sequence shard, and each block all-gathers its input once
(``PrepareModuleInput``), runs column-parallel input projections and a row-parallel output
projection that reduce-scatters back to sequence shards. The output head is column-parallel over
the vocabulary; with loss parallel its logits stay vocab-sharded and the cross entropy runs on
the shards under :func:`maybe_loss_parallel`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)
from torch.distributed.tensor.parallel import (
    loss_parallel as loss_parallel_context,
)

from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.tools.logging import logger


def check_tp_divisible(tp: int, sizes: Mapping[str, int], what: str) -> None:
    """Raise a one-line ConfigError unless ``tp`` divides every size in ``sizes`` (e.g. head counts)."""
    if tp <= 1:
        return
    for name, size in sizes.items():
        if size % tp:
            raise ConfigError(
                f"parallelism.tensor_parallel_degree {tp} does not divide {what} {name} = {size}; "
                f"use a tensor_parallel_degree that divides {size}"
            )


class _CopiedOutputRowwiseParallel(RowwiseParallel):
    """RowwiseParallel whose local output is a fresh tensor rather than a view of the DTensor's shard.

    torch.compile (AOTAutograd, seen with torch 2.13) returns no gradient for a compiled block input
    that is such a view of the vocab-parallel embedding's output, and the embedding's backward then
    fails (``'Tensor' object has no attribute '_local_tensor'``). One copy of the sequence shard avoids it.
    """

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        out = RowwiseParallel._prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh)
        return out.clone() if use_local_output else out


def embedding_plan(compiled: bool = False) -> ParallelStyle:
    """Vocab-parallel embedding whose output is scattered over the sequence (enters SP regions).

    ``compiled``: the blocks after it are torch.compile'd (see :class:`_CopiedOutputRowwiseParallel`).
    """
    style = _CopiedOutputRowwiseParallel if compiled else RowwiseParallel
    return style(input_layouts=Replicate(), output_layouts=Shard(1))


def norm_plan() -> ParallelStyle:
    """Norms (and other per-token ops) run on their sequence shard."""
    return SequenceParallel()


def output_plan(loss_parallel: bool) -> ParallelStyle:
    """Vocab-parallel output head; keeps logits vocab-sharded (DTensor) for loss parallel."""
    return ColwiseParallel(
        input_layouts=Shard(1),
        output_layouts=Shard(-1) if loss_parallel else Replicate(),
        use_local_output=not loss_parallel,
    )


def float8_collectives(float8_tensorwise: bool, tp_mesh: DeviceMesh) -> bool:
    """Whether TP all-gathers may travel in float8: tensorwise float8 on NCCL/RCCL.

    gloo cannot all-gather float8 tensors, so CPU runs gather in high precision; with tensorwise
    scaling the numerics are the same (one scale from the global amax either way).
    """
    if float8_tensorwise and tp_mesh.device_type == "cpu":
        logger.info("float8: TP all-gathers stay in high precision on CPU (gloo has no float8 collectives)")
        return False
    return float8_tensorwise


def linear_styles(
    linears: list[nn.Module], float8_collectives: bool
) -> tuple[type[ParallelStyle], type[ParallelStyle], type[ParallelStyle]]:
    """(colwise, rowwise, prepare-input) styles for one group of linears fed by the same input.

    With float8 collectives and every linear of the group converted, torchao's float8 styles cast
    before the all-gather, so TP collectives travel in float8. Otherwise the plain styles: torchao
    handles ``Float8Linear`` on DTensors too (rowwise scaling, or linears float8 filtered out).
    """
    if float8_collectives:
        from torchao.float8.float8_linear import Float8Linear
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
            PrepareFloat8ModuleInput,
        )

        if all(isinstance(m, Float8Linear) for m in linears):
            return Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput
    return ColwiseParallel, RowwiseParallel, PrepareModuleInput


def block_input_plan(prepare: type[ParallelStyle], n_extra_args: int = 0) -> ParallelStyle:
    """All-gather a block's sequence-sharded first input; ``n_extra_args`` further inputs pass through."""
    extra = (None,) * n_extra_args
    return prepare(input_layouts=(Shard(1), *extra), desired_input_layouts=(Replicate(), *extra))


def prenorm_block_plan(
    block: nn.Module,
    *,
    norms: tuple[str, str],
    mixer: str,
    mixer_in: Sequence[str],
    mixer_out: str,
    mlp: str,
    mixer_extra_args: int,
    float8: bool,
) -> dict[str, ParallelStyle]:
    """The plan of a pre-norm block, ``x + mixer(norm1(x))`` then ``h + mlp(norm2(h))`` with a gated MLP
    (``w1``/``w3`` in, ``w2`` out): norms on sequence shards, the mixer's input projections ``mixer_in`` and the
    MLP's ``w1``/``w3`` column-parallel after one all-gather of the block input, ``mixer_out`` and ``w2``
    row-parallel, reduce-scattering back to sequence shards. ``mixer_extra_args``: mixer inputs after the first
    that pass through (e.g. RoPE tables); ``float8``: TP collectives may travel in float8 (:func:`linear_styles`)."""
    mixing, gated = block.get_submodule(mixer), block.get_submodule(mlp)
    m_col, m_row, m_prep = linear_styles([*(mixing.get_submodule(n) for n in (*mixer_in, mixer_out))], float8)
    f_col, f_row, f_prep = linear_styles([gated.w1, gated.w2, gated.w3], float8)
    return {
        norms[0]: norm_plan(),
        mixer: block_input_plan(m_prep, n_extra_args=mixer_extra_args),
        **{f"{mixer}.{name}": m_col() for name in mixer_in},
        f"{mixer}.{mixer_out}": m_row(output_layouts=Shard(1)),
        norms[1]: norm_plan(),
        mlp: block_input_plan(f_prep),
        f"{mlp}.w1": f_col(),
        f"{mlp}.w2": f_row(output_layouts=Shard(1)),
        f"{mlp}.w3": f_col(),
    }


def maybe_enable_async_tp(enabled: bool, compiled: bool, tp_mesh: DeviceMesh) -> bool:
    """Overlap TP collectives with the matmuls (inductor micro-pipelining over symmetric memory).

    It needs torch.compile of the model and a CUDA build with symmetric memory; ROCm has no fused
    all-gather-matmul yet and CPU has no symmetric memory. Where unsupported it is skipped with a
    warning (TP still runs, without the overlap). Returns whether it was enabled.
    """
    if not enabled:
        return False
    reason = None
    if not compiled:
        reason = "it needs compile.enable = true with 'model' in compile.components"
    elif tp_mesh.device_type != "cuda" or torch.version.hip is not None:
        reason = f"it needs NVIDIA GPUs with symmetric memory (device: {tp_mesh.device_type}, hip: {torch.version.hip})"
    if reason is None:
        try:
            from torch.distributed._symmetric_memory import enable_symm_mem_for_group
        except ImportError:
            reason = "this torch build has no symmetric memory"
    if reason is not None:
        logger.warning(f"parallelism.enable_async_tensor_parallel skipped: {reason}")
        return False
    torch._inductor.config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)
    logger.info("async tensor parallel enabled (inductor micro-pipelining)")
    return True


def maybe_loss_parallel(enabled: bool) -> contextlib.AbstractContextManager:
    """Context for forward, loss and backward: cross entropy on vocab-sharded DTensor logits."""
    return loss_parallel_context() if enabled else contextlib.nullcontext()


def present(model: nn.Module, plan: dict[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    """The entries of a top-level plan whose module this model holds (a pipeline stage lacks some)."""
    return {name: style for name, style in plan.items() if getattr(model, name, None) is not None}
