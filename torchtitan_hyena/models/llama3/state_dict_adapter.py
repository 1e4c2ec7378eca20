"""Llama 3 to and from Meta's and Hugging Face's checkpoint layouts: tensor names, q/k row order, model-parallel
shards, and the args to and from ``params.json`` / ``config.json``.

Our tensor names and RoPE layout are Meta's (``layers.0.attention.wq.weight``, interleaved pairs), so a Meta
checkpoint only needs its model-parallel shards merged. HF names differ and its wq/wk rows are in rotate-half
order; :func:`permute_qk` maps between the two in both directions. Anything our Llama cannot express (biases,
other RoPE types, another architecture) is a ``UserError`` naming the field, never a silently different model.
The files themselves are read and written by ``convert/llama.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from torchtitan_hyena.errors import UserError
from torchtitan_hyena.models.llama3.args import Llama3Args, ffn_hidden_dim
from torchtitan_hyena.models.llama3.flavors import llama3_flavors
from torchtitan_hyena.protocols.state_dict_adapter import LazyTensor, StateDictAdapter

EMBEDDING_KEYS = ("tok_embeddings.weight", "output.weight")

_HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}  # fmt: skip
_HF_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_FROM_HF_TOP = {v: k for k, v in _HF_TOP.items()}
_FROM_HF_LAYER = {v: k for k, v in _HF_LAYER.items()}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Meta model parallelism: ColumnParallelLinear shards rows (whole heads for wq/wk/wv), RowParallelLinear
# shards columns; norms are replicated. tok_embeddings depends on the generation (see MetaAdapter.shard_dim).
_COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
                    "feed_forward.w3.weight", "output.weight")  # fmt: skip
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")

_META_PARAMS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "rope_low_freq_factor",
                "rope_high_freq_factor", "rope_original_max_position", "max_seq_len", "max_batch_size"}  # fmt: skip


# ---------------------------------------------------------------------------------------------- names, layouts
def to_hf_name(key: str) -> str:
    """HF transformers name of one of our tensor names."""
    if key in _HF_TOP:
        return _HF_TOP[key]
    m = _LAYER_RE.match(key)
    if m is None or m.group(2) not in _HF_LAYER:
        raise KeyError(f"{key} has no HF name")
    return f"model.layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"


def from_hf_name(name: str) -> str | None:
    """Our name for an HF tensor, or None for tensors nobody needs (old RoPE tables)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name in _FROM_HF_TOP:
        return _FROM_HF_TOP[name]
    m = _HF_LAYER_RE.match(name)
    if m is None or m.group(2) not in _FROM_HF_LAYER:
        raise UserError(f"unexpected tensor {name} in the HF checkpoint: only plain Llama weights (no biases) convert")
    return f"layers.{m.group(1)}.{_FROM_HF_LAYER[m.group(2)]}"


def permute_qk(weight: torch.Tensor, n_heads: int, to_hf: bool) -> torch.Tensor:
    """Reorder the rows of wq/wk between Meta's RoPE layout and HF's.

    Within each head, Meta rotates row pairs (2j, 2j+1) and HF rotates rows (j, j + head_dim/2).
    ``to_hf=False`` is the exact inverse of ``to_hf=True``.
    """
    rows, cols = weight.shape
    half = rows // n_heads // 2
    split = (n_heads, half, 2, cols) if to_hf else (n_heads, 2, half, cols)
    return weight.reshape(split).transpose(1, 2).reshape(rows, cols)


def qk_heads(key: str, args: Llama3Args) -> int | None:
    """The head count whose rows :func:`permute_qk` reorders for tensor ``key``, or None (not wq/wk)."""
    if key.endswith("attention.wq.weight"):
        return args.n_heads
    if key.endswith("attention.wk.weight"):
        return args.kv_heads
    return None


# ---------------------------------------------------------------------------------------------- args
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
        if ffn_hidden_dim(dim, multiple_of, multiplier) == hidden:
            return multiple_of, multiplier
    raise UserError(f"intermediate_size {hidden} cannot be expressed by Meta's FFN rule for hidden_size {dim}")


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


# ---------------------------------------------------------------------------------------------- adapters
class MetaAdapter(StateDictAdapter):
    """Meta's layout (``params.json`` + ``consolidated.NN.pth``): our names, shards merged by the reader."""

    format = "meta"

    @staticmethod
    def args_from_config(
        params: dict[str, Any], source: str = "params.json", weights_vocab_size: int | None = None
    ) -> Llama3Args:
        """Llama3Args from Meta's params.json (Llama 2 and 3.x), checked like any model args. Llama 2's file leaves
        the vocabulary to the weights (``vocab_size`` -1): the reader passes ``weights_vocab_size``."""
        unknown = sorted(set(params) - _META_PARAMS)
        if unknown:
            raise UserError(f"{source} has fields {unknown} this converter does not know: only Llama 2/3 text models")
        missing = sorted({"dim", "n_layers", "n_heads"} - set(params))
        if missing:
            raise UserError(f"{source} lacks {missing}: is it the params.json of a Meta Llama checkpoint?")
        default = Llama3Args()
        vocab_size = params.get("vocab_size", -1)
        if vocab_size == -1 and weights_vocab_size is not None:
            vocab_size = weights_vocab_size
        values = {
            "dim": params["dim"],
            "n_layers": params["n_layers"],
            "n_heads": params["n_heads"],
            "n_kv_heads": params.get("n_kv_heads"),
            "vocab_size": vocab_size,
            "multiple_of": params.get("multiple_of", 256),
            "ffn_dim_multiplier": params.get("ffn_dim_multiplier"),
            "norm_eps": params.get("norm_eps", 1e-5),
            "rope_theta": params.get("rope_theta", 10000.0),  # Llama 1/2 files omit it; Meta's code then uses 1e4
            "max_seq_len": params.get("max_seq_len", default.max_seq_len),
        }
        if params.get("use_scaled_rope"):  # Llama 3.1+: Meta's code fixes factors 8 / 1 / 4 / 8192 unless given
            values["rope_scaling"] = "llama3"
            for key in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                        "rope_original_max_position"):  # fmt: skip
                values[key] = params.get(key, getattr(default, key))
        return Llama3Args.from_dict(values, source)

    def config(self) -> dict[str, Any]:
        """params.json for Meta's reference code (and for :meth:`args_from_config`)."""
        a = self.args
        params = {
            "dim": a.dim,
            "n_layers": a.n_layers,
            "n_heads": a.n_heads,
            "n_kv_heads": a.kv_heads,
            "vocab_size": a.vocab_size,
            "multiple_of": a.multiple_of,
            "ffn_dim_multiplier": a.ffn_dim_multiplier,
            "norm_eps": a.norm_eps,
            "rope_theta": a.rope_theta,
            "use_scaled_rope": a.rope_scaling == "llama3",
        }
        if a.rope_scaling == "llama3":
            params.update(
                rope_scaling_factor=a.rope_scaling_factor,
                rope_low_freq_factor=a.rope_low_freq_factor,
                rope_high_freq_factor=a.rope_high_freq_factor,
                rope_original_max_position=a.rope_original_max_position,
            )
        return params

    def shard_dim(self, key: str, shard_shape: tuple[int, ...]) -> int | None:
        """The dimension Meta's model parallelism split ``key`` along (None: replicated)."""
        if key.endswith(_COLUMN_PARALLEL):
            return 0
        if key.endswith(_ROW_PARALLEL):
            return 1
        if key == "tok_embeddings.weight":  # Llama 3 splits the vocabulary (dim 0), Llama 2 the embedding dim (dim 1)
            return 0 if shard_shape[1] == self.args.dim else 1
        return None  # replicated norms

    def from_external(self, tensors: Mapping[str, Any], source: str) -> dict[str, LazyTensor]:
        return dict(tensors)

    def to_external(self, state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) for k, v in state.items()}


class HFAdapter(StateDictAdapter):
    """transformers' ``LlamaForCausalLM``: HF names, q/k rows in rotate-half order, ``config.json``."""

    format = "hf"

    @staticmethod
    def args_from_config(config: dict[str, Any], source: str = "config.json") -> Llama3Args:
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
            if heads <= 0:
                raise UserError(f"{source}: num_attention_heads must be positive, got {heads}")
            if config.get("head_dim") not in (None, dim // heads):
                raise UserError(f"{source}: head_dim {config['head_dim']} != hidden_size / heads is not supported")
            multiple_of, multiplier = ffn_args(dim, config["intermediate_size"])
            values = {
                "dim": dim,
                "n_layers": config["num_hidden_layers"],
                "n_heads": heads,
                "n_kv_heads": config.get("num_key_value_heads"),
                "vocab_size": config["vocab_size"],
                "multiple_of": multiple_of,
                "ffn_dim_multiplier": multiplier,
                "norm_eps": config.get("rms_norm_eps", 1e-6),
                "max_seq_len": config.get("max_position_embeddings", Llama3Args().max_seq_len),
                **_rope_from_hf(config, source),
            }
        except KeyError as e:
            raise UserError(f"{source} lacks {e.args[0]!r}: is it a complete LlamaConfig?") from None
        return Llama3Args.from_dict(values, source)

    def config(self, dtype: torch.dtype) -> dict[str, Any]:
        """config.json of the equivalent ``LlamaForCausalLM`` (readable by transformers 4.43+ and 5)."""
        a = self.args
        rope_scaling = None
        if a.rope_scaling == "llama3":
            rope_scaling = {
                "rope_type": "llama3",
                "factor": a.rope_scaling_factor,
                "low_freq_factor": a.rope_low_freq_factor,
                "high_freq_factor": a.rope_high_freq_factor,
                "original_max_position_embeddings": a.rope_original_max_position,
            }
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": a.dim,
            "intermediate_size": a.ffn_hidden_dim,
            "num_hidden_layers": a.n_layers,
            "num_attention_heads": a.n_heads,
            "num_key_value_heads": a.kv_heads,
            "head_dim": a.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": a.max_seq_len,
            "rms_norm_eps": a.norm_eps,
            "rope_theta": a.rope_theta,
            "rope_scaling": rope_scaling,
            "vocab_size": a.vocab_size,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }

    def from_external(self, tensors: Mapping[str, Any], source: str) -> dict[str, LazyTensor]:
        """Our names, with wq/wk rows back in Meta's order (permuted when loaded); RoPE tables are dropped."""
        out = {}
        for name, tensor in tensors.items():
            key = from_hf_name(name)
            if key is None:
                continue
            heads = qk_heads(key, self.args)
            if heads is None:
                out[key] = tensor
            else:
                load = lambda t=tensor, h=heads: permute_qk(t.load(), h, to_hf=False)
                out[key] = LazyTensor(tensor.shape, tensor.dtype, load)
        return out

    def to_external(self, state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {}
        for key, tensor in state.items():
            heads = qk_heads(key, self.args)
            tensor = tensor.to(dtype)
            out[to_hf_name(key)] = tensor if heads is None else permute_qk(tensor, heads, to_hf=True).contiguous()
        return out
