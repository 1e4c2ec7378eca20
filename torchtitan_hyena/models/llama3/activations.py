"""Llama 3's activation memory per rank, for the dry run (``tools/activation_memory.py``)."""

from __future__ import annotations

from torchtitan_hyena.models.llama3.args import Llama3Args
from torchtitan_hyena.tools.activation_memory import (
    ActivationEstimate,
    ActivationInputs,
    norm_bytes,
    with_checkpointing,
)


def llama3_activations(args: Llama3Args, s: ActivationInputs) -> ActivationEstimate:
    """Bytes autograd saves per token and layer, for eager Llama 3 blocks (no compile fusion).

    Under TP the residual stream and the norms are sequence-sharded (SP) while the inputs of the
    column-parallel projections are gathered; under CP each rank holds seq_len / cp tokens, and all-gather
    attention keeps the gathered K/V of the whole sequence (ring attention only its own).
    """
    t, p = s.tp, s.act_bytes
    cp = s.cp if s.cp_rotate == "allgather" else 1
    h, f, heads = args.dim, args.ffn_hidden_dim, args.n_heads
    q, kv = heads * args.head_dim, args.kv_heads * args.head_dim
    norm = norm_bytes(h)
    sdpa_out = p * q / t + 4 * heads / t  # output and log-sum-exp
    block_input = p * h / t
    full = (
        2 * norm / t  # attention_norm, ffn_norm (sequence-parallel)
        + 2 * p * h  # inputs of wq/wk/wv and w1/w3, gathered over TP
        + p * (q + 2 * kv * cp) / t  # SDPA inputs: q, and K/V over the whole sequence
        + sdpa_out
        + 4 * p * f / t  # SwiGLU: w1 out, silu out, w3 out, their product
    )
    # Per-op SAC (activation_checkpoint.py) keeps every other matmul output (wq, wv, w1, w2) and attention.
    op_sac = block_input + p * (q + kv + f) / t + p * h + sdpa_out
    vocab = args.vocab_size / (t if s.loss_parallel else 1)
    head_saved = norm / t + p * h + 4 * vocab  # final norm, output input, fp32 log-softmax
    return with_checkpointing(s, [(full, op_sac)] * args.n_layers, block_input, head_saved, vocab, f)
