"""Llama model arguments to and from Meta's ``params.json`` and transformers' ``config.json``.

Anything our Llama cannot express (biases, other RoPE types, another architecture) is a
``UserError`` naming the field, never a silently different model.
"""

from __future__ import annotations

from typing import Any

import torch

from torchtitan_hyena.errors import UserError
from torchtitan_hyena.models.llama3 import llama3_flavors
from torchtitan_hyena.models.llama3.args import Llama3Args

_META_PARAMS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "rope_low_freq_factor",
                "rope_high_freq_factor", "rope_original_max_position", "max_seq_len", "max_batch_size"}  # fmt: skip


def flavor_of(args: Llama3Args) -> str:
    """The registered flavor with this shape (e.g. ``8B``), else ``custom``."""

    def shape(a: Llama3Args) -> tuple[int, ...]:
        return a.dim, a.n_layers, a.n_heads, a.kv_heads, a.ffn_hidden_dim

    return next((name for name, f in llama3_flavors.items() if shape(f) == shape(args)), "custom")


def ffn_args(dim: int, hidden: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's FFN rule gives exactly ``hidden``.

    HF configs store only the FFN width; Meta's style (no multiplier, or one with few decimals,
    rounded to a power of two) is preferred, so Llama-3-8B's 14336 maps back to (2048, 1.3).
    """
    base = int(8 * dim / 3)
    if hidden <= 0 or base <= 0:
        raise UserError(f"intermediate_size {hidden} with hidden_size {dim} is not a valid Llama FFN")
    pow2 = hidden & -hidden
    candidates = [(pow2, None), *((pow2, round(hidden / base, d)) for d in range(1, 5)), (1, (hidden + 0.5) / base)]
    for multiple_of, multiplier in candidates:
        if Llama3Args(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=multiplier).ffn_hidden_dim == hidden:
            return multiple_of, multiplier
    raise UserError(f"intermediate_size {hidden} cannot be expressed by Meta's FFN rule for hidden_size {dim}")


def checked(args: Llama3Args, source: str) -> Llama3Args:
    """``args`` if their types and values describe a Llama, else a one-line error naming ``source`` (a vocabulary
    of -1 is Llama 2's "from the weights"; the weights' shapes are checked against the model later)."""
    values = args.to_dict()
    if values["vocab_size"] == -1:
        values["vocab_size"] = 1
    Llama3Args.from_dict(values, source)
    return args


def args_from_meta_params(params: dict[str, Any], source: str = "params.json") -> Llama3Args:
    """Llama3Args from Meta's params.json (Llama 2 and 3.x). A vocab_size of -1 is left for the weights to fix."""
    unknown = sorted(set(params) - _META_PARAMS)
    if unknown:
        raise UserError(f"{source} has fields {unknown} this converter does not know: only Llama 2/3 text models")
    missing = sorted({"dim", "n_layers", "n_heads"} - set(params))
    if missing:
        raise UserError(f"{source} lacks {missing}: is it the params.json of a Meta Llama checkpoint?")
    default = Llama3Args()
    args = Llama3Args(
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"),
        vocab_size=params.get("vocab_size", -1),
        multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),  # Llama 1/2 files omit it; Meta's code then uses 1e4
        max_seq_len=params.get("max_seq_len", default.max_seq_len),
    )
    if params.get("use_scaled_rope"):  # Llama 3.1+: Meta's code fixes factors 8 / 1 / 4 / 8192 unless given
        args.rope_scaling = "llama3"
        args.rope_scaling_factor = params.get("rope_scaling_factor", default.rope_scaling_factor)
        args.rope_low_freq_factor = params.get("rope_low_freq_factor", default.rope_low_freq_factor)
        args.rope_high_freq_factor = params.get("rope_high_freq_factor", default.rope_high_freq_factor)
        args.rope_original_max_position = params.get("rope_original_max_position", default.rope_original_max_position)
    return checked(args, source)


def meta_params_from_args(args: Llama3Args) -> dict[str, Any]:
    """params.json for Meta's reference code (and for args_from_meta_params)."""
    params = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.kv_heads,
        "vocab_size": args.vocab_size,
        "multiple_of": args.multiple_of,
        "ffn_dim_multiplier": args.ffn_dim_multiplier,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "use_scaled_rope": args.rope_scaling == "llama3",
    }
    if args.rope_scaling == "llama3":
        params.update(
            rope_scaling_factor=args.rope_scaling_factor,
            rope_low_freq_factor=args.rope_low_freq_factor,
            rope_high_freq_factor=args.rope_high_freq_factor,
            rope_original_max_position=args.rope_original_max_position,
        )
    return params


def _rope_from_hf(config: dict[str, Any], source: str) -> dict[str, Any]:
    # transformers 5 writes rope_parameters (theta inside); 4.x writes rope_theta + rope_scaling.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"rope_theta": theta}
    if kind != "llama3":
        raise UserError(f"{source}: RoPE type {kind!r} is not supported (only default and llama3)")
    return {
        "rope_theta": theta,
        "rope_scaling": "llama3",
        "rope_scaling_factor": rope["factor"],
        "rope_low_freq_factor": rope["low_freq_factor"],
        "rope_high_freq_factor": rope["high_freq_factor"],
        "rope_original_max_position": rope["original_max_position_embeddings"],
    }


def args_from_hf_config(config: dict[str, Any], source: str = "config.json") -> Llama3Args:
    """Llama3Args from a transformers ``LlamaConfig`` dict; anything our Llama cannot express is an error."""
    model_type, archs = config.get("model_type"), config.get("architectures") or []
    if model_type != "llama" or any(a != "LlamaForCausalLM" for a in archs):
        raise UserError(
            f"{source}: model_type {model_type!r}, architectures {archs}: only LlamaForCausalLM is supported "
            "(unsupported architecture)"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise UserError(f"{source}: {flag} = true is not supported (this Llama has no biases)")
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (Llama uses silu)")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if not isinstance(config.get(key, 0), int) or isinstance(config.get(key), bool):
            raise UserError(f"{source}: {key} = {config[key]!r} is not an integer")
    try:
        dim, heads = config["hidden_size"], config["num_attention_heads"]
        if config.get("head_dim") not in (None, dim // heads):
            raise UserError(f"{source}: head_dim {config['head_dim']} != hidden_size / heads is not supported")
        multiple_of, multiplier = ffn_args(dim, config["intermediate_size"])
        args = Llama3Args(
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=config.get("num_key_value_heads"),
            vocab_size=config["vocab_size"],
            multiple_of=multiple_of,
            ffn_dim_multiplier=multiplier,
            norm_eps=config.get("rms_norm_eps", 1e-6),
            max_seq_len=config.get("max_position_embeddings", Llama3Args().max_seq_len),
            **_rope_from_hf(config, source),
        )
    except KeyError as e:
        raise UserError(f"{source} lacks {e.args[0]!r}: is it a complete LlamaConfig?") from None
    return checked(args, source)


def hf_config_from_args(args: Llama3Args, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the ``LlamaForCausalLM`` equivalent to our model (readable by transformers 4.43+ and 5)."""
    rope_scaling = None
    if args.rope_scaling == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max_position,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "vocab_size": args.vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
