"""Float8: hardware gating on faked devices, and the torchao conversion (emulated on CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.distributed.float8 import (
    Accelerator,
    convert_to_float8,
    describe_accelerator,
    float8_unsupported_reason,
    validate_float8,
)
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.errors import ConfigError


def props(name: str, major: int, minor: int, arch: str = "") -> SimpleNamespace:
    return SimpleNamespace(name=name, major=major, minor=minor, gcnArchName=arch)


# name -> (torch.version.hip, device properties) as torch reports them; ROCm reports gfx-derived capabilities.
DEVICES = {
    "MI250X": ("6.2.4", props("AMD Instinct MI250X", 9, 0, "gfx90a:sramecc+:xnack-")),
    "MI300X": ("6.2.4", props("AMD Instinct MI300X", 9, 4, "gfx942:sramecc+:xnack-")),
    "MI355X": ("7.0.1", props("AMD Instinct MI355X", 9, 5, "gfx950:sramecc+:xnack-")),
    "RX7900": ("6.2.4", props("AMD Radeon RX 7900 XTX", 11, 0, "gfx1100")),
    "H100": (None, props("NVIDIA H100 80GB HBM3", 9, 0)),
    "L40S": (None, props("NVIDIA L40S", 8, 9)),
    "A100": (None, props("NVIDIA A100-SXM4-80GB", 8, 0)),
}
HAS_FP8 = {"MI250X": False, "MI300X": True, "MI355X": True, "RX7900": False, "H100": True, "L40S": True, "A100": False}


def fake_gpu(monkeypatch, name: str) -> Accelerator:
    hip, props = DEVICES[name]
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    return describe_accelerator(torch.device("cuda", 0))


@pytest.mark.parametrize("name", list(DEVICES))
def test_gate_reads_the_gfx_arch_not_the_capability(monkeypatch, name):
    acc = fake_gpu(monkeypatch, name)
    assert acc.kind == ("rocm" if DEVICES[name][0] else "cuda")
    reason = float8_unsupported_reason(acc)
    assert (reason is None) == HAS_FP8[name], reason
    if name == "MI250X":  # capability (9, 0) like an H100, but no fp8 at all
        assert acc.gfx_arch == "gfx90a" and "gfx90a" in reason and "MI250X" in reason


def test_cpu_has_no_fp8_and_the_error_names_the_fix(monkeypatch):
    cpu = describe_accelerator(torch.device("cpu"))
    assert float8_unsupported_reason(cpu) == "the cpu device has no fp8 matmuls"
    mi250x = fake_gpu(monkeypatch, "MI250X")
    f8 = ConfigManager().parse_args(["--float8.enable", "true"]).float8
    pd = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, world_size=8)
    for acc in (cpu, mi250x):
        with pytest.raises(ConfigError, match="set float8.enable = false to train in bf16") as e:
            validate_float8(f8, pd, acc)
        assert "\n" not in str(e.value)
    f8.emulate = True  # emulation is allowed anywhere (eager functional tests)
    validate_float8(f8, pd, cpu)
    validate_float8(f8, pd, mi250x)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 128, bias=False)
        self.odd = nn.Linear(128, 40, bias=False)  # 40 is not a multiple of 16
        self.up = nn.Linear(40, 64, bias=False)
        self.output = nn.Linear(64, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.relu(self.up(self.odd(torch.relu(self.proj(x))))))


def float8_config(*args: str):
    return ConfigManager().parse_args(["--float8.enable", "true", "--float8.emulate", "true", *args]).float8


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_conversion_filters_and_trains(recipe):
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    model = Tiny()
    convert_to_float8(model, float8_config("--float8.recipe", recipe), tp_degree=1, compiled=False)
    assert isinstance(model.proj, Float8Linear)
    assert not isinstance(model.odd, Float8Linear) and not isinstance(model.up, Float8Linear)  # dims % 16
    assert not isinstance(model.output, Float8Linear)  # filter_fqns default ["output"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, losses = torch.randn(32, 64), []
    for _ in range(5):
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_tp_degree_tightens_the_multiple_and_empty_conversion_fails():
    from torchao.float8.float8_linear import Float8Linear

    # Each TP shard must keep multiples of 16: with TP 4 the 32-wide head (8 rows per shard) stays high precision.
    for tp, head_converted in ((1, True), (4, False)):
        model = Tiny()
        convert_to_float8(model, float8_config("--float8.filter_fqns", "odd"), tp_degree=tp, compiled=False)
        assert isinstance(model.proj, Float8Linear)
        assert isinstance(model.output, Float8Linear) == head_converted
    with pytest.raises(ConfigError, match="no linear layer qualifies"):
        convert_to_float8(Tiny(), float8_config("--float8.filter_fqns", "proj"), tp_degree=4, compiled=False)
