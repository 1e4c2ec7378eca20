"""Llama 3's parallelize plan (TP, CP, FSDP units) for the shared skeleton, and the layouts it cannot take."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module

from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.distributed.context_parallel import ContextParallel
from torchtitan_hyena.distributed.context_parallel.attention import apply_cp_attention
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.distributed.parallelize import FSDPUnits, ParallelizePlan, TPOptions
from torchtitan_hyena.distributed.tensor_parallel import (
    check_tp_divisible,
    embedding_plan,
    float8_collectives,
    norm_plan,
    output_plan,
    prenorm_block_plan,
    present,
)
from torchtitan_hyena.models.common.attention import InnerAttention
from torchtitan_hyena.models.llama3.args import Llama3Args
from torchtitan_hyena.tools.logging import logger


def validate_llama_parallelism(args: Llama3Args, parallel_dims: ParallelDims, job_config: JobConfig) -> None:
    """Layouts Llama 3 cannot take, rejected before the model is built."""
    # Heads are split whole across TP ranks (GQA: K/V heads too); the MLP hidden dim is split evenly.
    check_tp_divisible(
        parallel_dims.tp,
        {"n_heads": args.n_heads, "n_kv_heads": args.kv_heads, "ffn hidden dim": args.ffn_hidden_dim},
        "the llama3 model's",
    )


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, options: TPOptions) -> None:
    """Megatron-style TP with sequence parallelism (TorchTitan's plan, see distributed/tensor_parallel.py)."""
    fp8 = float8_collectives(options.float8_tensorwise, tp_mesh)
    top = {
        "tok_embeddings": embedding_plan(options.compiled),
        "norm": norm_plan(),
        "output": output_plan(options.loss_parallel),
    }
    parallelize_module(model, tp_mesh, present(model, top))
    for block in model.layers.values():
        plan = prenorm_block_plan(
            block,
            norms=("attention_norm", "ffn_norm"),
            mixer="attention",
            mixer_in=("wq", "wk", "wv"),
            mixer_out="wo",
            mlp="feed_forward",
            mixer_extra_args=2,  # (x, cos, sin)
            float8=fp8,
        )
        parallelize_module(block, tp_mesh, plan)
    logger.info(
        f"applied tensor parallel (degree {tp_mesh.size()}) with sequence parallel"
        f"{', loss parallel' if options.loss_parallel else ''}{', float8 all-gathers' if fp8 else ''}"
    )


def apply_cp(model: nn.Module, cp: ContextParallel) -> None:
    """Attention over the context-parallel shards (the only sequence-mixing module)."""
    apply_cp_attention(model, cp, InnerAttention)
    logger.info(f"applied context parallel (degree {cp.degree}, {cp.rotate_method} attention)")


def fsdp_units(model: nn.Module) -> FSDPUnits:
    """TorchTitan's units: the embedding, each block, then the final norm and head together."""
    return FSDPUnits(model.layers, first=[model.tok_embeddings], last=[model.norm, model.output])


LLAMA3_PLAN = ParallelizePlan(apply_tp=apply_tp, apply_cp=apply_cp, fsdp_units=fsdp_units)
