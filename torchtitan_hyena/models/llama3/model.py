"""Llama 3 (Meta layout: interleaved-pair RoPE, GQA, SwiGLU, RMSNorm, depth-scaled init)."""

from __future__ import annotations

import torch
from torch import nn

from torchtitan_hyena.distributed.utils import clean_fqn
from torchtitan_hyena.models.common.attention import InnerAttention
from torchtitan_hyena.models.common.decode import (
    DecodeCache,
    LayerCache,
    cached_attention,
    forward_positions,
    run_blocks,
)
from torchtitan_hyena.models.common.init import constant, init_param_, normal, trunc_normal
from torchtitan_hyena.models.common.mlp import GatedMLP
from torchtitan_hyena.models.common.rope import apply_rope_interleaved, rope_tables
from torchtitan_hyena.models.llama3.args import Llama3Args


class Attention(nn.Module):
    def __init__(self, args: Llama3Args) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.inner_attention = InnerAttention(args.attention_backend)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        # -1 instead of the head count: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(bs, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bs, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        q, k = apply_rope_interleaved(q, cos, sin), apply_rope_interleaved(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = self.inner_attention(q, k, v) if cache is None else cached_attention(cache, q, k, v, self.inner_attention)
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: Llama3Args) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = GatedMLP(args.dim, args.ffn_hidden_dim, activation="silu")

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        # cache by keyword: tensor-parallel input plans count the positional inputs
        h = x + self.attention(self.attention_norm(x), cos, sin, cache=cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama 3 decoder. ``forward(tokens, positions=None) -> logits``; positions default to 0..L-1.

    With a :class:`DecodeCache` (generation) the cache gives the positions and the logits are (B, 1, V),
    those of each row's last valid token: prefill on the first call, one-token steps after it.
    """

    def __init__(self, args: Llama3Args) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("rope_inv_freq", self.args.rope_frequencies(), persistent=False)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: DecodeCache | None = None
    ) -> torch.Tensor:
        cos, sin = rope_tables(self.rope_inv_freq, forward_positions(tokens, positions, cache))
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        h = run_blocks(self.layers, h, cos, sin, cache)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    def init_weights(self, buffer_device: torch.device | None = None, seed: int = 0) -> None:
        """TorchTitan's init (depth-scaled output projections), drawn layout-invariantly."""
        device = buffer_device or self.rope_inv_freq.device
        self.rope_inv_freq = self.args.rope_frequencies().to(device)
        a = self.args
        for fqn, param in self.named_parameters():
            name = clean_fqn(fqn)
            parts = name.split(".")
            if name.startswith("tok_embeddings"):
                fn = normal(1.0)
            elif name.startswith("output"):
                std = a.dim**-0.5
                fn = trunc_normal(std, cutoff=3 * std)
            elif parts[-1] == "weight" and "norm" in parts[-2]:
                fn = constant(1.0)
            elif parts[0] == "layers":
                layer_id = int(parts[1])
                depth_std = 0.02 / (2 * (layer_id + 1)) ** 0.5 if a.depth_init else 0.02 / (2 * a.n_layers) ** 0.5
                fn = trunc_normal(depth_std if parts[-2] in ("wo", "w2", "w3") else 0.02)
            else:
                raise ValueError(f"no init rule for parameter {name}")
            init_param_(param, fn, seed, name)
