"""TrainSpec registry, flavors, and the model.* config keys each family reads."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from torchtitan_hyena.build import model_args_from_config
from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.config.job_config import Model
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.protocols.train_spec import available, get_flavor_args, get_train_spec, register_train_spec


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


# ------------------------------------------------------------------------------------------------ model.* keys
class Recorder:
    """Stands in for a job config and records which ``model.*`` keys are read."""

    def __init__(self, config) -> None:
        self.training, self.read = config.training, set()
        outer = self

        class Model:
            def __getattr__(self, name):
                outer.read.add(name)
                return getattr(config.model, name)

        self.model = Model()


@pytest.mark.parametrize("name", ["llama3", "hyena"])
def test_a_family_reads_exactly_the_model_keys_it_declares(name):
    spec = get_train_spec(name)
    for cli in ([], ["--model.rope_scaling", "llama3", "--model.rope_theta", "1e4", "--model.layout", "S*"]):
        recorder = Recorder(ConfigManager().parse_args(["--model.name", name, *cli]))
        get_flavor_args(spec, "debugmodel").config_overrides(recorder)
        assert recorder.read <= spec.args_cls.config_keys
    assert recorder.read == spec.args_cls.config_keys  # with scaling and every key set, all of them are read


def test_every_model_key_belongs_to_a_family():
    read = set().union(*(get_train_spec(n).args_cls.config_keys for n in available()))
    assert {f.name for f in dataclasses.fields(Model)} - read == {"name", "flavor"}


def test_a_key_of_another_family_fails_in_one_line():
    spec = get_train_spec("llama3")
    with pytest.raises(ConfigError) as e:
        model_args_from_config(spec, ConfigManager().parse_args(["--model.layout", "SDH*"]))
    message = str(e.value)
    assert message.startswith("model.layout = 'SDH*' is hyena's option and model.name 'llama3' does not read it")
    assert "\n" not in message
    # The family's own keys, and other keys left at their defaults, pass.
    args = model_args_from_config(spec, ConfigManager().parse_args(["--model.rope_theta", "1e4"]))
    assert args.rope_theta == 1e4
    hyena = ConfigManager().parse_args(["--model.name", "hyena", "--model.layout", "SDH*", "--model.li_filter", ""])
    assert model_args_from_config(get_train_spec("hyena"), hyena).layout == "SDH*"
