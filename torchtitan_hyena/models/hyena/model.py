"""StripedHyena 2 (Evo 2 convolutional multi-hybrid): embedding, pre-norm blocks, final norm, tied head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan_hyena.distributed.utils import clean_fqn
from torchtitan_hyena.models.common.decode import DecodeCache, LayerCache, forward_positions, run_blocks
from torchtitan_hyena.models.common.dtensor import local
from torchtitan_hyena.models.common.init import constant, init_param_, normal, uniform
from torchtitan_hyena.models.common.mlp import GatedMLP
from torchtitan_hyena.models.common.norm import RMSNorm
from torchtitan_hyena.models.common.rope import rope_tables
from torchtitan_hyena.models.hyena.args import HyenaArgs
from torchtitan_hyena.models.hyena.filters import HyenaFilter
from torchtitan_hyena.models.hyena.operators import Attention, HyenaOperator


class Embedding(nn.Embedding):
    """``nn.Embedding`` that also reads a tensor-parallel (replicated DTensor) weight."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, local(self.weight))


class HyenaBlock(nn.Module):
    """``x += mixer(pre_norm(x)); x += mlp(post_norm(x))``; the mixer is a Hyena operator or attention.

    The GLU is ``w2(act(w1 x) * w3 x)`` with act = GELU in layer 0 and identity after it (Evo 2:
    savanna switched the global activation once the first Hyena operator was built), or GELU (NV variant)
    or SiLU (MLPs seeded from Llama's SwiGLU) everywhere.
    """

    def __init__(self, layer_id: int, kind: str, args: HyenaArgs) -> None:
        super().__init__()
        self.kind = kind
        self.pre_norm = RMSNorm(args.dim, args.norm_eps)
        self.mixer = Attention(args) if kind == "*" else HyenaOperator(args, kind)
        self.post_norm = RMSNorm(args.dim, args.norm_eps)
        activation = args.mlp_activation
        if activation == "evo2":
            activation = "gelu" if layer_id == 0 else "identity"
        self.mlp = GatedMLP(args.dim, args.ffn_hidden_dim, activation=activation)
        self.dropout = nn.Dropout(args.hidden_dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        u = self.pre_norm(x)
        # cache by keyword: tensor-parallel input plans count the positional inputs
        x = x + self.dropout(self.mixer(u, cos, sin, cache=cache) if self.kind == "*" else self.mixer(u, cache=cache))
        return x + self.dropout(self.mlp(self.post_norm(x)))


class StripedHyena(nn.Module):
    """``forward(tokens, positions=None) -> logits``; positions (default 0..L-1) only feed RoPE.

    With ``tie_embeddings`` there is no output module: logits are ``x @ tok_embeddings.weight.T`` (a pipeline's
    last stage holds its own copy of the embedding for that).
    With a :class:`DecodeCache` (generation) the cache gives the positions and the logits are (B, 1, V),
    those of each row's last valid token: prefill on the first call, one-token steps after it.
    """

    # No weight decay on the inner filters (with optimizer.decay_norms_and_embeddings = false); filter MLPs
    # (implicit_freeform) stay out of float8.
    no_weight_decay_keywords = (".mixer.filter.",)
    no_float8_keywords = (".mixer.filter.",)

    def __init__(self, args: HyenaArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): HyenaBlock(i, kind, args) for i, kind in enumerate(args.layout)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("rope_inv_freq", self.args.rope_frequencies(), persistent=False)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: DecodeCache | None = None
    ) -> torch.Tensor:
        positions = forward_positions(tokens, positions, cache)
        # Linear position interpolation (Evo 2 1M/262k checkpoints): position t becomes t / factor.
        cos, sin = rope_tables(self.rope_inv_freq, positions.float() / self.args.rope_pi_factor)
        # A pipeline stage after the first takes hidden states; one before the last returns them (no norm).
        h = tokens if tokens.is_floating_point() else self.tok_embeddings(tokens)
        h = run_blocks(self.layers, h, cos, sin, cache)
        if self.norm is None:
            return h
        h = self.norm(h)
        if self.output is None:
            return F.linear(h, local(self.tok_embeddings.weight))
        return self.output(h)

    def init_weights(self, buffer_device: torch.device | None = None, seed: int = 0) -> None:
        """savanna's Evo 2 init (small_init for inputs, wang_init for outputs), drawn layout-invariantly."""
        device = buffer_device or self.rope_inv_freq.device
        self.rope_inv_freq = self.args.rope_frequencies().to(device)
        a = self.args
        small = a.small_init_std
        wang = 2 / (a.n_layers * a.dim**0.5)
        filters = {clean_fqn(n): m for n, m in self.named_modules() if isinstance(m, HyenaFilter)}
        for prefix, module in filters.items():
            module.init_weights(seed, prefix)
        for fqn, param in self.named_parameters():
            name = clean_fqn(fqn)
            parts = name.split(".")
            if any(name.startswith(p + ".") for p in filters):
                continue
            if name == "tok_embeddings.weight":
                fn = normal(a.embedding_init_std)
            elif parts[-2].endswith("norm"):
                fn = constant(1.0)
            elif parts[-1] == "bias":
                fn = constant(0.0)
            elif parts[-2] in ("out_proj", "w2"):
                fn = normal(wang)
            elif parts[-2] == "featurizer":
                fn = uniform(1 / a.short_filter_len**0.5)  # nn.Conv1d default, as savanna's featurizer
            elif parts[-1] == "D":
                fn = normal(1.0)  # Hyena's skip term: randn
            elif parts[-2] in ("projections", "wqkv", "w1", "w3", "output"):
                fn = normal(small)
            else:
                raise ValueError(f"no init rule for parameter {name}")
            init_param_(param, fn, seed, name)
