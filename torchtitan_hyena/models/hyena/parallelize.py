"""StripedHyena 2's parallelize plan (TP, CP, FSDP units) for the shared skeleton, and the layouts it cannot take.

Tensor parallel plan: Megatron TP with sequence parallelism, as for Llama (``distributed/tensor_parallel.py``):
activations between blocks are sequence shards, norms run on them, and each mixer and MLP all-gathers its
input once and reduce-scatters its output.

* Hyena operators: ``projections`` colwise. Its 3D rows are channel triples (3i, 3i+1, 3i+2), so a
  contiguous row block is whole triples of contiguous channels and the local de-interleave is the global
  one restricted to the rank's channels. Featurizer weights, SE/MR filter groups, LI filters and the D
  term are sharded with those channels (dim 0); ``out_proj`` rowwise.
* Attention: ``wqkv`` colwise (rows are (head, qkv, head_dim), so a row block is whole heads);
  ``out_proj`` rowwise. MLPs: ``w1``/``w3`` colwise, ``w2`` rowwise.
* The embedding (vocab 512 for Evo 2, also the tied head) is replicated: its output is cut into sequence
  shards, and the final norm's output is gathered again for the tied head, so logits are whole on every
  rank. An untied head is colwise over the vocabulary (loss parallel possible), as Llama's.

Context parallel plan (``distributed/context_parallel``, docs/stripedhyena2.md §12): attention as Llama's; the
featurizer and SE (and by default MR) filters exchange K-1 halo positions; LI (and MR with ``mr_method =
alltoall``) run on channel shards of the whole sequence, so this rank's channels (D/tp) must split into cp
slices of whole filter groups. The convolution modules are handed the context-parallel group and call those
exchanges themselves.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import PrepareModuleOutput, parallelize_module

from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.distributed.context_parallel import ContextParallel
from torchtitan_hyena.distributed.context_parallel.attention import apply_cp_attention
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.distributed.parallelize import FSDPUnits, ParallelizePlan, TPOptions
from torchtitan_hyena.distributed.pipeline_parallel import PipelinePlan
from torchtitan_hyena.distributed.tensor_parallel import (
    check_tp_divisible,
    float8_collectives,
    norm_plan,
    output_plan,
    prenorm_block_plan,
    present,
)
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.models.common.attention import InnerAttention
from torchtitan_hyena.models.common.precision import fp32_modules
from torchtitan_hyena.models.hyena.args import HyenaArgs
from torchtitan_hyena.models.hyena.filters import ExplicitSingleDecayFilter
from torchtitan_hyena.tools.logging import logger


def validate_hyena_parallelism(args: HyenaArgs, parallel_dims: ParallelDims, job_config: JobConfig) -> None:
    """Layouts StripedHyena 2 cannot take, rejected before the model is built."""
    check_tp_divisibility(args, parallel_dims.tp)
    if parallel_dims.cp_enabled:
        check_cp_divisibility(args, parallel_dims.tp, parallel_dims.cp, job_config.parallelism)
    if job_config.parallelism.enable_loss_parallel and args.tie_embeddings:
        raise ConfigError(
            "parallelism.enable_loss_parallel needs an untied output head; hyena's tied head computes whole "
            "logits on every rank (the vocabulary is small), so set enable_loss_parallel false"
        )


def check_tp_divisibility(args: HyenaArgs, tp: int) -> None:
    """Heads, channels, MLP width and SE/MR filter groups must split evenly over ``tp`` ranks."""
    sizes = {
        "n_heads": args.n_heads,
        "dim": args.dim,
        "ffn hidden dim": args.ffn_hidden_dim,
        "SE/MR filter groups": args.filter_groups,
    }
    check_tp_divisible(tp, sizes, "the hyena model's")
    if tp > 1 and args.li_filter == "implicit_freeform" and "H" in args.layout:
        raise ConfigError("implicit_freeform LI filters are not tensor-parallel; use implicit_modal or TP degree 1")


def check_cp_divisibility(args: HyenaArgs, tp: int, cp: int, parallelism) -> None:
    """Channel shards of the all-to-all convolutions must hold whole channels (LI) or whole filter groups (MR)."""
    p = parallelism
    if p.context_parallel_rotate_method == "ring" and args.attention_dropout > 0:
        raise ConfigError(
            "model.attention_dropout needs context_parallel_rotate_method allgather (ring attention has no dropout)"
        )
    sizes = {}
    if "H" in args.layout:
        sizes["dim / tensor_parallel_degree (Hyena-LI channels)"] = args.dim // tp
    if "D" in args.layout and p.context_parallel_mr_method == "alltoall":
        sizes["filter_groups / tensor_parallel_degree (Hyena-MR groups)"] = args.filter_groups // tp
    for name, size in sizes.items():
        if size % cp:
            raise ConfigError(
                f"parallelism.context_parallel_degree {cp} does not divide the hyena model's {name} = {size}; "
                f"use a context_parallel_degree that divides {size}"
            )


def apply_cp(model: nn.Module, cp: ContextParallel) -> None:
    """Attention as Llama's; halo exchange for the FIR convs, all-to-all for the long ones (module docstring)."""
    apply_cp_attention(model, cp, InnerAttention)
    for block in model.layers.values():
        if block.kind == "*":
            continue
        mixer = block.mixer
        mixer.featurizer.cp = cp
        mixer.filter.cp = cp
        mixer.filter.cp_all_positions = block.kind == "H" or (block.kind == "D" and cp.mr_method == "alltoall")
    logger.info(
        f"applied context parallel (degree {cp.degree}, {cp.rotate_method} attention, Hyena-MR by {cp.mr_method})"
    )


def fsdp_units(model: nn.Module) -> FSDPUnits:
    """Tied head: the embedding is used first and last, so it stays in the root unit (gathered for the whole
    forward; it is tiny at vocab 512). Untied: TorchTitan's embedding / (norm, head) units. LI filters are fp32.
    (A pipeline stage without the embedding or the head has its blocks as units and the rest in the root.)"""
    tied = model.output is None
    return FSDPUnits(
        model.layers,
        first=[] if tied else [model.tok_embeddings],
        last=[] if tied else [model.norm, model.output],
        fp32=fp32_modules(model),
    )


class _ScatterSequence(PrepareModuleOutput):
    """Cut the replicated embedding output into sequence shards (a copy: torch.compile returns no gradient for
    a compiled block input that is a view of another tensor, see ``_CopiedOutputRowwiseParallel``)."""

    def __init__(self) -> None:
        super().__init__(output_layouts=Replicate(), desired_output_layouts=Shard(1), use_local_output=True)

    def _prepare_out_fn(self, outputs, device_mesh):
        return super()._prepare_out_fn(outputs, device_mesh).clone()


def _shard_param(module: nn.Module, name: str, mesh: DeviceMesh) -> None:
    param = getattr(module, name)
    module.register_parameter(name, nn.Parameter(distribute_tensor(param.data, mesh, [Shard(0)])))


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, options: TPOptions) -> None:
    """The TP plan of the module docstring."""
    loss_parallel = options.loss_parallel
    fp8 = float8_collectives(options.float8_tensorwise, tp_mesh)
    tp, rank = tp_mesh.size(), tp_mesh.get_local_rank()
    top = {"tok_embeddings": _ScatterSequence(), "norm": norm_plan(), "output": output_plan(loss_parallel)}
    parallelize_module(model, tp_mesh, present(model, top))
    if model.output is None and model.norm is not None:  # gather the final norm's output for the tied head
        gather = PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True)
        parallelize_module(model.norm, tp_mesh, gather)
    for block in model.layers.values():
        mixer = block.mixer
        attention = block.kind == "*"
        plan = prenorm_block_plan(
            block,
            norms=("pre_norm", "post_norm"),
            mixer="mixer",
            mixer_in=("wqkv" if attention else "projections",),
            mixer_out="out_proj",
            mlp="mlp",
            mixer_extra_args=2 if attention else 0,  # attention: (x, cos, sin)
            float8=fp8,
        )
        parallelize_module(block, tp_mesh, plan)
        if attention:
            continue
        _shard_param(mixer.featurizer, "weight", tp_mesh)
        if mixer.D is not None:
            _shard_param(mixer, "D", tp_mesh)
        for name, _ in list(mixer.filter.named_parameters(recurse=False)):
            _shard_param(mixer.filter, name, tp_mesh)
        if isinstance(mixer.filter, ExplicitSingleDecayFilter):
            per_rank = mixer.filter.groups // tp
            mixer.filter.rows = (rank * per_rank, (rank + 1) * per_rank)
    # Everything else (the embedding) is replicated, so every parameter lives on the TP mesh.
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not isinstance(param, DTensor):
                module.register_parameter(name, nn.Parameter(distribute_tensor(param.data, tp_mesh, [Replicate()])))
    logger.info(
        f"applied tensor parallel (degree {tp}) with sequence parallel"
        f"{', loss parallel' if loss_parallel else ''}{', float8 all-gathers' if fp8 else ''}"
    )


def tied_modules(model: nn.Module) -> tuple[str, ...]:
    """With tied embeddings the last pipeline stage computes the logits from the embedding's weight."""
    return ("tok_embeddings",) if model.args.tie_embeddings else ()


HYENA_PLAN = ParallelizePlan(
    apply_tp=apply_tp, apply_cp=apply_cp, fsdp_units=fsdp_units, pipeline=PipelinePlan(tied=tied_modules)
)
