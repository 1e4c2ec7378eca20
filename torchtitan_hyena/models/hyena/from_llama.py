"""A StripedHyena 2 hybrid seeded from a Llama 3 checkpoint: the ``llama3`` state-dict adapter of the hyena family
(``llama_to_dcp.py --target hyena``; ``convert/llama.py`` reads the Llama's files and writes the DCP).

Hybrid layer i takes Llama layer i's norms and MLP; where the layout has attention (``*``) it also takes
Llama layer i's attention. Hyena mixers (S, D, H) are left out of the checkpoint: a run seeding from it
(``checkpoint.initial_load_path``) initializes them fresh, from its own seed, and lists them in its log.

Mapping (hybrid <- Llama), exact except for the norm's eps:

* ``mixer.wqkv`` <- ``wq, wk, wv`` as rows (head, {q, k, v}, head_dim). Llama rotates interleaved pairs
  (2j, 2j+1) of each head, the hybrid halves (j, j + d/2): q and k rows are permuted within each head
  (``permute_qk``, the permutation of HF checkpoints), so rotate-half on the new rows is Llama's rotation
  of the old ones, and q.k, hence the attention output, is unchanged. The hybrid is plain MHA: each KV
  head is repeated for its query group (``repeat_interleave``), which is exact but makes the k and v
  projections n_heads / n_kv_heads times larger (4x for Llama-3-8B).
* ``mixer.out_proj`` <- ``wo``, with a zero bias. RoPE base and Llama-3.1 frequency scaling go to the args.
* ``mlp.w1/w2/w3`` <- ``feed_forward.w1/w2/w3`` in every block, same width, ``mlp_activation = "silu"``
  (SwiGLU, the function Llama computes).
* ``pre_norm``, ``post_norm``, ``norm`` <- ``attention_norm``, ``ffn_norm``, ``norm``: scales and eps copied.
  The hybrid adds eps to the RMS instead of under the root: relative output difference about
  eps / (2 rms^2) - eps / rms, under 1e-5 for RMS >= 1 but 5 % for RMS 0.01 (eps 1e-5).
* ``tok_embeddings`` and ``output`` are dropped by default (tied hybrid, Evo 2 style);
  ``--keep_embeddings`` keeps both and unties the hybrid's head.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from torchtitan_hyena.errors import UserError
from torchtitan_hyena.models.common.rope import RopeScalingArgs
from torchtitan_hyena.models.hyena.args import HyenaArgs, parse_layout
from torchtitan_hyena.models.hyena.flavors import hyena_flavors
from torchtitan_hyena.models.hyena.model import StripedHyena
from torchtitan_hyena.models.llama3.args import Llama3Args
from torchtitan_hyena.models.llama3.state_dict_adapter import EMBEDDING_KEYS, permute_qk
from torchtitan_hyena.protocols.state_dict_adapter import LazyTensor, StateDictAdapter
from torchtitan_hyena.tools.logging import logger

MODEL_NAME = "hyena"
# Evo 2's striping (its 1B, 7B and 20B layouts are this pattern cut to their depth; 32 layers give Evo 2 7B's).
DEFAULT_PATTERN = "SDH*SDH"
# The Llama-3.1 scaling parameters besides the mode (the shared RopeScalingArgs fields).
_ROPE_SCALING = tuple(f.name for f in dataclasses.fields(RopeScalingArgs) if f.name != "rope_scaling")


def default_layout(n_layers: int) -> str:
    return (DEFAULT_PATTERN * math.ceil(n_layers / len(DEFAULT_PATTERN)))[:n_layers]


def matching_flavor(llama: Llama3Args) -> str | None:
    """The first hyena flavor of the same width, heads and MLP width: its runs can seed from the hybrid."""
    shape = (llama.dim, llama.n_heads, llama.ffn_hidden_dim)
    return next((n for n, f in hyena_flavors.items() if (f.dim, f.n_heads, f.ffn_hidden_dim) == shape), None)


def hybrid_args(llama: Llama3Args, layout: str, keep_embeddings: bool) -> tuple[HyenaArgs, str]:
    """(args, flavor label) of the hybrid. Hyena hyper-parameters come from the matching flavor, else
    Evo 2's defaults with filter groups of 16 channels (one filter per channel if the width is not a multiple)."""
    layout = parse_layout(layout or default_layout(llama.n_layers))
    if len(layout) != llama.n_layers:
        raise UserError(
            f"--layout {layout!r} has {len(layout)} layers but the Llama has {llama.n_layers}; "
            "give one letter per layer"
        )
    fields = dict(
        dim=llama.dim,
        layout=layout,
        n_heads=llama.n_heads,
        ffn_hidden_dim=llama.ffn_hidden_dim,
        vocab_size=llama.vocab_size,
        max_seq_len=llama.max_seq_len,
        norm_eps=llama.norm_eps,
        rope_theta=llama.rope_theta,
        rope_pi_factor=1.0,
        **{f.name: getattr(llama, f.name) for f in dataclasses.fields(RopeScalingArgs)},
        tie_embeddings=not keep_embeddings,
        mlp_activation="silu",
    )
    flavor = matching_flavor(llama)
    if flavor is not None:
        return dataclasses.replace(hyena_flavors[flavor], **fields), flavor
    return HyenaArgs(filter_groups=llama.dim // 16 if llama.dim % 16 == 0 else llama.dim, **fields), "custom"


def fused_wqkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, n_heads: int, kv_heads: int) -> torch.Tensor:
    """Meta-layout wq/wk/wv -> the hybrid's wqkv: rows (head, {q, k, v}, head_dim), q/k rows in rotate-half
    order, each KV head repeated for the n_heads / kv_heads query heads that attend with it."""
    dim = wq.shape[1]
    head_dim = wq.shape[0] // n_heads
    q = permute_qk(wq, n_heads, to_hf=True).reshape(n_heads, head_dim, dim)
    k = permute_qk(wk, kv_heads, to_hf=True).reshape(kv_heads, head_dim, dim)
    v = wv.reshape(kv_heads, head_dim, dim)
    group = n_heads // kv_heads
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    return torch.stack((q, k, v), dim=1).reshape(3 * n_heads * head_dim, dim)


def _attention(src: Mapping[str, LazyTensor], prefix: str, args: Llama3Args) -> dict[str, LazyTensor]:
    wq, wk, wv, wo = (src[f"{prefix}attention.{w}.weight"] for w in ("wq", "wk", "wv", "wo"))
    rows = 3 * args.n_heads * args.head_dim

    def wqkv() -> torch.Tensor:
        return fused_wqkv(wq.load(), wk.load(), wv.load(), args.n_heads, args.kv_heads).to(wq.dtype)

    return {
        "mixer.wqkv.weight": LazyTensor((rows, args.dim), wq.dtype, wqkv),
        "mixer.out_proj.weight": wo,
        "mixer.out_proj.bias": LazyTensor((args.dim,), wo.dtype, lambda: torch.zeros(args.dim, dtype=wo.dtype)),
    }


def hybrid_tensors(
    src: Mapping[str, LazyTensor], llama: Llama3Args, args: HyenaArgs, keep_embeddings: bool
) -> dict[str, LazyTensor]:
    """The hybrid's tensors taken from the Llama's (lazy, as the reader's); Hyena mixers are absent."""
    out = {"norm.weight": src["norm.weight"]}
    if keep_embeddings:
        out.update({k: src[k] for k in EMBEDDING_KEYS})
    for i, kind in enumerate(args.layout):
        prefix, layer = f"layers.{i}.", {}
        layer["pre_norm.weight"] = src[f"{prefix}attention_norm.weight"]
        layer["post_norm.weight"] = src[f"{prefix}ffn_norm.weight"]
        for w in ("w1", "w2", "w3"):
            layer[f"mlp.{w}.weight"] = src[f"{prefix}feed_forward.{w}.weight"]
        if kind == "*":
            layer.update(_attention(src, prefix, llama))
        out.update({f"layers.{i}.{k}": t for k, t in layer.items()})
    _check_against_model(out, args, keep_embeddings)
    return out


def _model_shapes(args: HyenaArgs) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in StripedHyena(args).state_dict().items()}


def _is_fresh(key: str, args: HyenaArgs, keep_embeddings: bool) -> bool:
    parts = key.split(".")
    hyena_mixer = parts[0] == "layers" and parts[2] == "mixer" and args.layout[int(parts[1])] != "*"
    return hyena_mixer or (key in EMBEDDING_KEYS and not keep_embeddings)


def fresh_keys(args: HyenaArgs, keep_embeddings: bool) -> list[str]:
    """The hybrid's tensors absent from the conversion: Hyena mixers, and the embeddings unless kept."""
    return [k for k in _model_shapes(args) if _is_fresh(k, args, keep_embeddings)]


def _check_against_model(tensors: dict[str, LazyTensor], args: HyenaArgs, keep_embeddings: bool) -> None:
    """Exactly the hybrid's tensors minus the fresh ones, with the model's shapes (guards the mapping)."""
    got = {k: t.shape for k, t in tensors.items()}
    want = {k: s for k, s in _model_shapes(args).items() if not _is_fresh(k, args, keep_embeddings)}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:3]
        raise RuntimeError(f"hybrid mapping out of sync with the hyena model: {diff}")


def train_flags(args: HyenaArgs, flavor: str) -> list[str]:
    """``--model.*`` flags with which a run of the registered ``flavor`` builds this hybrid."""
    base = hyena_flavors[flavor]
    flags = ["--model.name", MODEL_NAME, "--model.flavor", flavor]
    if args.layout != base.layout:
        flags += ["--model.layout", args.layout]
    flags += ["--model.mlp_activation", args.mlp_activation]
    if args.rope_theta != base.rope_theta:
        flags += ["--model.rope_theta", f"{args.rope_theta:g}"]
    if args.rope_pi_factor != base.rope_pi_factor:
        flags += ["--model.rope_pi_factor", f"{args.rope_pi_factor:g}"]
    if args.rope_scaling != "none":
        flags += ["--model.rope_scaling", args.rope_scaling]
        for key in _ROPE_SCALING:
            flags += [f"--model.{key}", f"{getattr(args, key):g}"]
    if not args.tie_embeddings:
        flags += ["--model.tie_embeddings", "false", "--model.vocab_size", str(args.vocab_size)]
    return flags


class HybridFromLlama(StateDictAdapter):
    """The hybrid's tensors from a Llama 3 state dict (see the module docstring); one way only."""

    format = "llama3"

    def __init__(self, args: HyenaArgs, llama: Llama3Args, flavor: str, keep_embeddings: bool) -> None:
        super().__init__(args)
        self.llama, self.flavor, self.keep_embeddings = llama, flavor, keep_embeddings

    @classmethod
    def from_llama(cls, llama: Llama3Args, layout: str, keep_embeddings: bool) -> HybridFromLlama:
        """The adapter for a hybrid of ``layout`` (Evo 2's striping when empty) seeded from a ``llama``."""
        args, flavor = hybrid_args(llama, layout, keep_embeddings)
        return cls(args, llama, flavor, keep_embeddings)

    def from_external(self, tensors: Mapping[str, Any], source: str) -> dict[str, LazyTensor]:
        """The hybrid's tensors (lazy, as the reader's); logs the mapping."""
        args, la = self.args, self.llama
        out = hybrid_tensors(tensors, la, args, self.keep_embeddings)
        attention = [i for i, k in enumerate(args.layout) if k == "*"]
        hyena = [i for i, k in enumerate(args.layout) if k != "*"]
        gqa = f", KV heads repeated {la.n_heads // la.kv_heads}x (GQA -> MHA)" if la.kv_heads != la.n_heads else ""
        logger.info(
            f"hybrid layout {args.layout} from {source}: attention of Llama layers {attention}{gqa}; norms and "
            f"SwiGLU MLPs of all {args.n_layers} layers; Hyena mixers of layers {hyena} are left for a fresh init"
        )
        return out

    def log_training_hint(self, output_dir: str | Path) -> None:
        """How to start a run from the hybrid: the flags that make the trainer build this model."""
        args, flavor = self.args, self.flavor
        if flavor == "custom":
            logger.warning(
                f"no hyena flavor has dim {args.dim}, {args.n_heads} heads and MLP width {args.ffn_hidden_dim}: "
                "register one in torchtitan_hyena/models/hyena/flavors.py to train this hybrid"
            )
            return
        flags = ["--checkpoint.initial_load_path", str(output_dir), *train_flags(args, flavor)]
        logger.info(f"train it with: {shlex.join(flags)}")
        eps = hyena_flavors[flavor].norm_eps
        if eps != args.norm_eps:
            logger.info(f"(runs of flavor {flavor} use its norm_eps {eps:g}, not the Llama's {args.norm_eps:g})")
