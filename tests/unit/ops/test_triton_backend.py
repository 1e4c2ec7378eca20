"""Launch configurations of the Triton conv kernels per backend, checked without a GPU.

The interpreter cannot catch GPU compile-time limits (``docs/kernels.md`` §4), so the HIP constraints are
checked on the configuration lists themselves: wavefront-64 warp limit, 64 KB LDS, only options the backend's
compiler accepts.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types

import pytest

pytest.importorskip("triton")

import triton

from tests.conftest import REPO, env
from torchtitan_hyena.ops import triton_backend as tb

HIP_TARGETS = [tb.Target("hip", "gfx90a", 64), tb.Target("hip", "gfx942", 64)]
CUDA_TARGET = tb.Target("cuda", 90, 32)
META = {"BLOCK_T", "BLOCK_D", "ROWS", "BLOCK"}
KINDS = ["direct", "toeplitz", "filter_grad", "li_gate", "li_gate_bwd", "li_modal", "li_spectral"]


def _options(backend: str) -> set[str]:
    if backend == "hip":
        from triton.backends.amd.compiler import HIPOptions as options
    else:
        from triton.backends.nvidia.compiler import CUDAOptions as options
    return {f.name for f in dataclasses.fields(options)}


@pytest.mark.parametrize("target", HIP_TARGETS, ids=lambda t: t.arch)
@pytest.mark.parametrize("kind", KINDS)
def test_hip_configs_respect_amd_limits(kind, target):
    configs = tb.kernel_configs(kind, target, op_bytes=2, max_block_d=16, chunk=128)
    assert configs, "bf16 MR (dg = 16, chunk 128) must have a configuration on AMD"
    _, lds = tb.CONFIG_BUILDERS[kind]
    hip_options = _options("hip")
    for c in configs:
        assert c.num_warps <= 16 and c.num_stages <= 2
        extra = set(c.kwargs) - META
        assert extra <= hip_options, f"{extra - hip_options} unknown to HIPOptions"
        assert not extra & set(tb.BACKEND_ONLY_OPTIONS["cuda"])
        assert "waves_per_eu" in extra
        assert lds(c.kwargs, c.num_warps, 2, 128) <= tb.LDS_BYTES_HIP
        if "matrix_instr_nonkdim" in c.kwargs:
            assert c.kwargs["matrix_instr_nonkdim"] in (16, 32)
            assert c.kwargs["matrix_instr_nonkdim"] <= c.kwargs["BLOCK_D"]


def test_fp32_toeplitz_does_not_fit_amd_lds():
    """A 128 x 128 fp32 Toeplitz block is 64 KB by itself: no HIP configuration, so fp32 MR uses the reference."""
    assert tb.kernel_configs("toeplitz", HIP_TARGETS[0], op_bytes=4, max_block_d=16, chunk=128) == []
    assert tb.kernel_configs("toeplitz", HIP_TARGETS[0], op_bytes=4, max_block_d=16, chunk=32)


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_configs_use_only_cuda_options(kind):
    configs = tb.kernel_configs(kind, CUDA_TARGET, op_bytes=2, max_block_d=128, chunk=128)
    assert len(configs) == 1 if kind == "li_spectral" else len(configs) > 1  # in-place kernels are not autotuned
    cuda_options = _options("cuda")
    for c in configs:
        extra = set(c.kwargs) - META
        assert extra <= cuda_options and not extra & set(tb.BACKEND_ONLY_OPTIONS["hip"])
        assert c.num_warps <= 32


@pytest.mark.parametrize("kind", KINDS)
def test_interpreter_gets_a_single_config(kind):
    assert len(tb.kernel_configs(kind, tb.Target("interpreter"), max_block_d=16, chunk=16)) == 1


def test_filter_grad_rows_fit_short_chunks():
    for target in [*HIP_TARGETS, CUDA_TARGET, tb.Target("interpreter")]:
        configs = tb.kernel_configs("filter_grad", target, max_block_d=16, chunk=16)
        assert configs and all(c.kwargs["ROWS"] <= 16 for c in configs)


def test_detect_target_reads_the_triton_driver(monkeypatch):
    target = types.SimpleNamespace(backend="hip", arch="gfx90a", warp_size=64)
    fake = types.SimpleNamespace(get_current_target=lambda: target)
    monkeypatch.setattr(triton.runtime.driver, "_active", fake)
    assert tb.detect_target(interpreted=False) == tb.Target("hip", "gfx90a", 64)
    assert tb.detect_target(interpreted=True) == tb.Target("interpreter")


def test_tuned_kernel_builds_hip_configs_for_a_mocked_target(monkeypatch):
    from torchtitan_hyena.ops.triton_toeplitz import _pass_kernel

    monkeypatch.setattr(tb, "detect_target", lambda interpreted: HIP_TARGETS[0])
    kernel = tb.TunedKernel(_pass_kernel, "toeplitz", key=["D"])
    assert kernel.configs(op_bytes=2, max_block_d=16, chunk=128)
    assert kernel.configs(op_bytes=4, max_block_d=16, chunk=128) == []
    with pytest.raises(RuntimeError, match="no launch configuration"):
        kernel.launch(lambda meta: (1,), op_bytes=4, max_block_d=16, chunk=128)


def test_fp32_mr_on_amd_falls_back_to_the_reference(monkeypatch):
    torch = pytest.importorskip("torch")
    from torchtitan_hyena.ops import triton_conv as tc
    from torchtitan_hyena.ops import triton_toeplitz as tt

    monkeypatch.setattr(tb, "detect_target", lambda interpreted: HIP_TARGETS[0])
    monkeypatch.setattr(tt, "_PASS", tb.TunedKernel(tt._pass_kernel, "toeplitz", key=["D"]))
    monkeypatch.setattr(tt, "_FILTER_GRAD", tb.TunedKernel(tt._filter_grad_kernel, "filter_grad", key=["DG"]))
    monkeypatch.setattr(tt._PASS, "interpreted", False)
    monkeypatch.setattr(tt._FILTER_GRAD, "interpreted", False)
    assert "no Toeplitz kernel configuration fits" in tc.fallback_reason(torch.float32, 128)
    assert tc.fallback_reason(torch.bfloat16, 128) is None
    assert tc.fallback_reason(torch.float32, 7) is None
    assert "129 taps" in tc.fallback_reason(torch.bfloat16, 130)


@pytest.mark.parametrize(
    "target, dtype, first",
    [
        ("gfx90a", "bfloat16", False),
        ("gfx90a", "float32", True),
        ("gfx942", "bfloat16", True),
        ("sm90", "bfloat16", True),
    ],
)
def test_kernels_compile_for_gpu_targets(target, dtype, first):
    """Compile without a GPU, as the JIT would on the device: every MI250X configuration (and the default MI300X and
    CUDA ones) must compile, stay within 64 KB of LDS and its LDS estimate, and not spill registers (the Hyena-LI
    kernels in fp32 too). fp32 dots compile on gfx90a, which rejects tf32."""
    e = env()
    e.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torchtitan_hyena.ops.triton_aot", "--targets", target, "--dtype", dtype]
    proc = subprocess.run([*cmd, *(["--first"] if first else [])], cwd=REPO, env=e, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count(f"{target} ") >= (10 if first else 40)
