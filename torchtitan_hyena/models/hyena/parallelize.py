"""Apply parallelisms to StripedHyena 2, in TorchTitan's order: TP -> AC -> compile -> FSDP.

Tensor parallel plan (Megatron style, activations between blocks replicated over the TP group):

* Hyena operators: ``projections`` colwise. Its 3D rows are channel triples (3i, 3i+1, 3i+2), so a
  contiguous row block is whole triples of contiguous channels and the local de-interleave is the global
  one restricted to the rank's channels. Featurizer weights, SE/MR filter groups, LI filters and the D
  term are sharded with those channels (dim 0); ``out_proj`` rowwise.
* Attention: ``wqkv`` colwise (rows are (head, qkv, head_dim), so a row block is whole heads);
  ``out_proj`` rowwise. MLPs: ``w1``/``w3`` colwise, ``w2`` rowwise.
* Everything else (norms, the embedding, which is also the tied head) is replicated as a DTensor on the
  TP mesh, so every parameter lives on one mesh for FSDP and the optimizer. The vocabulary (512 for
  Evo 2) is too small for vocab-parallel logits to pay off, so logits are full on every rank.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.distributed.parallelize_common import apply_ac_compile_fsdp
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.models.common.precision import fp32_modules
from torchtitan_hyena.models.hyena.args import HyenaArgs
from torchtitan_hyena.models.hyena.filters import ExplicitSingleDecayFilter


def parallelize_hyena(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    """Parallelize a meta-device StripedHyena model in place and return it."""
    if parallel_dims.cp_enabled:
        raise ConfigError("context parallelism is not available for hyena in this build; set context_parallel_degree 1")
    if parallel_dims.tp_enabled:
        apply_tp(model, parallel_dims.get_mesh("tp"))
    # Tied head: the embedding is used first and last, so it stays in the root unit (gathered for the
    # whole forward; it is tiny at vocab 512). Untied: TorchTitan's embedding / (norm, head) units.
    tied = model.output is None
    apply_ac_compile_fsdp(
        model,
        model.layers,
        parallel_dims,
        job_config,
        first_units=[] if tied else [model.tok_embeddings],
        last_unit=[] if tied else [model.norm, model.output],
        fp32_units=fp32_modules(model),
    )
    return model


def check_tp_divisibility(args: HyenaArgs, tp: int) -> None:
    """Heads, channels, MLP width and SE/MR filter groups must split evenly over ``tp`` ranks."""
    for what, value in (
        ("attention heads (n_heads)", args.n_heads),
        ("hidden width (dim)", args.dim),
        ("MLP width (ffn_hidden_dim)", args.ffn_hidden_dim),
        ("SE/MR filter groups (filter_groups)", args.filter_groups),
    ):
        if value % tp:
            raise ConfigError(
                f"hyena {what} = {value} is not divisible by tensor_parallel_degree {tp}; "
                "choose a degree that divides it"
            )
    if args.li_filter == "implicit_freeform" and "H" in args.layout:
        raise ConfigError("implicit_freeform LI filters are not tensor-parallel; use implicit_modal or TP degree 1")


def _shard_param(module: nn.Module, name: str, mesh: DeviceMesh) -> None:
    param = getattr(module, name)
    module.register_parameter(name, nn.Parameter(distribute_tensor(param.data, mesh, [Shard(0)])))


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    tp = tp_mesh.size()
    check_tp_divisibility(model.args, tp)
    rank = tp_mesh.get_local_rank()
    for block in model.layers.values():
        plan = {"mlp.w1": ColwiseParallel(), "mlp.w3": ColwiseParallel(), "mlp.w2": RowwiseParallel()}
        if block.kind == "*":
            plan |= {"mixer.wqkv": ColwiseParallel(), "mixer.out_proj": RowwiseParallel()}
        else:
            plan |= {"mixer.projections": ColwiseParallel(), "mixer.out_proj": RowwiseParallel()}
        parallelize_module(block, tp_mesh, plan)
        if block.kind == "*":
            continue
        mixer = block.mixer
        _shard_param(mixer.featurizer, "weight", tp_mesh)
        if mixer.D is not None:
            _shard_param(mixer, "D", tp_mesh)
        filt = mixer.filter
        for name, _ in list(filt.named_parameters(recurse=False)):
            _shard_param(filt, name, tp_mesh)
        if isinstance(filt, ExplicitSingleDecayFilter):
            per_rank = filt.groups // tp
            filt.rows = (rank * per_rank, (rank + 1) * per_rank)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not isinstance(param, DTensor):
                module.register_parameter(name, nn.Parameter(distribute_tensor(param.data, tp_mesh, [Replicate()])))
