"""TrainSpec registry and flavors."""

from __future__ import annotations

import pytest
import torch

from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.protocols.train_spec import get_flavor_args, get_train_spec, register_train_spec


def test_llama3_registered_with_flavors():
    spec = get_train_spec("llama3")
    assert {"debugmodel", "1B", "8B", "70B"} <= set(spec.model_args)
    args = get_flavor_args(spec, "8B")
    assert args.ffn_hidden_dim == 14336 and args.kv_heads == 8
    assert get_flavor_args(spec, "70B").ffn_hidden_dim == 28672


def test_flavor_args_are_copies():
    spec = get_train_spec("llama3")
    get_flavor_args(spec, "8B").vocab_size = 7
    assert get_flavor_args(spec, "8B").vocab_size != 7


def test_unknown_names():
    with pytest.raises(ConfigError, match="not a registered model"):
        get_train_spec("gpt5")
    with pytest.raises(ConfigError, match="not a llama3 flavor"):
        get_flavor_args(get_train_spec("llama3"), "3B")


def test_duplicate_registration_is_a_bug():
    with pytest.raises(ValueError, match="already registered"):
        register_train_spec(get_train_spec("llama3"))


def test_neural_pile_8b_size():
    """gpt-neuro's 8B with vocab 256 has about 6.98 B parameters (embedding + output ~2.1 M)."""
    spec = get_train_spec("llama3")
    args = get_flavor_args(spec, "8B")
    args.vocab_size, args.max_seq_len = 256, 131072
    with torch.device("meta"):
        model = spec.model_cls(args)
    nparams, flops = args.get_nparams_and_flops(model, 131072)
    assert 6.97e9 < nparams < 6.99e9
    # attention term 12 * L * H * Dh * T dominates at 131k (about 2.06e11 of about 2.48e11)
    assert 2.45e11 < flops < 2.50e11
