"""StripedHyena 2's activation memory per rank, for the dry run (``tools/activation_memory.py``)."""

from __future__ import annotations

from torchtitan_hyena.models.hyena.args import HyenaArgs
from torchtitan_hyena.tools.activation_memory import (
    ActivationEstimate,
    ActivationInputs,
    norm_bytes,
    with_checkpointing,
)


def hyena_activations(args: HyenaArgs, s: ActivationInputs) -> ActivationEstimate:
    """Bytes autograd saves per token and layer, for eager StripedHyena 2 blocks (sequence parallel as Llama).

    Every block keeps two norms, the gathered inputs of its mixer and MLP and the GLU's four F-wide tensors.
    Hyena blocks add the 3D projection and the featurized q/k/v, and the SE/MR reference convolution's fp32
    k*v, output and q (the Triton kernels keep less; the LI FFT op keeps nothing beyond q/k/v); attention
    blocks keep q/k/v after RoPE and the SDPA output. The tied head's logits are whole on every rank.
    Under CP (seq_len / cp tokens per rank) all-gather attention also keeps the whole sequence's K/V, and the
    all-to-all convolutions keep the channel-sharded k*v and the returned output (one D/tp-wide tensor each per
    local token). Halo convolutions (the featurizer, SE, MR by halo) run on copies of their inputs extended by
    ``taps - 1`` positions per local chunk, and the SE/MR reference conv keeps its fp32 tensors on that length: a
    few per cent at long context, several times the chunk when a chunk is shorter than the filter.
    """
    t, p = s.tp, s.act_bytes
    h, f, heads = args.dim, args.ffn_hidden_dim, args.n_heads
    gathered_kv = 2 * p * h * (s.cp - 1) / t if s.cp_rotate == "allgather" else 0.0
    all_to_all = 2 * p * h / t if s.cp > 1 else 0.0
    norm = norm_bytes(h)
    block_input = p * h / t
    common = 2 * norm / t + 2 * p * h + 4 * p * f / t + p * h / t  # norms, gathered inputs, GLU, out_proj input
    sdpa_out = p * h / t + 4 * heads / t
    layers = []
    for kind in args.layout:
        if kind == "*":
            mixer, op_kept = 3 * p * h / t + gathered_kv + sdpa_out, p * 3 * h / t + gathered_kv + sdpa_out
        else:
            mixer, op_kept = 2 * 3 * p * h / t + (3 * 4 * h / t if kind in "SD" else all_to_all), p * 3 * h / t
            if s.cp > 1:
                mixer += 3 * p * h / t * _extended(s, args.short_filter_len)
                halo_filter = kind == "S" or (kind == "D" and s.cp_mr_method == "halo")
                if halo_filter:
                    taps = args.se_filter_len if kind == "S" else args.mr_filter_len
                    grow = _extended(s, taps)
                    mixer += 3 * p * h / t * grow + 3 * 4 * h / t * (grow - 1)
        op_sac = block_input + op_kept + p * (f + h) / t + p * h  # every other matmul output, as for Llama
        layers.append((common + mixer, op_sac))
    vocab = args.vocab_size / (t if s.loss_parallel else 1)
    head_saved = norm / t + p * h + 4 * vocab
    return with_checkpointing(s, layers, block_input, head_saved, vocab, f)


def _extended(s: ActivationInputs, taps: int) -> float:
    """Length of a halo-extended chunk over the chunk's (each rank holds two chunks of seq_len / (2 cp))."""
    chunk = s.seq_len / (2 * s.cp)
    return (chunk + taps - 1) / chunk
