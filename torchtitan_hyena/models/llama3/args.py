"""Llama 3 hyper-parameters, the config keys it reads, and its FLOP count."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.models.common.rope import ROPE_CONFIG_KEYS, RopeScalingArgs
from torchtitan_hyena.protocols.model import BaseModelArgs


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's rule: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class Llama3Args(RopeScalingArgs, BaseModelArgs):
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_seq_len: int = 131072
    depth_init: bool = True
    attention_backend: str = "sdpa"

    config_keys: ClassVar[frozenset[str]] = BaseModelArgs.config_keys | ROPE_CONFIG_KEYS | {"attention_backend"}

    def config_overrides(self, job_config: Any) -> dict[str, Any]:
        m = job_config.model
        return {
            **super().config_overrides(job_config),
            "attention_backend": m.attention_backend,
            **self.rope_overrides(m),
        }

    def validate(self) -> None:
        """Reject impossible combinations with a message naming the field."""
        super().validate()
        positive = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "multiple_of": self.multiple_of,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"llama3 model: {name} must be positive, got {value}")
        checks = [
            (
                self.kv_heads > 0 and self.n_heads % self.kv_heads == 0,
                f"n_kv_heads {self.n_kv_heads} must divide n_heads",
            ),
            (self.dim % self.n_heads == 0, f"dim {self.dim} must be divisible by n_heads {self.n_heads}"),
            (self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for rotary embeddings"),
            (self.ffn_dim_multiplier is None or self.ffn_dim_multiplier > 0, "ffn_dim_multiplier must be positive"),
            (self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}"),
            *self.rope_checks(),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"llama3 model: {message}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, float]:
        """6 * (non-embedding params) + 12 * layers * heads * head_dim * seq_len per token (TorchTitan/PaLM)."""
        nparams = sum(p.numel() for p in model.parameters())
        nparams_embedding = sum(p.numel() for n, p in model.named_parameters() if "tok_embeddings" in n)
        flops = 6 * (nparams - nparams_embedding) + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return nparams, float(flops)

    def layer_flops(self, seq_len: int) -> list[float]:
        """Training FLOPs per token of each block: 6 per block weight + attention's 12 * heads * head_dim * L."""
        d, hd = self.dim, self.head_dim
        weights = 2 * d * self.n_heads * hd + 2 * d * self.kv_heads * hd + 3 * d * self.ffn_hidden_dim
        return [6.0 * weights + 12.0 * self.n_heads * hd * seq_len] * self.n_layers
