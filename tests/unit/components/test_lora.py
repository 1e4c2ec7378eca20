"""LoRA on one process, both families' debug models: step 0 is the base model, only adapters train, merging keeps
the function, the checkpoint is small, bad targets are one line."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from torchtitan_hyena.build import init_lora, meta_model
from torchtitan_hyena.components.checkpoint import model_state_dict
from torchtitan_hyena.components.lora import LoRALinear, apply_lora, merge_adapters, parameter_counts
from torchtitan_hyena.components.optimizer import build_optimizers
from torchtitan_hyena.config.job_config import Lora, Optimizer
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.protocols.train_spec import get_flavor_args, get_train_spec

FAMILIES = ("llama3", "hyena")


def build(family: str, lora: Lora | None, seed: int = 0, **args) -> nn.Module:
    spec = get_train_spec(family)
    model = meta_model(spec, dataclasses.replace(get_flavor_args(spec, "debugmodel"), **args))
    if lora is not None:
        apply_lora(model, lora)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"), seed=seed)
        init_lora(model, seed)
    return model


def tokens(n: int = 2, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(1))


def train_steps(model: nn.Module, steps: int = 2, opt=None) -> list[float]:
    opt = opt or build_optimizers([model], Optimizer(lr=1e-2))
    x = tokens()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_starts_at_the_base_model_trains_only_adapters_and_merges(family):
    lora = Lora(enable=True, rank=4, alpha=8.0)
    base, adapted = build(family, None), build(family, lora)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(adapted(x), base(x))  # B = 0: step 0 is the base model, bit for bit
    targets = [n for n, m in adapted.named_modules() if isinstance(m, LoRALinear)]
    assert targets and not [n for n in targets if "filter" in n]  # never the Hyena filters unless named
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    losses = train_steps(adapted)
    assert losses[-1] < losses[0]
    changed = {n for n, p in adapted.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert changed == trainable and changed and all(n.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for n in changed)
    counts = parameter_counts(adapted)
    assert counts["trainable_params"] == sum(p.numel() for n, p in adapted.named_parameters() if n in trainable)
    assert counts["total_params"] == sum(p.numel() for p in base.parameters()) + counts["trainable_params"]

    adapted.eval()
    with torch.no_grad():
        expected = adapted(x)
        assert merge_adapters(adapted) == len(targets)
        assert not any(isinstance(m, LoRALinear) for m in adapted.modules())
        assert set(adapted.state_dict()) == set(base.state_dict())  # a plain model's checkpoint again
        torch.testing.assert_close(adapted(x), expected, rtol=1e-5, atol=1e-5)


def test_lora_options_choose_what_trains():
    model = build("llama3", Lora(enable=True, target_modules=["layers.0.attention.w?"], train_norms=True,
                                 train_embeddings=True))  # fmt: skip
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {f"layers.0.attention.{w}" for w in ("wq", "wk", "wv", "wo")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"tok_embeddings.weight", "output.weight", "norm.weight", "layers.1.ffn_norm.weight"} <= trainable
    assert "layers.0.attention.wq.weight" not in trainable
    with pytest.raises(ConfigError, match=r"match no linear layer of this model; its linear layers are named"):
        build("llama3", Lora(enable=True, target_modules=["q_proj"]))


def test_hyena_filters_are_adapted_only_when_named():
    freeform = {"li_filter": "implicit_freeform"}  # the LI filter with linear layers (an MLP over positions)
    base = build("hyena", None, **freeform)
    adapted = build("hyena", Lora(enable=True, target_modules=["*.filter.mlp.*"]), **freeform)
    assert {n.split(".filter.")[0] for n, m in adapted.named_modules() if isinstance(m, LoRALinear)} == {
        f"layers.{i}.mixer" for i, kind in enumerate(base.args.layout) if kind == "H"
    }
    with torch.no_grad():
        assert torch.equal(adapted(tokens()), base(tokens()))


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


def test_lora_checkpoint_of_the_debug_hybrid_is_small(tmp_path):
    """Model + optimizer state as training saves them, with and without LoRA (default rank and targets)."""
    sizes = {}
    for name, lora in (("full", None), ("lora", Lora(enable=True))):
        model = build("hyena", lora)
        opt = build_optimizers([model], Optimizer())
        train_steps(model, steps=1, opt=opt)
        state = {**model_state_dict([model], trainable_only=lora is not None), "optimizer": opt.state_dict()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=str(tmp_path / name), no_dist=True)
        sizes[name] = _size(tmp_path / name)
    assert sizes["lora"] < 0.05 * sizes["full"], sizes
