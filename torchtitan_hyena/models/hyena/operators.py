"""The two mixers of a StripedHyena 2 block: the Hyena operator (SE/MR/LI) and multi-head attention.

Both take (B, L, D) and return (B, L, D). Under tensor parallelism the input/output projections are
TP-sharded ``nn.Linear`` layers returning local tensors, so everything between them sees this rank's
channels (whole channel triples, whole filter groups, whole heads) as plain tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchtitan_hyena.distributed.context_parallel.convolution import conv_with_halo
from torchtitan_hyena.distributed.context_parallel.layout import ContextParallel
from torchtitan_hyena.models.common.attention import InnerAttention
from torchtitan_hyena.models.common.decode import LayerCache, cached_attention, cached_fir
from torchtitan_hyena.models.common.dtensor import local
from torchtitan_hyena.models.common.rope import apply_rope_half
from torchtitan_hyena.models.hyena.args import HyenaArgs
from torchtitan_hyena.models.hyena.filters import (
    ExplicitFilter,
    ExplicitSingleDecayFilter,
    HyenaFilter,
    ImplicitFreeformFilter,
    ImplicitModalFilter,
)
from torchtitan_hyena.ops.conv import causal_conv


class ShortConv(nn.Module):
    """Depthwise causal FIR with a (C, K) weight in conv1d order (``weight[:, -1]`` = current token).

    With ``cp`` (set by the parallelize plan) it runs :meth:`conv` over sequence shards with halos.
    """

    cp: ContextParallel | None = None

    def __init__(self, channels: int, taps: int, conv_impl: str) -> None:
        super().__init__()
        self.conv_impl = conv_impl
        self.weight = nn.Parameter(torch.empty(channels, taps))

    @property
    def taps(self) -> int:
        return self.weight.shape[1]

    def conv(self, x: Tensor) -> Tensor:
        return causal_conv(x, local(self.weight), impl=self.conv_impl)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        if cache is not None:
            return cached_fir(cache, "featurizer", x, lambda: local(self.weight), self.conv)
        return self.conv(x) if self.cp is None else conv_with_halo(self.conv, x, self.taps, self.cp)


def build_filter(args: HyenaArgs, kind: str) -> HyenaFilter:
    if kind == "S":
        return ExplicitFilter(args.filter_groups, args.se_filter_len, args.conv_impl)
    if kind == "D":
        return ExplicitSingleDecayFilter(
            args.filter_groups, args.mr_filter_len, args.mr_decay_len, args.mr_decay_preset, args.conv_impl
        )
    if args.li_filter == "implicit_modal":
        return ImplicitModalFilter(args.dim, args.state_size, args.conv_impl)
    return ImplicitFreeformFilter(
        args.dim, args.freeform_emb_dim, args.freeform_order, args.freeform_w, args.freeform_inner_mlps
    )


class HyenaOperator(nn.Module):
    """``out_proj(q * (h * (k*v) + D * (k*v)))`` with (q, k, v) from a featurized 3D projection.

    Steps (docs/stripedhyena2.md §2): ``z = featurizer(projections(x))`` (length-3 causal FIR on all 3D
    channels); channel triple (3i, 3i+1, 3i+2) is (q, k, v) of channel i (vortex ``x2, x1, v``); then the
    operator's gated convolution; SE has no D term. Sharding the 3D rows into contiguous blocks gives each
    tensor-parallel rank whole triples, so the de-interleave below is the same on every layout.
    """

    def __init__(self, args: HyenaArgs, kind: str) -> None:
        super().__init__()
        dim = args.dim
        self.kind = kind
        self.projections = nn.Linear(dim, 3 * dim, bias=False)
        self.featurizer = ShortConv(3 * dim, args.short_filter_len, args.conv_impl)
        self.filter = build_filter(args, kind)
        self.D = nn.Parameter(torch.empty(dim)) if kind != "S" else None
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        z = self.featurizer(self.projections(x), cache=cache)
        q, k, v = z[..., 0::3], z[..., 1::3], z[..., 2::3]
        y = self.filter(q, k, v, None if self.D is None else local(self.D), cache=cache)
        return self.out_proj(y)


class Attention(nn.Module):
    """Causal MHA with the Evo 2 fused ``wqkv`` rows laid out (head, {q, k, v}, head_dim).

    That layout is savanna's ``split_projections`` and vortex's stored ``Wqkv``; a view splits it, and a
    contiguous row block per tensor-parallel rank holds whole heads. RoPE is GPT-NeoX rotate-half on the
    full head dimension; ``out_proj`` has a bias, ``wqkv`` none.
    """

    def __init__(self, args: HyenaArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        self.wqkv = nn.Linear(args.dim, 3 * args.dim, bias=False)
        self.out_proj = nn.Linear(args.dim, args.dim, bias=True)
        self.inner_attention = InnerAttention(args.attention_backend, dropout=args.attention_dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | None = None) -> Tensor:
        bs, seqlen, _ = x.shape
        q, k, v = self.wqkv(x).view(bs, seqlen, -1, 3, self.head_dim).unbind(3)
        q, k = apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = self.inner_attention(q, k, v) if cache is None else cached_attention(cache, q, k, v, self.inner_attention)
        return self.out_proj(out.transpose(1, 2).reshape(bs, seqlen, -1))
