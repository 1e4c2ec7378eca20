"""Llama 3 building blocks against straightforward references."""

from __future__ import annotations

import math

import torch

from torchtitan_hyena.distributed.utils import clean_fqn
from torchtitan_hyena.models.common.init import param_seed
from torchtitan_hyena.models.common.rope import apply_rope_half, apply_rope_interleaved, rope_inv_freq, rope_tables
from torchtitan_hyena.models.llama3 import llama3_flavors
from torchtitan_hyena.models.llama3.args import Llama3Args
from torchtitan_hyena.models.llama3.model import Transformer


def meta_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's llama reference: complex multiply of interleaved pairs."""
    _, seqlen, _, dim = x.shape
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    freqs_cis = torch.polar(torch.ones(seqlen, dim // 2), torch.outer(torch.arange(seqlen).float(), freqs))
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)


def test_interleaved_rope_matches_meta_reference():
    x = torch.randn(2, 17, 3, 16)
    cos, sin = rope_tables(rope_inv_freq(16, 500000.0), torch.arange(17))
    assert torch.allclose(apply_rope_interleaved(x, cos, sin), meta_rope(x, 500000.0), atol=1e-5)


def test_interleaved_rope_takes_bf16_activations_and_tables():
    """Under bf16 FSDP the tables arrive in bf16 too (block inputs are cast): the rotation runs in fp32."""
    x = torch.randn(2, 17, 3, 16).bfloat16()
    cos, sin = rope_tables(rope_inv_freq(16, 500000.0), torch.arange(17))
    out = apply_rope_interleaved(x, cos.bfloat16(), sin.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), meta_rope(x.float(), 500000.0), atol=2e-2)


def test_half_rope_is_interleaved_rope_after_permutation():
    x = torch.randn(1, 9, 2, 8)
    cos, sin = rope_tables(rope_inv_freq(8, 10000.0), torch.arange(9))
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # interleaved pairs -> halves
    assert torch.allclose(apply_rope_half(x[..., perm], cos, sin), apply_rope_interleaved(x, cos, sin)[..., perm])


def test_llama31_rope_scaling_matches_reference_formula():
    inv = rope_inv_freq(128, 500000.0, "llama3", 8.0, 1.0, 4.0, 8192)
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    for f, b in zip(inv.tolist(), base.tolist()):
        wavelen = 2 * math.pi / b
        if wavelen < 8192 / 4:
            want = b
        elif wavelen > 8192 / 1:
            want = b / 8
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            want = (1 - smooth) * b / 8 + smooth * b
        assert math.isclose(f, want, rel_tol=1e-6)


def tiny_model(**kw) -> Transformer:
    args = Llama3Args(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32, max_seq_len=16, **kw)
    model = Transformer(args)
    model.init_weights(seed=0)
    return model


def test_forward_shapes_and_positions():
    model = tiny_model()
    tokens = torch.randint(0, 32, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 32)
    assert torch.allclose(model(tokens, torch.arange(16)), logits)
    # causality: changing the last token leaves earlier logits unchanged
    tokens2 = tokens.clone()
    tokens2[:, -1] = (tokens2[:, -1] + 1) % 32
    assert torch.allclose(model(tokens2)[:, :-1], logits[:, :-1], atol=1e-6)


def test_init_is_deterministic_and_name_keyed():
    a, b = tiny_model(), tiny_model()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert param_seed(0, "layers.0._checkpoint_wrapped_module.attention.wq.weight") == param_seed(
        0, "layers.0.attention.wq.weight"
    )
    assert clean_fqn("layers._orig_mod.0.w") == "layers.0.w"
    norm = dict(a.named_parameters())["layers.1.ffn_norm.weight"]
    assert torch.equal(norm, torch.ones_like(norm))
    wo = dict(a.named_parameters())["layers.1.attention.wo.weight"]
    assert abs(wo.std().item() - 0.02 / 2) < 0.004  # depth-scaled: 0.02 / sqrt(2 * (layer + 1))


def test_rope_tables_are_not_saved():
    assert not any("rope" in k for k in tiny_model().state_dict())


def test_flavor_vocab_follows_config():
    from torchtitan_hyena.config import ConfigManager

    args = llama3_flavors["8B"]
    assert args.vocab_size == 128256
    c = ConfigManager().parse_args(["--model.vocab_size", "256", "--training.seq_len", "131072"])
    import copy

    a = copy.deepcopy(args)
    a = a.with_config(c)
    assert (a.vocab_size, a.max_seq_len) == (256, 131072)
