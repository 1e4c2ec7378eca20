"""StripedHyena 2's communication per block, embedding and head under TP/SP and CP, for the planner
(``tools/comm_model.py``; the CP plan is ``parallelize.py``'s)."""

from __future__ import annotations

from torchtitan_hyena.models.hyena.args import HyenaArgs
from torchtitan_hyena.tools.activation_memory import ActivationInputs
from torchtitan_hyena.tools.comm_model import (
    Messages,
    ModelTraffic,
    attention_cp,
    channel_all_to_all,
    halo,
    replicated_embedding,
    replicated_head,
    sequence_parallel_block,
    vocab_parallel_head,
)


def hyena_traffic(args: HyenaArgs, s: ActivationInputs) -> ModelTraffic:
    """Every block is sequence parallel. Under CP, attention blocks as Llama's; Hyena blocks exchange the
    featurizer's halo on 3D channels, then SE (and MR by halo) the k and v halos of their filter, while LI (and MR
    by all-to-all) move k*v and the result between sequence and channel shards."""
    d = args.dim
    blocks = []
    for kind in args.layout:
        m = sequence_parallel_block(s, d)
        if kind == "*":
            m = m + attention_cp(s, d)
        else:
            m = m + halo(s, 3 * d, args.short_filter_len - 1)
            m = m + _filter_cp(args, s, kind)
        blocks.append(m)
    tied = args.tie_embeddings
    return ModelTraffic(
        blocks=blocks,
        first=replicated_embedding(s, d),  # replicated even when untied (vocabulary 512)
        last=replicated_head(s, d) if tied else vocab_parallel_head(s, d, args.vocab_size),
    )


def _filter_cp(args: HyenaArgs, s: ActivationInputs, kind: str) -> Messages:
    if kind == "H" or (kind == "D" and s.cp_mr_method == "alltoall"):
        return channel_all_to_all(s, args.dim)
    taps = args.se_filter_len if kind == "S" else args.mr_filter_len
    return halo(s, 2 * args.dim, taps - 1)
