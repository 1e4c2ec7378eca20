"""Rotary position embeddings in real arithmetic (compile- and DTensor-friendly).

Two layouts share the frequency tables: Meta/Llama's interleaved pairs (x[2j], x[2j+1]) and
GPT-NeoX's rotate-half (x[j], x[j + d/2]) used by StripedHyena 2 / Evo 2.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch


def rope_inv_freq(
    head_dim: int,
    theta: float,
    scaling: str = "none",
    factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position: int = 8192,
) -> torch.Tensor:
    """Inverse frequencies 1/theta^(2j/d), optionally with Llama-3.1 frequency scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling == "llama3":
        low_wavelen = original_max_position / low_freq_factor
        high_wavelen = original_max_position / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif scaling != "none":
        raise ValueError(f"unknown RoPE scaling {scaling!r}")
    return inv_freq.float()


@dataclass
class RopeScalingArgs:
    """Llama-3.1 RoPE frequency scaling, shared by Llama 3 and by hybrid attention seeded from Llama 3.1.

    Mixed into a model's args dataclass, which provides ``head_dim`` and ``rope_theta``.
    """

    rope_scaling: str = "none"
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192

    def rope_overrides(self, model_config: Any) -> dict[str, Any]:
        """The job config's ``[model]`` RoPE base and Llama-3.1 scaling where it sets them; else the flavor's stay."""
        out: dict[str, Any] = {}
        if model_config.rope_theta > 0:
            out["rope_theta"] = model_config.rope_theta
        if model_config.rope_scaling != "none":
            out.update({f.name: getattr(model_config, f.name) for f in dataclasses.fields(RopeScalingArgs)})
        return out

    def rope_checks(self) -> list[tuple[bool, str]]:
        """(holds, message) of every constraint on the RoPE fields; a family's ``validate`` raises the first broken."""
        checks = [
            (self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}"),  # type: ignore[attr-defined]
            (self.rope_scaling in ("none", "llama3"), f"rope_scaling {self.rope_scaling!r} is not none or llama3"),
        ]
        if self.rope_scaling == "llama3":
            low, high = self.rope_low_freq_factor, self.rope_high_freq_factor
            checks += [
                (self.rope_scaling_factor > 0, f"rope_scaling_factor must be positive, got {self.rope_scaling_factor}"),
                (0 < low < high, f"rope_low_freq_factor {low} must be positive and below rope_high_freq_factor {high}"),
                (self.rope_original_max_position > 0, "rope_original_max_position must be positive"),
            ]
        return checks

    def rope_frequencies(self) -> torch.Tensor:
        """This model's inverse RoPE frequencies (scaling included)."""
        return rope_inv_freq(
            self.head_dim,  # type: ignore[attr-defined]
            self.rope_theta,  # type: ignore[attr-defined]
            self.rope_scaling,
            self.rope_scaling_factor,
            self.rope_low_freq_factor,
            self.rope_high_freq_factor,
            self.rope_original_max_position,
        )


# The ``model.*`` config keys read by :meth:`RopeScalingArgs.rope_overrides`.
ROPE_CONFIG_KEYS = frozenset({"rope_theta", *(f.name for f in dataclasses.fields(RopeScalingArgs))})


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (*positions.shape, d/2), computed in fp32."""
    angles = positions.float()[..., None] * inv_freq.float().to(positions.device)
    return angles.cos(), angles.sin()


def _broadcast(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # table (L, d/2) or (B, L, d/2); x (B, L, H, d/2) -> insert the head dim.
    return table[:, None, :] if table.dim() == 2 else table[:, :, None, :]


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Meta layout. x: (B, L, H, d); pairs (2j, 2j+1) rotate by angle j.

    One complex multiply, as Meta and TorchTitan do: the same bits as the real form (x0 c - x1 s, x0 s + x1 c),
    forward and backward, in one kernel each way instead of eight (5x faster on CPU; bench/torchtitan_side_by_side.py).
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    rotation = torch.complex(cos.float(), sin.float())  # FSDP casts block inputs (the tables) to bf16
    return torch.view_as_real(pairs * _broadcast(rotation, x)).flatten(-2).type_as(x)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotate-half layout. x: (B, L, H, d); (j, j + d/2) rotate by angle j."""
    xf = x.float()
    x0, x1 = xf.chunk(2, dim=-1)
    c, s = _broadcast(cos, x), _broadcast(sin, x)
    return torch.cat((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).type_as(x)
