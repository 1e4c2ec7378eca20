"""LR schedules and optimizer parameter groups."""

from __future__ import annotations

import pytest
import torch

from torchtitan_hyena.components.lr_scheduler import lr_factor
from torchtitan_hyena.components.optimizer import OptimizersContainer
from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.models.llama3.args import Llama3Args
from torchtitan_hyena.models.llama3.model import Transformer


def f(step, **kw):
    base = dict(warmup_steps=10, total_steps=110, decay_ratio=-1.0, decay_type="linear", min_lr_factor=0.0)
    base.update(kw)
    return lr_factor(step, **base)


def test_warmup_then_linear_decay_to_min():
    assert f(0) == pytest.approx(1 / 11)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1 - 1 / 100)
    assert f(109) == pytest.approx(0.0)
    assert f(109, min_lr_factor=0.1) == pytest.approx(0.1)
    assert f(59) == pytest.approx(0.5)


def test_decay_shapes():
    assert f(59, decay_type="cosine") == pytest.approx(0.5)
    assert f(34, decay_type="sqrt") == pytest.approx(1 - 0.5)
    assert f(109, decay_type="cosine", min_lr_factor=0.2) == pytest.approx(0.2)


def test_wsd_holds_then_decays():
    kw = dict(decay_ratio=0.2)  # last 22 of 110 steps decay
    assert f(50, **kw) == 1.0 and f(87, **kw) == 1.0
    assert f(88, **kw) < 1.0 and f(109, **kw) == pytest.approx(0.0)


def test_no_decay_groups():
    model = Transformer(Llama3Args(dim=32, n_layers=1, n_heads=2, vocab_size=16, max_seq_len=8))
    c = ConfigManager().parse_args(["--optimizer.decay_norms_and_embeddings", "false"])
    opt = OptimizersContainer([model], c.optimizer).optimizers[0]
    decayed, exempt = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in exempt["params"]} == {
        "tok_embeddings.weight", "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight", "norm.weight"
    }  # fmt: skip
    assert exempt["weight_decay"] == 0.0 and decayed["weight_decay"] == 0.1
    all_groups = ConfigManager().parse_args([]).optimizer
    assert len(OptimizersContainer([model], all_groups).optimizers[0].param_groups) == 1


def test_optimizer_state_roundtrip():
    torch.manual_seed(0)
    model = Transformer(Llama3Args(dim=32, n_layers=1, n_heads=2, vocab_size=16, max_seq_len=8))
    model.init_weights()
    opt = OptimizersContainer([model], ConfigManager().parse_args([]).optimizer)
    model(torch.randint(0, 16, (1, 8))).sum().backward()
    opt.step()
    sd = opt.state_dict()
    assert any(k.startswith("state.layers.0.attention.wq.weight") for k in sd)
    model.zero_grad(set_to_none=True)  # a resumed run loads before its first backward
    opt2 = OptimizersContainer([model], ConfigManager().parse_args([]).optimizer)
    opt2.load_state_dict(sd)
    new, old = opt2.optimizers[0].state_dict()["state"], opt.optimizers[0].state_dict()["state"]
    assert all(new[i]["exp_avg"].equal(old[i]["exp_avg"]) for i in old)
