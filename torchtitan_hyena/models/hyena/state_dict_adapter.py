"""Evo 2 / vortex checkpoints to and from the StripedHyena 2 state dict (docs/stripedhyena2.md §8).

A vortex checkpoint is a flat state dict (``blocks.{i}.…``) described by a vortex YAML; the files (one ``.pt``
or byte shards ``.pt.part0..N``) are ``convert/evo2.py``'s. Conversion renames and reshapes, and changes two
parametrizations:

* Hyena-MR: vortex stores the product ``h = h_hat * decay``; the model trains ``h_hat`` (savanna), so
  the adapter divides by the fixed decay (fp64) and multiplies it back on export.
* Hyena-LI: vortex stores ``log_poles = -exp(p) * exp(gamma)``; only ``p + gamma`` matters, so the
  adapter sets ``p = fp32(log(-log_poles))`` and lets ``gamma`` carry the fp32 rounding residual,
  which makes export (computed in fp64) reproduce ``log_poles`` bit for bit.

vortex runs MR filters shorter than 128 taps as ``F.conv1d`` weights (conv1d tap order) without the skip term
``D``; those are flipped into impulse order and get ``D = 0``. RoPE ``inv_freq`` buffers are kept in the model args
(``HyenaArgs.rope_inv_freq``), so the model uses the checkpoint's frequencies. Round trips are exact for vortex's
dtypes (bf16, fp32 LI tensors). TE ``_extra_state`` blobs and unknown buffers are dropped with a note.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

from torchtitan_hyena.errors import ConfigError, UserError
from torchtitan_hyena.models.hyena.args import HyenaArgs, layout_from_indices
from torchtitan_hyena.models.hyena.filters import mr_decay
from torchtitan_hyena.models.hyena.model import StripedHyena
from torchtitan_hyena.models.hyena.vortex_yaml import inner_size_multiple_of, published_order
from torchtitan_hyena.protocols.state_dict_adapter import LazyTensor, StateDictAdapter
from torchtitan_hyena.tools.logging import logger

_KIND_INDEX_KEYS = {"*": "attn_layer_idxs", "S": "hcs_layer_idxs", "D": "hcm_layer_idxs", "H": "hcl_layer_idxs"}
# vortex YAML values this model implements; anything else is a different architecture.
_FIXED = {
    "interleave": True,
    "hyena_flip_x1x2": False,
    "column_split_hyena": False,
    "column_split": True,
    "qkv_proj_bias": False,
    "mha_out_proj_bias": True,
    "hyena_out_proj_bias": True,
    "short_filter_bias": False,
    "proj_groups": 1,
    "final_norm": True,
}
# vortex convolves MR filters of at least this many taps by FFT (impulse order, with D), shorter ones by F.conv1d.
MR_FFT_TAPS = 128


# ---------------------------------------------------------------------------------------- key schema
def _block_entries(args: HyenaArgs, i: int, kind: str) -> list[tuple[str, tuple[int, ...], str, str]]:
    """(vortex key, vortex shape, model key, transform) of block ``i``."""
    d, f, g = args.dim, args.ffn_hidden_dim, args.filter_groups
    v, m = f"blocks.{i}.", f"layers.{i}."
    rows = [
        ("pre_norm.scale", (d,), "pre_norm.weight", "copy"),
        ("post_norm.scale", (d,), "post_norm.weight", "copy"),
        ("mlp.l1.weight", (f, d), "mlp.w1.weight", "copy"),
        ("mlp.l2.weight", (f, d), "mlp.w3.weight", "copy"),
        ("mlp.l3.weight", (d, f), "mlp.w2.weight", "copy"),
    ]
    if kind == "*":
        rows += [
            ("inner_mha_cls.Wqkv.weight", (3 * d, d), "mixer.wqkv.weight", "copy"),
            ("inner_mha_cls.out_proj.weight", (d, d), "mixer.out_proj.weight", "copy"),
            ("inner_mha_cls.out_proj.bias", (d,), "mixer.out_proj.bias", "copy"),
        ]
    else:
        rows += [
            ("projections.weight", (3 * d, d), "mixer.projections.weight", "copy"),
            ("filter.short_filter_weight", (3 * d, 1, args.short_filter_len), "mixer.featurizer.weight", "squeeze"),
            ("out_filter_dense.weight", (d, d), "mixer.out_proj.weight", "copy"),
            ("out_filter_dense.bias", (d,), "mixer.out_proj.bias", "copy"),
        ]
    if kind == "S":
        rows.append(("filter.h", (g, 1, args.se_filter_len), "mixer.filter.h", "squeeze"))
    elif kind == "D":
        short = args.mr_filter_len < MR_FFT_TAPS  # conv1d order, no D (module docstring)
        rows.append(("filter.h", (g, 1, args.mr_filter_len), "mixer.filter.h_hat", "mr_fir" if short else "mr"))
    elif kind == "H":
        rows += [
            ("filter.log_poles", (d, args.state_size, 1), "mixer.filter.p", "log_poles"),
            ("filter.residues", (d, args.state_size), "mixer.filter.R", "fp32"),
        ]
    if kind == "H" or (kind == "D" and args.mr_filter_len >= MR_FFT_TAPS):
        rows.append(("filter.D", (d,), "mixer.D", "copy"))
    return [(v + a, shape, m + b, t) for a, shape, b, t in rows]


def schema(args: HyenaArgs) -> list[tuple[str, tuple[int, ...], str, str]]:
    """Every required vortex tensor of ``args`` with its model counterpart."""
    rows = [("embedding_layer.weight", (args.vocab_size, args.dim), "tok_embeddings.weight", "copy")]
    for i, kind in enumerate(args.layout):
        rows += _block_entries(args, i, kind)
    rows.append(("norm.scale", (args.dim,), "norm.weight", "copy"))
    if not args.tie_embeddings:
        rows.append(("unembed.weight", (args.vocab_size, args.dim), "output.weight", "copy"))
    return rows


def skipless_keys(args: HyenaArgs) -> list[str]:
    """Model keys vortex has no tensor for: the skip ``D`` of MR filters shorter than 128 taps (zero)."""
    if args.mr_filter_len >= MR_FFT_TAPS:
        return []
    return [f"layers.{i}.mixer.D" for i, kind in enumerate(args.layout) if kind == "D"]


def vortex_inv_freq(args: HyenaArgs) -> torch.Tensor:
    """flash-attn ``RotaryEmbedding.inv_freq`` as vortex saves it (fp32 arithmetic), or the checkpoint's values."""
    if args.rope_inv_freq is not None:
        return torch.tensor(args.rope_inv_freq, dtype=torch.float32)
    hd = args.head_dim
    return 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))


def _decay(args: HyenaArgs) -> torch.Tensor:
    return mr_decay(args.filter_groups, args.mr_filter_len, args.mr_decay_len, args.mr_decay_preset)


def _gamma_key(p_key: str) -> str:
    return p_key.rsplit(".", 1)[0] + ".gamma"


def infer_layout(shapes: dict[str, tuple[int, ...]], args: HyenaArgs | None = None) -> str:
    """Block letters as the weights show them ('?' where a block's type cannot be told).

    A FIR filter without ``D`` is SE, or, when the config (``args``) has MR filters shorter than 128 taps, MR if
    its length is the MR length (the config's letter decides when SE and MR have the same length).
    """
    blocks: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        m = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = tuple(shape)
    short_mr = args is not None and args.mr_filter_len < MR_FFT_TAPS
    out = []
    for i in range(max(blocks, default=-1) + 1):
        names = blocks.get(i, {})
        if "inner_mha_cls.Wqkv.weight" in names:
            out.append("*")
        elif "filter.log_poles" in names:
            out.append("H")
        elif "filter.D" in names:
            out.append("D")
        elif "filter.h" in names and short_mr and names["filter.h"][-1] == args.mr_filter_len:
            ambiguous = args.mr_filter_len == args.se_filter_len and i < args.n_layers and args.layout[i] in "SD"
            out.append(args.layout[i] if ambiguous else "D")
        elif "filter.h" in names:
            out.append("S")
        else:
            out.append("?")
    return "".join(out)


# ---------------------------------------------------------------------------------------- checks
def adopt_rope_base(state: Mapping[str, Any], args: HyenaArgs, source: str) -> list[str]:
    """Keep the checkpoint's ``inv_freq`` values in ``args`` (vortex's own fp32 arithmetic; recomputing them
    differs by an ulp in places) and take the RoPE base from them: those are what Evo 2 used (the 7B-1M/40B-1M
    YAMLs once said 1e11 while the weights hold 1e4/1e6). Returns the buffers' keys."""
    found = {k: v for k, v in state.items() if k.endswith("rotary_emb.inv_freq") and isinstance(v, torch.Tensor)}
    if not found:
        return []
    key, value = next(iter(found.items()))
    for other, tensor in found.items():
        if tensor.shape != (args.head_dim // 2,):
            raise UserError(
                f"{source}: {other} has shape {tuple(tensor.shape)}; the config's head_dim is {args.head_dim}"
            )
        if not torch.equal(tensor.float(), value.float()):
            raise UserError(f"{source}: {other} differs from {key}; the model has one RoPE table for all attention")
    if not torch.allclose(value.float(), vortex_inv_freq(args), rtol=1e-4):
        base = float(f"{float(value.float()[1]) ** (-args.head_dim / 2):.6g}")
        configured, args.rope_theta = args.rope_theta, base
        if not torch.allclose(value.float(), vortex_inv_freq(args), rtol=1e-4):
            raise UserError(f"{source}: {key} is not a rotary inv_freq of any base (1/base^(2j/d))")
        logger.warning(
            f"{source}: RoPE base {base:g} from the checkpoint's inv_freq replaces the config's {configured:g}"
        )
    args.rope_inv_freq = value.float().tolist()
    return list(found)


def _check_extras(state: dict[str, Any], known: set[str], source: str) -> None:
    dropped = [key for key in state if key not in known]
    if "unembed.weight" in dropped and not torch.equal(state["unembed.weight"], state["embedding_layer.weight"]):
        raise UserError(f"{source}: unembed.weight differs from the embedding but the config ties them")
    extra_state = [k for k in dropped if k.endswith("_extra_state")]
    other = [k for k in dropped if not k.endswith("_extra_state")]
    if extra_state:
        logger.info(f"dropped {len(extra_state)} Transformer Engine _extra_state entries (FP8 metadata)")
    if other:
        logger.info(f"dropped {len(other)} buffers the model does not keep: {', '.join(other[:6])}")


def _check_against_model(tensors: Mapping[str, LazyTensor], args: HyenaArgs) -> None:
    """The converted tensors must be exactly the model's state dict (guards the key schema)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in StripedHyena(args).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise RuntimeError(f"evo2 conversion schema out of sync with the model: {diff}")


# ---------------------------------------------------------------------------------------- adapter
class VortexAdapter(StateDictAdapter):
    """vortex (Evo 2) checkpoints: the YAML config and the ``blocks.{i}.…`` state dict."""

    format = "vortex"
    # evo2 names the vortex model's modules (``Evo2.forward(layer_names=...)``); the same tensors in our blocks
    # (vortex l1/l2/l3 = our w1/w3/w2).
    block_prefix = "blocks"
    block_modules = MappingProxyType({
        "pre_norm": "pre_norm",
        "post_norm": "post_norm",
        "mlp": "mlp",
        "mlp.l1": "mlp.w1",
        "mlp.l2": "mlp.w3",
        "mlp.l3": "mlp.w2",
        "projections": "mixer.projections",
        "filter": "mixer.filter",
        "out_filter_dense": "mixer.out_proj",
        "inner_mha_cls": "mixer",
        "inner_mha_cls.Wqkv": "mixer.wqkv",
        "inner_mha_cls.out_proj": "mixer.out_proj",
    })  # fmt: skip
    top_modules = MappingProxyType({"embedding_layer": "tok_embeddings", "norm": "norm"})

    @staticmethod
    def args_from_config(cfg: dict[str, Any], source: str) -> HyenaArgs:
        """HyenaArgs from a vortex YAML dict (missing keys read as None, as in vortex)."""

        def need(key: str) -> Any:
            if cfg.get(key) is None:
                raise ConfigError(f"{source}: the vortex config has no {key!r}; is it an Evo 2 / StripedHyena 2 YAML?")
            return cfg[key]

        for key, want in _FIXED.items():
            if cfg.get(key) is not None and cfg[key] != want:
                raise ConfigError(f"{source}: {key} = {cfg[key]!r} is not supported (Evo 2 uses {want!r})")
        dim, n_layers = int(need("hidden_size")), int(need("num_layers"))
        if cfg.get("num_filters") not in (None, dim):
            raise ConfigError(f"{source}: num_filters {cfg['num_filters']} must equal hidden_size {dim}")
        slots: dict[int, str] = {}
        for kind, key in _KIND_INDEX_KEYS.items():
            for i in cfg.get(key) or []:
                if int(i) in slots:
                    raise ConfigError(f"{source}: layer {i} appears in two of the *_layer_idxs lists")
                slots[int(i)] = kind
        layout = layout_from_indices(slots, source)
        if len(layout) != n_layers:
            raise ConfigError(
                f"{source}: the *_layer_idxs lists cover {len(layout)} layers but num_layers is {n_layers}"
            )
        groups = int(need("hcs_filter_groups"))
        if cfg.get("hcm_filter_groups") not in (None, groups):
            raise ConfigError(f"{source}: hcm_filter_groups {cfg['hcm_filter_groups']} differs from hcs_filter_groups")
        ffn = cfg.get("inner_mlp_size")
        if ffn is None:  # vortex fallback: int(2 * D * 4 / 3) rounded up to inner_size_multiple_of
            multiple = int(cfg.get("inner_size_multiple_of") or 64)
            ffn = multiple * math.ceil(int(2 * dim * 4 / 3) / multiple)
        vocab = int(need("vocab_size"))  # as vortex: make_vocab_size_divisible_by is savanna's, vortex does not pad
        if cfg.get("mlp_activation", "gelu") != "gelu":
            raise ConfigError(f"{source}: mlp_activation {cfg['mlp_activation']!r} is not supported (Evo 2 uses gelu)")
        pi = float(cfg.get("rotary_emb_scaling_factor") or 1.0) if cfg.get("use_interpolated_rotary_pos_emb") else 1.0
        heads = int(need("num_attention_heads"))
        try:
            return HyenaArgs(
                dim=dim,
                layout=layout,
                n_heads=heads,
                ffn_hidden_dim=int(ffn),
                vocab_size=vocab,
                max_seq_len=int(cfg.get("max_seqlen") or 8192),
                filter_groups=groups,
                se_filter_len=int(cfg.get("hcs_filter_length") or 7),
                mr_filter_len=int(cfg.get("hcm_filter_length") or 128),
                short_filter_len=int(cfg.get("short_filter_length") or 3),
                state_size=int(cfg.get("state_size") or 16),
                norm_eps=float(cfg.get("eps") or 1e-6),
                rope_theta=float(cfg.get("rotary_emb_base") or 10000),
                rope_pi_factor=pi,
                tie_embeddings=bool(cfg.get("tie_embeddings", True)),
                mlp_activation="evo2" if cfg.get("evo2_style_activations") else "gelu",
            )
        except ConfigError as e:  # HyenaArgs' own checks (positive sizes, divisibility)
            raise ConfigError(f"{source}: {e}") from None

    def config(self) -> dict[str, Any]:
        """A vortex YAML dict for the args (the inverse of :meth:`args_from_config`)."""
        args = self.args
        if args.li_filter != "implicit_modal" and "H" in args.layout:
            raise UserError("vortex has no implicit_freeform LI filter; only implicit_modal models can be exported")
        if args.mlp_activation == "silu" or args.rope_scaling != "none":
            raise UserError(
                f"vortex has no {'SiLU MLPs' if args.mlp_activation == 'silu' else 'Llama-3.1 RoPE scaling'} (a hybrid "
                "seeded from Llama); export Evo 2 style models only (mlp_activation evo2 or gelu, rope_scaling none)"
            )
        cfg: dict[str, Any] = {
            "model_name": "torchtitan_hyena_export",
            "vocab_size": args.vocab_size,
            "hidden_size": args.dim,
            "num_filters": args.dim,
            "num_layers": args.n_layers,
            "num_attention_heads": args.n_heads,
            "inner_mlp_size": args.ffn_hidden_dim,
            "short_filter_length": args.short_filter_len,
            "hcs_filter_length": args.se_filter_len,
            "hcm_filter_length": args.mr_filter_len,
            "hcs_filter_groups": args.filter_groups,
            "hcm_filter_groups": args.filter_groups,
            "hcl_filter_groups": args.dim,
            "state_size": args.state_size,
            "eps": args.norm_eps,
            "rotary_emb_base": args.rope_theta,
            "use_interpolated_rotary_pos_emb": args.rope_pi_factor != 1.0,
            "rotary_emb_scaling_factor": args.rope_pi_factor,
            "evo2_style_activations": args.mlp_activation == "evo2",
            "mlp_activation": "gelu",
            "tie_embeddings": args.tie_embeddings,
            "max_seqlen": args.max_seq_len,
            "make_vocab_size_divisible_by": 8 if args.vocab_size % 8 == 0 else 1,
            "inner_size_multiple_of": inner_size_multiple_of(args.ffn_hidden_dim),
            **_FIXED,
        }
        for kind, key in _KIND_INDEX_KEYS.items():
            cfg[key] = [i for i, k in enumerate(args.layout) if k == kind]
        return published_order(cfg)

    def from_external(self, state: Mapping[str, Any], source: str) -> dict[str, LazyTensor]:
        """Validate a vortex state dict against the args (whose RoPE base it may correct, see
        :func:`adopt_rope_base`); return the model's tensors (fp32, model FQNs), read from the source only when written
        (small filter tensors are converted and checked right away)."""
        args = self.args
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if not any(k.startswith("blocks.") for k in tensors):
            raise UserError(f"{source} is not a vortex state dict (no blocks.* tensors); is it an Evo 2 checkpoint?")
        seen = infer_layout({k: tuple(v.shape) for k, v in tensors.items()}, args)
        layers = f"the weights' layers read {seen}, the config's {args.layout}"
        rows = schema(args)
        missing = [key for key, *_ in rows if key not in tensors]
        if missing:
            hint = f"; {layers}" if seen != args.layout else "; the file is incomplete or for another model"
            raise UserError(f"{source} lacks {len(missing)} tensor(s) the config needs (first: {missing[0]}){hint}")
        if seen != args.layout:
            raise UserError(f"{source} does not match the config: {layers}; use the matching --config")
        for key, shape, *_ in rows:
            if tuple(tensors[key].shape) != shape:
                raise UserError(
                    f"{source}: {key} has shape {tuple(tensors[key].shape)} but the config expects {shape}; "
                    "the weights and --config describe different models"
                )
        rope_keys = adopt_rope_base(state, args, source)
        _check_extras(state, {key for key, *_ in rows} | set(rope_keys), source)
        decay = _decay(args)
        out: dict[str, LazyTensor] = {}
        for key, shape, name, transform in rows:
            t = tensors[key]
            if transform in ("mr", "mr_fir"):
                h = t.double().squeeze(1)
                h_hat = ((h.flip(-1) if transform == "mr_fir" else h) / decay).float()  # small (G, taps): checked now
                if not torch.isfinite(h_hat).all():
                    raise UserError(f"{source}: {key} / decay overflows; check the model's mr_decay_len and preset")
                out[name] = LazyTensor(tuple(h_hat.shape), torch.float32, lambda h=h_hat: h)
            elif transform == "log_poles":
                lp = t.double().squeeze(-1)
                if not (lp < 0).all():
                    raise UserError(f"{source}: {key} has non-negative log-poles; the LI filter would not decay")
                x = torch.log(-lp)
                p = x.float()
                out[name] = LazyTensor(tuple(p.shape), torch.float32, lambda p=p: p)
                gamma = (x - p.double()).float()
                out[_gamma_key(name)] = LazyTensor(tuple(gamma.shape), torch.float32, lambda g=gamma: g)
            else:  # read from the memory-mapped file only when the writer reaches it
                model_shape = shape[:1] + shape[2:] if transform == "squeeze" else shape
                out[name] = LazyTensor(model_shape, torch.float32, lambda t=t, s=model_shape: t.float().reshape(s))
        for name in skipless_keys(args):
            out[name] = LazyTensor((args.dim,), torch.float32, lambda d=args.dim: torch.zeros(d))
        _check_against_model(out, args)
        return out

    def to_external(self, state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """vortex state dict from model tensors: ``dtype`` except fp32 LI filters and RoPE buffers."""
        args = self.args
        self.config()  # rejects what vortex cannot express
        for name in skipless_keys(args):
            if state[name].count_nonzero():
                raise UserError(
                    f"{name} is not zero, but vortex has no skip term D for MR filters shorter than {MR_FFT_TAPS} "
                    f"taps (mr_filter_len {args.mr_filter_len}); export a model with mr_filter_len >= {MR_FFT_TAPS} "
                    "or D = 0"
                )
        out: dict[str, torch.Tensor] = {}
        decay = _decay(args)
        for key, shape, name, transform in schema(args):
            t = state[name]
            if transform in ("mr", "mr_fir"):
                h = t.double() * decay
                out[key] = (h.flip(-1) if transform == "mr_fir" else h).to(dtype).reshape(shape)
            elif transform == "log_poles":
                p, gamma = t.double(), state[_gamma_key(name)].double()
                out[key] = (-torch.exp(p + gamma)).float().reshape(shape)
            elif transform == "fp32":
                out[key] = t.float().reshape(shape).clone()
            else:
                out[key] = t.to(dtype).reshape(shape).clone()
        for i, kind in enumerate(args.layout):
            if kind == "*":
                out[f"blocks.{i}.inner_mha_cls.rotary_emb.inv_freq"] = vortex_inv_freq(args)
        return out
