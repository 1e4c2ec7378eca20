"""Decode state of the Hyena inner filters (docs/stripedhyena2.md §17; the phases: ``models/common/decode.py``).

Every filter computes ``q * (h * s + skip * s)`` with ``s = k * v`` in fp32. In prefill it runs its
stateless kernel and records a state at each row's prompt end; a step then costs, per channel:

* Hyena-SE / Hyena-MR: the FIR state of the last ``taps - 1`` values of ``s`` (6 and 127), O(taps).
  The MR taps are free parameters times a decay, so no shorter exact recurrence exists for them.
* Hyena-LI ``implicit_modal``: ``h[t] = sum_n R_n exp(a_n t)`` is a sum of 16 real geometric modes, so
  ``x_n <- exp(a_n) x_n + s_t`` and ``h * s = sum_n R_n x_n`` reproduce the convolution exactly with
  16 numbers per channel, O(16) per token at any position.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from torchtitan_hyena.models.common.decode import LayerCache, fir_step, fir_tail
from torchtitan_hyena.ops.fftconv import channel_block, modal_basis

GatedConv = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]


def _gate(q: Tensor, conv: Tensor, s: Tensor, skip: Tensor | None) -> Tensor:
    y = conv if skip is None else conv + skip.float() * s
    return (q.float() * y).to(q.dtype)


def gated_fir_decode(
    cache: LayerCache, q: Tensor, k: Tensor, v: Tensor, skip: Tensor | None, weight: Callable[[], Tensor],
    full: GatedConv,
) -> Tensor:  # fmt: skip
    """SE and MR: ``full`` (the stateless gated conv) in prefill, then one FIR step of ``s`` per token.
    ``weight()``: the expanded (C, K) filter in conv1d order (``[:, -1]`` multiplies the current token)."""
    s = k.float() * v.float()
    if cache.prefilling:
        w = weight()
        cache.state["filter"] = (fir_tail(s, cache.new_lengths, w.shape[1]), w)
        return full(q, k, v, skip)
    state, w = cache.state["filter"]
    conv, state = fir_step(state, s, w)
    cache.state["filter"] = (state, w)
    return _gate(q, conv, s, skip)


def modal_state(s: Tensor, lengths: Tensor, log_poles: Tensor) -> Tensor:
    """(B, D, N) fp32 ``x[b, d, n] = sum_{j < len_b} exp(log_poles[d, n] j) s[b, len_b - 1 - j, d]``: each
    mode's recurrence run over row b's prompt, as one weighted sum over the prompt (the same modal basis as
    the FFT filter), in channel blocks so that no (D, N, L) tensor is ever built."""
    batch, _, channels = s.shape
    modes = log_poles.shape[1]
    out = torch.zeros(batch, channels, modes, device=s.device, dtype=torch.float32)
    for b, n in enumerate(lengths.tolist()):
        reversed_s = s[b, :n].float().flip(0).t()  # (D, n): column j holds s at lag j
        step = channel_block(modes, n, channels)
        for start in range(0, channels, step):
            sl = slice(start, min(start + step, channels))
            basis = modal_basis(log_poles[sl].reshape(-1), n).view(-1, modes, n)
            out[b, sl] = torch.einsum("cmt,ct->cm", basis, reversed_s[sl])
    return out


def modal_decode(
    cache: LayerCache, q: Tensor, k: Tensor, v: Tensor, skip: Tensor | None, modal: Callable[[], tuple[Tensor, Tensor]],
    full: GatedConv,
) -> Tensor:  # fmt: skip
    """LI ``implicit_modal``: ``full`` (the FFT conv) in prefill plus the modal state, then the recurrence.
    ``modal()``: (log_poles, residues), (D, N) fp32."""
    s = k.float() * v.float()
    if cache.prefilling:
        log_poles, residues = modal()
        cache.state["filter"] = (modal_state(s, cache.new_lengths, log_poles), log_poles.exp(), residues)
        return full(q, k, v, skip)
    x, poles, residues = cache.state["filter"]
    x = poles * x + s[:, 0, :, None]
    cache.state["filter"] = (x, poles, residues)
    return _gate(q, (x * residues).sum(-1)[:, None], s, skip)
