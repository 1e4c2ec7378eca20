"""StripedHyena 2 hyper-parameters, the config keys it reads, the layer layout and the FLOP model
(docs/stripedhyena2.md §1, §7, §11)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.models.common.rope import ROPE_CONFIG_KEYS, RopeScalingArgs
from torchtitan_hyena.protocols.model import BaseModelArgs

# Layer letters: S = Hyena-SE, D = Hyena-MR, H = Hyena-LI, * = multi-head attention.
LAYER_KINDS = {"S": "hcs", "D": "hcm", "H": "hcl", "*": "attn"}
LI_FILTERS = ("implicit_modal", "implicit_freeform")
# evo2: GELU in layer 0, identity after; gelu / silu: that activation in every MLP (silu: seeded from Llama).
MLP_ACTIVATIONS = ("evo2", "gelu", "silu")
# explicit_single_decay presets: (log10 r_min, log10 r_max); "none" trains the taps without decay.
MR_DECAY_PRESETS = {"strong": (0.0, 2.0), "normal": (-1.0, 2.0), "weak": (-2.0, 2.0), "none": None}


def parse_layout(text: str) -> str:
    """A layout string (``SDH*SDH*``) or index lists (``S:0,4;D:1,5;H:2,6;*:3,7``) -> the letter string."""
    text = text.replace(" ", "")
    if ":" not in text:
        bad = sorted(set(text) - set(LAYER_KINDS))
        if not text or bad:
            raise ConfigError(f"hyena layout {text!r} must use only the letters S, D, H and * (bad: {bad})")
        return text
    slots: dict[int, str] = {}
    for part in filter(None, text.split(";")):
        kind, _, indices = part.partition(":")
        if kind not in LAYER_KINDS:
            raise ConfigError(f"hyena layout {text!r}: {kind!r} is not one of S, D, H, *")
        try:
            numbers = [int(i) for i in indices.split(",") if i]
        except ValueError:
            raise ConfigError(f"hyena layout {text!r}: indices of {kind!r} must be integers") from None
        for i in numbers:
            if i < 0 or i in slots:
                raise ConfigError(f"hyena layout {text!r}: layer {i} is negative or listed twice")
            slots[i] = kind
    return layout_from_indices(slots, text)


def layout_from_indices(slots: dict[int, str], source: str) -> str:
    n = max(slots, default=-1) + 1
    missing = [i for i in range(n) if i not in slots]
    if n == 0 or missing:
        raise ConfigError(f"hyena layout {source!r} leaves layers {missing or 'all'} without a type")
    return "".join(slots[i] for i in range(n))


@dataclass
class HyenaArgs(RopeScalingArgs, BaseModelArgs):
    """Defaults are Evo 2 7B; flavors override. ``layout`` fixes the depth (one letter per layer)."""

    dim: int = 4096
    layout: str = "SDH*"
    n_heads: int = 32
    ffn_hidden_dim: int = 11008
    vocab_size: int = 512
    max_seq_len: int = 8192
    filter_groups: int = 256
    se_filter_len: int = 7
    mr_filter_len: int = 128
    short_filter_len: int = 3
    state_size: int = 16
    li_filter: str = "implicit_modal"
    mr_decay_preset: str = "weak"
    mr_decay_len: int = 8192
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_pi_factor: float = 1.0
    # The inverse RoPE frequencies a converted checkpoint stored (vortex's fp32 values); None: computed from rope_theta.
    rope_inv_freq: list[float] | None = None
    tie_embeddings: bool = True
    mlp_activation: str = "evo2"
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    embedding_init_std: float = 0.0
    freeform_emb_dim: int = 33
    freeform_order: int = 64
    freeform_w: float = 14.0
    freeform_inner_mlps: int = 2
    conv_impl: str = "auto"
    attention_backend: str = "sdpa"

    config_keys: ClassVar[frozenset[str]] = (
        BaseModelArgs.config_keys
        | ROPE_CONFIG_KEYS
        | {"attention_backend", "conv_impl", "layout", "li_filter", "mlp_activation", "tie_embeddings"}
        | {"rope_pi_factor", "attention_dropout", "hidden_dropout", "embedding_init_std"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embedding_init_std <= 0:
            self.embedding_init_std = self.small_init_std

    @property
    def n_layers(self) -> int:
        return len(self.layout)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def small_init_std(self) -> float:
        """savanna ``small_init``: sqrt(2 / (5 * dim))."""
        return math.sqrt(2 / (5 * self.dim))

    def validate(self) -> None:
        """Reject impossible combinations with a message naming the fix."""
        self.layout = parse_layout(self.layout)
        for name in ("vocab_size", "max_seq_len", "dim", "n_heads", "ffn_hidden_dim", "filter_groups", "state_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"hyena model: {name} must be positive, got {getattr(self, name)}")
        checks = (
            (self.dim % self.n_heads == 0, f"dim {self.dim} must be divisible by n_heads {self.n_heads}"),
            (self.dim % self.filter_groups == 0, f"dim {self.dim} must be divisible by filter_groups"),
            (self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}"),
            (min(self.se_filter_len, self.mr_filter_len, self.short_filter_len) > 0, "filter lengths must be positive"),
            (self.li_filter in LI_FILTERS, f"li_filter must be one of {LI_FILTERS}, got {self.li_filter!r}"),
            (self.mlp_activation in MLP_ACTIVATIONS, f"mlp_activation must be one of {MLP_ACTIVATIONS}"),
            (self.mr_decay_preset in MR_DECAY_PRESETS, f"mr_decay_preset must be one of {list(MR_DECAY_PRESETS)}"),
            (self.mr_decay_len >= 2, f"mr_decay_len must be >= 2, got {self.mr_decay_len}"),
            (0 <= self.attention_dropout < 1, "model.attention_dropout must be in [0, 1)"),
            (0 <= self.hidden_dropout < 1, "model.hidden_dropout must be in [0, 1)"),
            (self.rope_pi_factor > 0, f"rope_pi_factor must be positive, got {self.rope_pi_factor}"),
            (self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for rotary embeddings"),
            *self.rope_checks(),
            *self._stored_rope_checks(),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"hyena model: {message}")

    def config_overrides(self, job_config: Any) -> dict[str, Any]:
        m = job_config.model
        out = {
            **super().config_overrides(job_config),
            "conv_impl": m.conv_impl,
            "attention_backend": m.attention_backend,
        }
        for key in ("layout", "li_filter", "mlp_activation"):  # empty keeps the flavor's
            if getattr(m, key):
                out[key] = getattr(m, key)
        for key in ("embedding_init_std", "rope_pi_factor"):  # -1 keeps the flavor's
            if getattr(m, key) > 0:
                out[key] = getattr(m, key)
        out.update(self.rope_overrides(m))
        if "rope_theta" in out:  # a new base replaces a converted checkpoint's stored frequencies
            out["rope_inv_freq"] = None
        out.update(
            tie_embeddings=m.tie_embeddings, attention_dropout=m.attention_dropout, hidden_dropout=m.hidden_dropout
        )
        return out

    def _stored_rope_checks(self) -> list[tuple[bool, str]]:
        if self.rope_inv_freq is None:
            return []
        values, half = self.rope_inv_freq, self.head_dim // 2
        return [
            (len(values) == half, f"rope_inv_freq has {len(values)} values, head_dim {self.head_dim} needs {half}"),
            (all(isinstance(v, (int, float)) and 0 < v < math.inf for v in values), "rope_inv_freq must be positive"),
            (self.rope_scaling == "none", "rope_inv_freq (stored frequencies) excludes rope_scaling"),
        ]

    def rope_frequencies(self) -> torch.Tensor:
        """The stored frequencies of a converted checkpoint, else those of ``rope_theta`` (and scaling)."""
        if self.rope_inv_freq is not None:
            return torch.tensor(self.rope_inv_freq, dtype=torch.float32)
        return super().rope_frequencies()

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, float]:
        """Parameters and training FLOPs per token from the Evo 2 model (savanna ``mfu.py``, bionemo):
        3x the forward terms (backward = 2x forward); attention is not halved for causality."""
        nparams = sum(p.numel() for p in model.parameters())
        return nparams, 3.0 * 2 * self.dim * self.vocab_size + sum(self.layer_flops(seq_len))  # + logits

    def layer_flops(self, seq_len: int) -> list[float]:
        """Training FLOPs per token of each block (3x forward), by kind: see :meth:`get_nparams_and_flops`."""
        d, f = self.dim, self.ffn_hidden_dim
        out = []
        for kind in self.layout:
            forward = 2 * 3 * d * d + 2 * d * d + 2 * 3 * f * d  # in/out projections, GLU
            if kind == "*":
                forward += 4 * d * seq_len  # QK^T and AV: 4 B D L^2 per sequence
            else:
                forward += 2 * 3 * 3 * d  # length-3 featurizer on 3D channels
                if kind == "S":
                    forward += 2 * self.se_filter_len * d
                elif kind == "D":
                    forward += 2 * self.mr_filter_len * d
                else:
                    forward += 10 * math.log2(max(seq_len, 2)) * d  # FFT conv
            out.append(3.0 * forward)
        return out
