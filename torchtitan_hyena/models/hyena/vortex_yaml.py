"""The vortex YAML that ``dcp_to_evo2.py --yaml`` writes: every key of the published Evo 2 configs.

vortex reads its config as a ``dotdict`` (a missing key reads as ``None``) or with ``config.get(key, default)``, and
several of those fallbacks break or change the model: ``use_flashfft`` defaults to a truthy string (vortex then
fails with ``AttributeError: ... flash_fft`` unless flashfftconv is installed), ``model_parallel_size`` has no
default (``TypeError`` in the MLP), ``column_split_hyena`` defaults to True, a missing ``interleave`` or
``hyena_out_proj_bias`` reads as off, and attention's ``qkv_proj_bias`` defaults to True. So the export writes every
key, in the published order (docs/stripedhyena2.md §8.4).
"""

from __future__ import annotations

import math
from typing import Any

# The keys of evo2's configs/evo2-*.yml (1B/7B/20B/40B, 8k to 1M; ArcInstitute/evo2 53f1959), in their order.
PUBLISHED_KEYS = (
    "model_name", "vocab_size", "hidden_size", "num_filters", "hcl_layer_idxs", "hcm_layer_idxs", "hcs_layer_idxs",
    "attn_layer_idxs", "hcm_filter_length", "hcl_filter_groups", "hcm_filter_groups", "hcs_filter_groups",
    "hcs_filter_length", "num_layers", "short_filter_length", "num_attention_heads", "short_filter_bias",
    "mlp_init_method", "mlp_output_init_method", "eps", "state_size", "rotary_emb_base", "rotary_emb_scaling_factor",
    "use_interpolated_rotary_pos_emb", "make_vocab_size_divisible_by", "inner_size_multiple_of", "inner_mlp_size",
    "log_intermediate_values", "proj_groups", "hyena_filter_groups", "column_split_hyena", "column_split",
    "interleave", "evo2_style_activations", "model_parallel_size", "pipe_parallel_size", "tie_embeddings",
    "mha_out_proj_bias", "hyena_out_proj_bias", "hyena_flip_x1x2", "qkv_proj_bias", "use_fp8_input_projections",
    "max_seqlen", "max_batch_size", "final_norm", "use_flash_attn", "use_flash_rmsnorm", "use_flash_depthwise",
    "use_flashfft", "use_laughing_hyena", "inference_mode", "tokenizer_type", "prefill_style", "mlp_activation",
    "print_activations",
)  # fmt: skip

# Engine settings: one process, no kernels beyond flash-attn (every published config uses it), bf16 input
# projections (FP8 would change the numerics and needs Transformer Engine and FP8 metadata the export has not got),
# the FFT prefill. init methods and tokenizer_type are not read by vortex; they are written as published.
ENGINE_KEYS: dict[str, Any] = {
    "mlp_init_method": "torch.nn.init.zeros_",
    "mlp_output_init_method": "torch.nn.init.zeros_",
    "log_intermediate_values": False,
    "hyena_filter_groups": 1,
    "model_parallel_size": 1,
    "pipe_parallel_size": 1,
    "use_fp8_input_projections": False,
    "max_batch_size": 1,
    "use_flash_attn": True,
    "use_flash_rmsnorm": False,
    "use_flash_depthwise": False,
    "use_flashfft": False,
    "use_laughing_hyena": False,
    "inference_mode": True,
    "tokenizer_type": "CharLevelTokenizer",
    "prefill_style": "fft",
    "print_activations": False,
}


def inner_size_multiple_of(ffn_hidden_dim: int) -> int:
    """A multiple (at most 128) that the MLP width is of; vortex reads it only without ``inner_mlp_size``."""
    return math.gcd(ffn_hidden_dim, 128)


def published_order(architecture: dict[str, Any]) -> dict[str, Any]:
    """``architecture`` plus the engine settings, every published key in the published order."""
    cfg = {**ENGINE_KEYS, **architecture}
    missing = [key for key in PUBLISHED_KEYS if key not in cfg]
    if missing:  # guards the exporter: vortex_config_from_args must set every architecture key
        raise RuntimeError(f"vortex YAML export lacks {missing}")
    return {key: cfg[key] for key in (*PUBLISHED_KEYS, *(k for k in cfg if k not in PUBLISHED_KEYS))}
