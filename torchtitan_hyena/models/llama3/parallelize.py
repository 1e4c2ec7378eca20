"""Apply parallelisms to Llama 3, in TorchTitan's order: TP -> CP -> AC -> compile -> FSDP."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import parallelize_module

from torchtitan_hyena.config import JobConfig
from torchtitan_hyena.distributed.context_parallel import build_context_parallel
from torchtitan_hyena.distributed.context_parallel.attention import apply_cp_attention
from torchtitan_hyena.distributed.float8 import is_tensorwise
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.distributed.parallelize_common import apply_ac_compile_fsdp
from torchtitan_hyena.distributed.tensor_parallel import (
    block_input_plan,
    check_tp_divisible,
    embedding_plan,
    float8_collectives,
    linear_styles,
    maybe_enable_async_tp,
    norm_plan,
    output_plan,
)
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


def apply_tp(
    model: nn.Module, tp_mesh: DeviceMesh, *, loss_parallel: bool, float8_tensorwise: bool, compiled: bool
) -> None:
    """Megatron-style TP with sequence parallelism (TorchTitan's plan, see distributed/tensor_parallel.py)."""
    fp8 = float8_collectives(float8_tensorwise, tp_mesh)
    parallelize_module(
        model,
        tp_mesh,
        {"tok_embeddings": embedding_plan(compiled), "norm": norm_plan(), "output": output_plan(loss_parallel)},
    )
    for block in model.layers.values():
        attn, ffn = block.attention, block.feed_forward
        a_col, a_row, a_prep = linear_styles([attn.wq, attn.wk, attn.wv, attn.wo], fp8)
        f_col, f_row, f_prep = linear_styles([ffn.w1, ffn.w2, ffn.w3], fp8)
        plan = {
            "attention_norm": norm_plan(),
            "attention": block_input_plan(a_prep, n_extra_args=2),  # (x, cos, sin)
            "attention.wq": a_col(),
            "attention.wk": a_col(),
            "attention.wv": a_col(),
            "attention.wo": a_row(output_layouts=Shard(1)),
            "ffn_norm": norm_plan(),
            "feed_forward": block_input_plan(f_prep),
            "feed_forward.w1": f_col(),
            "feed_forward.w2": f_row(output_layouts=Shard(1)),
            "feed_forward.w3": f_col(),
        }
        parallelize_module(block, tp_mesh, plan)
    logger.info(
        f"applied tensor parallel (degree {tp_mesh.size()}) with sequence parallel"
        f"{', loss parallel' if loss_parallel else ''}{', float8 all-gathers' if fp8 else ''}"
    )


def parallelize_llama(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    """Parallelize a meta-device Llama 3 model in place and return it."""
    validate_llama_parallelism(model.args, parallel_dims, job_config)
    if parallel_dims.tp_enabled:
        tp_mesh = parallel_dims.get_mesh("tp")
        p = job_config.parallelism
        compiled = job_config.compile.enable and "model" in job_config.compile.components
        apply_tp(
            model,
            tp_mesh,
            loss_parallel=p.enable_loss_parallel,
            float8_tensorwise=is_tensorwise(job_config.float8),
            compiled=compiled,
        )
        maybe_enable_async_tp(p.enable_async_tensor_parallel, compiled, tp_mesh)
    cp = build_context_parallel(parallel_dims, job_config)
    if cp is not None:
        apply_cp_attention(model, cp)
        logger.info(f"applied context parallel (degree {cp.degree}, {cp.rotate_method} attention)")
    apply_ac_compile_fsdp(
        model,
        model.layers,
        parallel_dims,
        job_config,
        first_units=[model.tok_embeddings],
        last_unit=[model.norm, model.output],
    )
    return model
