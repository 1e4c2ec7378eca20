"""Inner filters of the three Hyena operators (docs/stripedhyena2.md §3-§4), each applied as a gated convolution.

Every filter module is called as ``filter(q, k, v, skip) -> q * (h * (k*v) + skip * (k*v))`` on (B, L, C)
tensors holding this rank's channels, and owns its initialisation rules (savanna's), drawn through the
layout-invariant :func:`init_param_`. Orientation, as stored:

* Hyena-SE ``h`` (G, 7): conv1d order, ``h[:, -1]`` multiplies the current token (vortex ``filter.h``).
* Hyena-MR ``h_hat`` (G, 128) times a fixed decay: impulse response, ``h[:, 0]`` is lag 0.
* Hyena-LI: impulse response ``h[d, t] = sum_n R[d, n] exp(log_pole[d, n] t)``, t = 0..L-1.

Blocks of ``C // G`` consecutive channels share one SE/MR filter (``repeat_interleave``, not ``repeat``).

Under context parallelism (``cp`` set by the parallelize plan) a filter runs :meth:`HyenaFilter.gated_conv` over
the sequence shards through ``distributed/context_parallel/convolution.py``: on halo-extended chunks (FIR filters,
``taps``), or on all positions of a slice of the channels (``channels``), which then selects the matching rows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from torchtitan_hyena.distributed.context_parallel.convolution import gated_conv_on_channels, gated_conv_with_halo
from torchtitan_hyena.distributed.context_parallel.layout import ChannelSlice, ContextParallel
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.models.common.decode import LayerCache
from torchtitan_hyena.models.common.dtensor import local
from torchtitan_hyena.models.common.init import InitFn, constant, init_param_, normal, uniform
from torchtitan_hyena.models.hyena.args import MR_DECAY_PRESETS
from torchtitan_hyena.models.hyena.decode import gated_fir_decode, modal_decode
from torchtitan_hyena.ops.conv import expand_groups, gated_causal_conv, gated_modal_conv
from torchtitan_hyena.ops.fftconv import gated_fft_conv


class HyenaFilter(nn.Module):
    """Base class: a gated convolution with its own parameters and init rules."""

    # Context parallelism (set by the parallelize plan): the group, and whether the filter runs on all positions of a
    # slice of the channels (long filters, by all-to-all) rather than on halo-extended sequence shards (FIR).
    cp: ContextParallel | None = None
    cp_all_positions: bool = False

    @property
    def taps(self) -> int | None:
        """FIR length, or None for a filter as long as the sequence."""
        return None

    def gated_conv(
        self, q: Tensor, k: Tensor, v: Tensor, skip: Tensor | None, channels: ChannelSlice | None = None
    ) -> Tensor:
        """``q * (h * (k*v) + skip * (k*v))`` on local tensors; ``channels``: they hold only those channels."""
        raise NotImplementedError(f"{type(self).__name__} must define gated_conv")

    def decode(self, q: Tensor, k: Tensor, v: Tensor, skip: Tensor | None, cache: LayerCache) -> Tensor:
        """The gated convolution keeping its decode state in ``cache`` (``models/hyena/decode.py``)."""
        raise NotImplementedError(f"{type(self).__name__} must define decode")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, skip: Tensor | None, cache: LayerCache | None = None) -> Tensor:
        if cache is not None:
            return self.decode(q, k, v, skip, cache)
        if self.cp is None:
            return self.gated_conv(q, k, v, skip)
        if self.cp_all_positions:
            return gated_conv_on_channels(self.gated_conv, q, k, v, skip, self.cp)
        return gated_conv_with_halo(self.gated_conv, q, k, v, skip, self.taps, self.cp)

    def init_fns(self) -> dict[str, InitFn]:
        """Init function per parameter name (relative to this module)."""
        raise NotImplementedError(f"{type(self).__name__} must define init_fns")

    def init_weights(self, seed: int, prefix: str) -> None:
        """Every parameter of :meth:`init_fns`; others (LoRA adapters on a filter's layers) are their owner's."""
        for name, fn in self.init_fns().items():
            init_param_(self.get_parameter(name), fn, seed, f"{prefix}.{name}")


class ExplicitFilter(HyenaFilter):
    """Hyena-SE: ``groups`` explicit short filters in conv1d order, no decay."""

    def __init__(self, groups: int, taps: int, conv_impl: str) -> None:
        super().__init__()
        self.conv_impl = conv_impl
        self.h = nn.Parameter(torch.empty(groups, taps))

    @property
    def taps(self) -> int:
        return self.h.shape[1]

    def gated_conv(
        self, q: Tensor, k: Tensor, v: Tensor, skip: Tensor | None, channels: ChannelSlice | None = None
    ) -> Tensor:
        h = local(self.h) if channels is None else channels.rows(local(self.h))
        return gated_causal_conv(q, k, v, h, skip, flip=False, impl=self.conv_impl)

    def decode(self, q: Tensor, k: Tensor, v: Tensor, skip: Tensor | None, cache: LayerCache) -> Tensor:
        weight = lambda: expand_groups(local(self.h).float(), q.shape[-1])  # conv1d order already
        return gated_fir_decode(cache, q, k, v, skip, weight, self.gated_conv)

    def init_fns(self) -> dict[str, InitFn]:
        return {"h": uniform(1 / math.sqrt(self.h.shape[1]))}  # nn.Conv1d default, as savanna's short conv


def mr_decay(
    groups: int,
    taps: int,
    decay_len: int,
    preset: str,
    rows: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | None = None,
) -> Tensor:
    """savanna ``ExplicitSingleDecayFilter`` decay ``exp(-r_g * n / (decay_len - 1))`` for groups ``rows``.

    ``r_g = logspace(lo, hi, groups)`` over *all* groups (so a tensor-parallel slice sees the same rates);
    ``decay_len`` is savanna's L_cache (the pretraining sequence length), of which the first ``taps`` are used.
    """
    start, stop = rows if rows is not None else (0, groups)
    bounds = MR_DECAY_PRESETS[preset]
    if bounds is None:
        return torch.ones(stop - start, taps, dtype=dtype, device=device)
    rates = torch.logspace(bounds[0], bounds[1], groups, dtype=torch.float64, device=device)[start:stop]
    n = torch.arange(taps, dtype=torch.float64, device=device) / (decay_len - 1)
    return torch.exp(-rates[:, None] * n).to(dtype)


class ExplicitSingleDecayFilter(HyenaFilter):
    """Hyena-MR: learnable taps ``h_hat`` times a fixed exponential decay, ``h = h_hat * decay``.

    Keeping ``h_hat`` (not the product) reproduces savanna's training dynamics: the decay scales each
    tap's update. vortex checkpoints store the product; the converter divides and multiplies it back.
    """

    def __init__(self, groups: int, taps: int, decay_len: int, preset: str, conv_impl: str) -> None:
        super().__init__()
        self.groups, self.decay_len, self.preset, self.conv_impl = groups, decay_len, preset, conv_impl
        self.rows = (0, groups)  # tensor parallelism narrows this to the rank's filter groups
        self.h_hat = nn.Parameter(torch.empty(groups, taps))

    def impulse_response(self) -> Tensor:
        h_hat = local(self.h_hat)
        decay = mr_decay(
            self.groups, h_hat.shape[1], self.decay_len, self.preset, self.rows, torch.float32, h_hat.device
        )
        return h_hat.float() * decay

    @property
    def taps(self) -> int:
        return self.h_hat.shape[1]

    def gated_conv(
        self, q: Tensor, k: Tensor, v: Tensor, skip: Tensor | None, channels: ChannelSlice | None = None
    ) -> Tensor:
        h = self.impulse_response() if channels is None else channels.rows(self.impulse_response())
        return gated_causal_conv(q, k, v, h, skip, flip=True, impl=self.conv_impl)

    def decode(self, q: Tensor, k: Tensor, v: Tensor, skip: Tensor | None, cache: LayerCache) -> Tensor:
        weight = lambda: expand_groups(self.impulse_response(), q.shape[-1]).flip(-1)  # lag 0 last
        return gated_fir_decode(cache, q, k, v, skip, weight, self.gated_conv)

    def init_fns(self) -> dict[str, InitFn]:
        return {"h_hat": normal(1e-5 / math.sqrt(self.decay_len))}  # savanna small_init: N(0,1)/sqrt(L)*1e-5


class ImplicitModalFilter(HyenaFilter):
    """Hyena-LI ``implicit_modal``: per channel, ``order`` real decaying exponentials.

    ``log_pole = -exp(p) * exp(gamma) < 0`` keeps every pole in (0, 1) by construction. The parameters stay
    fp32 under bf16 training (FSDP shards this module as an fp32 unit): in bf16 the long tail is lost.
    ``conv_impl`` picks the torch FFT path or the Triton one (``docs/kernels.md`` §1.4-§1.5).
    """

    keep_fp32_params = True

    def __init__(self, channels: int, order: int, conv_impl: str) -> None:
        super().__init__()
        self.conv_impl = conv_impl
        self.p = nn.Parameter(torch.empty(channels, order))
        self.gamma = nn.Parameter(torch.empty(channels, order))
        self.R = nn.Parameter(torch.empty(channels, order))

    def modal(self) -> tuple[Tensor, Tensor]:
        """(log_poles, residues), (C, order) fp32."""
        p, gamma = local(self.p).float(), local(self.gamma).float()
        return -(torch.exp(p) * torch.exp(gamma)), local(self.R).float()

    def gated_conv(
        self, q: Tensor, k: Tensor, v: Tensor, skip: Tensor | None, channels: ChannelSlice | None = None
    ) -> Tensor:
        modal = self.modal() if channels is None else tuple(channels.rows(t) for t in self.modal())
        return gated_modal_conv(q, k, v, *modal, skip, impl=self.conv_impl)

    def decode(self, q: Tensor, k: Tensor, v: Tensor, skip: Tensor | None, cache: LayerCache) -> Tensor:
        return modal_decode(cache, q, k, v, skip, self.modal, self.gated_conv)

    def init_fns(self) -> dict[str, InitFn]:
        order = self.R.shape[1]
        return {
            "p": constant(-1.0),
            "gamma": lambda t, g: t.uniform_(0.01, 0.1, generator=g).log_(),  # log U(0.01, 0.1)
            "R": normal(0.1 / math.sqrt(order)),
        }


class Sin(nn.Module):
    """``sin(freq * x)`` with a learnable per-feature frequency (Hyena's filter MLP activation)."""

    def __init__(self, dim: int, w: float) -> None:
        super().__init__()
        self.w = w
        self.freq = nn.Parameter(torch.empty(1, dim))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.freq * x)


class ImplicitFreeformFilter(HyenaFilter):
    """Hyena-LI ``implicit_freeform`` (Hyena 1 style): a sine MLP of positional features, exponentially
    modulated per channel (savanna ``implicit_freeform.py``). Not used by Evo 2; not tensor-parallel."""

    keep_fp32_params = True

    def __init__(self, channels: int, emb_dim: int, order: int, w: float, inner_mlps: int) -> None:
        super().__init__()
        if emb_dim < 3 or emb_dim % 2 == 0:
            raise ValueError(f"freeform filter emb_dim must be odd and >= 3, got {emb_dim}")
        layers: list[nn.Module] = [nn.Linear(emb_dim, order), Sin(order, w)]
        for _ in range(inner_mlps):
            layers += [nn.Linear(order, order), Sin(order, w)]
        layers.append(nn.Linear(order, channels, bias=False))
        self.mlp = nn.Sequential(*layers)
        self.bands = (emb_dim - 1) // 2
        # Modulation rates: linspace(log(1e-2)/slow, log(1e-2)/fast, channels), fast 0.3, slow 1.5.
        self.alpha_range = (math.log(1e-2) / 1.5, math.log(1e-2) / 0.3)

    def impulse_response(self, length: int, device: torch.device) -> Tensor:
        """(C, length) fp32 filter."""
        t_hat = torch.linspace(0, 1, length, device=device)[:, None]
        w = 2 * math.pi * torch.arange(length, device=device, dtype=torch.float32)[:, None] / length
        f = torch.linspace(1e-4, self.bands - 1, self.bands, device=device)[None, :]
        z = torch.cat([t_hat, torch.cos(f * w), -torch.sin(f * w)], dim=-1)
        with torch.autocast(device.type, enabled=False):
            h = self.mlp(z.float())  # (L, C)
        alpha = torch.linspace(*self.alpha_range, h.shape[1], device=device).abs()
        return (h * torch.exp(-t_hat * alpha)).transpose(0, 1)

    def gated_conv(
        self, q: Tensor, k: Tensor, v: Tensor, skip: Tensor | None, channels: ChannelSlice | None = None
    ) -> Tensor:
        h = self.impulse_response(q.shape[1], q.device)
        return gated_fft_conv(q, k, v, h if channels is None else channels.rows(h), skip)

    def decode(self, q: Tensor, k: Tensor, v: Tensor, skip: Tensor | None, cache: LayerCache) -> Tensor:
        raise UserError(
            "implicit_freeform Hyena-LI filters cannot generate: their filter is a function of the whole "
            "sequence length (t/L positional features), so a token's output changes as tokens are appended; "
            "generate with an implicit_modal model"
        )

    def init_fns(self) -> dict[str, InitFn]:
        fns: dict[str, InitFn] = {}
        for name, module in self.mlp.named_children():
            if isinstance(module, nn.Linear):
                bound = 1 / math.sqrt(module.in_features)  # nn.Linear default
                fns[f"mlp.{name}.weight"] = uniform(bound)
                if module.bias is not None:
                    fns[f"mlp.{name}.bias"] = uniform(bound)
            else:
                fns[f"mlp.{name}.freq"] = constant(module.w)
        return fns
