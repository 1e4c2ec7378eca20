"""A tiny Evo 2 checkpoint in vortex format (keys, shapes, dtypes) and an independent vortex-like forward,
written from docs/stripedhyena2.md, for the converter, scoring and generation tests."""

from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F

# A tiny Evo 2-shaped vortex config: layers SDH*SDH, PI factor 4, GELU in layer 0 only, tied embeddings.
CONFIG = {
    "model_name": "tiny-evo2", "vocab_size": 512, "make_vocab_size_divisible_by": 8, "hidden_size": 32,
    "num_filters": 32, "num_layers": 7, "num_attention_heads": 2, "inner_mlp_size": 48,
    "attn_layer_idxs": [3], "hcs_layer_idxs": [0, 4], "hcm_layer_idxs": [1, 5], "hcl_layer_idxs": [2, 6],
    "hcs_filter_length": 7, "hcm_filter_length": 128, "short_filter_length": 3, "hcs_filter_groups": 4,
    "hcm_filter_groups": 4, "hcl_filter_groups": 32, "short_filter_bias": False, "state_size": 16, "eps": 1e-6,
    "rotary_emb_base": 10000, "use_interpolated_rotary_pos_emb": True, "rotary_emb_scaling_factor": 4,
    "proj_groups": 1, "hyena_filter_groups": 1, "column_split_hyena": False, "column_split": True,
    "interleave": True, "hyena_flip_x1x2": False, "evo2_style_activations": True, "mlp_activation": "gelu",
    "tie_embeddings": True, "final_norm": True, "mha_out_proj_bias": True, "hyena_out_proj_bias": True,
    "qkv_proj_bias": False, "max_seqlen": 64, "use_flash_attn": True, "prefill_style": "fft",
}  # fmt: skip
KINDS = "SDH*SDH"


def fake_evo2_state(seed: int = 0, mr_taps: int = 128, vocab: int = 512) -> dict:
    """Random weights in vortex's keys, shapes and dtypes (bf16; LI filters and inv_freq fp32). With
    ``mr_taps`` < 128 the MR blocks are as vortex builds them then: no ``filter.D``, taps in conv1d order."""
    g = torch.Generator().manual_seed(seed)
    d, f, bf = 32, 48, torch.bfloat16

    def rnd(*shape, std=0.2):
        return (torch.randn(*shape, generator=g) * std).to(bf)

    sd = {"embedding_layer.weight": rnd(vocab, d, std=1.0), "norm.scale": (1 + rnd(d, std=0.1).float()).to(bf)}
    for i, kind in enumerate(KINDS):
        p = f"blocks.{i}."
        sd[p + "pre_norm.scale"] = (1 + rnd(d, std=0.1).float()).to(bf)
        sd[p + "post_norm.scale"] = (1 + rnd(d, std=0.1).float()).to(bf)
        sd[p + "mlp.l1.weight"], sd[p + "mlp.l2.weight"], sd[p + "mlp.l3.weight"] = rnd(f, d), rnd(f, d), rnd(d, f)
        if kind == "*":
            sd[p + "inner_mha_cls.Wqkv.weight"] = rnd(3 * d, d)
            sd[p + "inner_mha_cls.out_proj.weight"], sd[p + "inner_mha_cls.out_proj.bias"] = rnd(d, d), rnd(d)
            sd[p + "inner_mha_cls.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
            continue
        sd[p + "projections.weight"] = rnd(3 * d, d)
        sd[p + "filter.short_filter_weight"] = rnd(3 * d, 1, 3, std=0.5)
        sd[p + "out_filter_dense.weight"], sd[p + "out_filter_dense.bias"] = rnd(d, d), rnd(d)
        if kind == "S":
            sd[p + "filter.h"] = rnd(4, 1, 7, std=0.4)
        elif kind == "D":
            sd[p + "filter.h"] = (rnd(4, 1, mr_taps, std=0.2).float() * torch.exp(-torch.arange(mr_taps) / 20.0)).to(bf)
        else:
            sd[p + "filter.log_poles"] = -torch.exp(torch.randn(d, 16, 1, generator=g) - 2.5)
            sd[p + "filter.residues"] = torch.randn(d, 16, generator=g) * 0.3
        if kind == "H" or (kind == "D" and mr_taps >= 128):
            sd[p + "filter.D"] = rnd(d, std=1.0)
    sd["blocks.0.projections._extra_state"] = io.BytesIO(b"te-fp8-metadata")  # dropped
    sd["unembed.weight"] = sd["embedding_layer.weight"].clone()  # bionemo exporter; dropped
    sd["blocks.2.filter.t"] = torch.arange(64.0)[None, None]  # unknown buffer; dropped
    return sd


def reference_logits(sd: dict, tokens: torch.Tensor) -> torch.Tensor:
    """A vortex-like forward, written from the spec: per-block loop, F.conv1d FIRs, FFT convs for MR and LI,
    explicit Wqkv column split, NeoX rotary with interpolated positions, eps outside the RMS."""
    w = {k: v.float() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    b, length = tokens.shape
    d, heads, hd, n = 32, 2, 16, 2 * tokens.shape[1]

    def norm(x, scale):
        return scale * x / (x.norm(2, dim=-1, keepdim=True) * d**-0.5 + 1e-6)

    def fftconv(s, h):  # s (B, D, L), h (D, L): irfft(rfft(s) * rfft(h)/n, norm=forward)
        return torch.fft.irfft(torch.fft.rfft(s, n=n) * torch.fft.rfft(h, n=n) / n, n=n, norm="forward")[..., :length]

    x = w["embedding_layer.weight"][tokens]
    t = torch.arange(length).float()
    for i, kind in enumerate(KINDS):
        p = f"blocks.{i}."
        u = norm(x, w[p + "pre_norm.scale"])
        if kind == "*":
            wqkv = w[p + "inner_mha_cls.Wqkv.weight"].view(heads, 3, hd, d).transpose(0, 1).reshape(3 * d, d)
            q, k, v = ((u @ wqkv.T).split(d, -1)[j].view(b, length, heads, hd).transpose(1, 2) for j in range(3))
            freqs = torch.outer(t / 4, w[p + "inner_mha_cls.rotary_emb.inv_freq"])
            cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

            q, k = (a * cos + torch.cat([-a.chunk(2, -1)[1], a.chunk(2, -1)[0]], -1) * sin for a in (q, k))
            att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            att = att.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf")).softmax(-1)
            y = (att @ v).transpose(1, 2).reshape(b, length, d)
            y = y @ w[p + "inner_mha_cls.out_proj.weight"].T + w[p + "inner_mha_cls.out_proj.bias"]
        else:
            z = (u @ w[p + "projections.weight"].T).transpose(1, 2)
            z = F.conv1d(F.pad(z, (2, 0)), w[p + "filter.short_filter_weight"], groups=3 * d)
            x2, x1, v = z[:, 0::3], z[:, 1::3], z[:, 2::3]
            s = x1 * v
            if kind == "S":
                h = w[p + "filter.h"].repeat_interleave(d // 4, dim=0)
                y = F.conv1d(F.pad(s, (6, 0)), h, groups=d)
            elif kind == "D" and w[p + "filter.h"].shape[-1] < 128:  # vortex: F.conv1d weights, no D
                h = w[p + "filter.h"].repeat_interleave(d // 4, dim=0)
                y = F.conv1d(F.pad(s, (h.shape[-1] - 1, 0)), h, groups=d)
            elif kind == "D":
                h = w[p + "filter.h"][:, 0].repeat_interleave(d // 4, dim=0)[:, :length]
                y = fftconv(s, F.pad(h, (0, length - h.shape[1]))) + w[p + "filter.D"][:, None] * s
            else:
                lp, res = w[p + "filter.log_poles"], w[p + "filter.residues"]
                h = (res[..., None] * torch.exp(lp * t)).sum(1)
                y = fftconv(s, h) + w[p + "filter.D"][:, None] * s
            y = (x2 * y).transpose(1, 2) @ w[p + "out_filter_dense.weight"].T + w[p + "out_filter_dense.bias"]
        x = x + y
        u = norm(x, w[p + "post_norm.scale"])
        act = F.gelu if i == 0 else (lambda a: a)
        x = x + (act(u @ w[p + "mlp.l1.weight"].T) * (u @ w[p + "mlp.l2.weight"].T)) @ w[p + "mlp.l3.weight"].T
    return norm(x, w["norm.scale"]) @ w["embedding_layer.weight"].T
