"""Llama 3's communication per block, embedding and head under TP/SP and CP, for the planner
(``tools/comm_model.py``)."""

from __future__ import annotations

from torchtitan_hyena.models.llama3.args import Llama3Args
from torchtitan_hyena.tools.activation_memory import ActivationInputs
from torchtitan_hyena.tools.comm_model import (
    ModelTraffic,
    attention_cp,
    sequence_parallel_block,
    vocab_parallel_embedding,
    vocab_parallel_head,
)


def llama3_traffic(args: Llama3Args, s: ActivationInputs) -> ModelTraffic:
    """Every block: sequence-parallel attention and MLP, and CP attention over the K/V heads."""
    block = sequence_parallel_block(s, args.dim) + attention_cp(s, args.kv_heads * args.head_dim)
    return ModelTraffic(
        blocks=[block] * args.n_layers,
        first=vocab_parallel_embedding(s, args.dim),
        last=vocab_parallel_head(s, args.dim, args.vocab_size),
    )
