"""StripedHyena 2 flavors. Evo 2 flavors take the published sizes (docs/stripedhyena2.md §7): vocab 512, tied
embeddings, eps 1e-6, SE/MR filter lengths 7/128, 16 LI modes, MR decay ``weak`` with savanna's pretraining
L_cache 8192. ``max_seq_len`` is overwritten by ``training.seq_len``.
"""

from torchtitan_hyena.models.hyena.args import HyenaArgs

LAYOUT_1B = "SDH*SDHSDH*SDHSDH*SDHSDH*"
LAYOUT_7B = "SDH*SDHSDH*SDHSDH*SDHSDH*SDHSDH*"
LAYOUT_20B = "SDH*SDHSDH*SDHSDH*SDHSDH"
LAYOUT_40B = "SDH*SDHSDH*SDHSDH*SDHSDH*SDHSDH*SDH*SDHSDH*SDHSDH*"


def _evo2(**kw) -> HyenaArgs:
    return HyenaArgs(vocab_size=512, tie_embeddings=True, norm_eps=1e-6, mlp_activation="evo2", **kw)


_7B = dict(dim=4096, layout=LAYOUT_7B, n_heads=32, filter_groups=256, rope_theta=1e4)
_40B = dict(dim=8192, layout=LAYOUT_40B, n_heads=64, filter_groups=512, rope_theta=1e6)

hyena_flavors = {
    # Tiny, CPU-fast, every block type; vocab 256 for the Neural Pile sample.
    "debugmodel": HyenaArgs(
        dim=256, layout="SDH*SDH*", n_heads=4, ffn_hidden_dim=512, filter_groups=16, vocab_size=256, max_seq_len=2048
    ),
    "evo2_1b": _evo2(
        dim=1920, layout=LAYOUT_1B, n_heads=15, ffn_hidden_dim=5120, filter_groups=128, rope_theta=1e4, max_seq_len=8192
    ),
    "evo2_7b": _evo2(**_7B, ffn_hidden_dim=11008, max_seq_len=8192),
    "evo2_7b_262k": _evo2(**_7B, ffn_hidden_dim=11008, rope_pi_factor=32, max_seq_len=262144),
    "evo2_7b_1m": _evo2(**_7B, ffn_hidden_dim=11264, rope_pi_factor=128, max_seq_len=1048576),
    "evo2_20b": _evo2(
        dim=8192,
        layout=LAYOUT_20B,
        n_heads=64,
        ffn_hidden_dim=22528,
        filter_groups=512,
        rope_theta=1e6,
        rope_pi_factor=128,
        max_seq_len=1048576,
    ),  # fmt: skip
    "evo2_40b": _evo2(**_40B, ffn_hidden_dim=21888, max_seq_len=8192),
    "evo2_40b_1m": _evo2(**_40B, ffn_hidden_dim=22528, rope_pi_factor=128, max_seq_len=1048576),
    # Neural Pile hybrid, ~7.8 B parameters: Evo 2 7B's depth, width and SDH* layout with the Llama-3-8B
    # MLP width (14336) of the Neural Pile Llama models, vocab 256 (spike counts), RoPE base 5e5 as those
    # models, 131k context trained from scratch; MR decay keeps Evo 2's L_cache 8192 prior.
    "neural_pile_hybrid_8b": HyenaArgs(
        **_7B | {"rope_theta": 5e5}, ffn_hidden_dim=14336, vocab_size=256, max_seq_len=131072
    ),  # fmt: skip
}
