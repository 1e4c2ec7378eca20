"""Correctness on the device, op by op: the Triton convolutions (featurizer, Hyena-SE, Hyena-MR; forward and backward;
fp32 and bf16) against the torch reference, the Hyena-LI FFT pipeline against the vortex-style reference, flash-attn
against SDPA, and float8 accepted or refused as the project's gate says for this device.

Errors are the largest absolute difference divided by the reference tensor's scale when that exceeds 1 (filter
gradients sum over batch and time), the measure the kernel tests use; tolerances are theirs too.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from torchtitan_hyena.config.job_config import Float8
from torchtitan_hyena.distributed.float8 import (
    convert_to_float8,
    describe_accelerator,
    float8_unsupported_reason,
    validate_float8,
)
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.models.common.attention import sdpa_attention
from torchtitan_hyena.models.common.flash_attention import import_flash_attn_func, make_flash_attention
from torchtitan_hyena.ops import triton_conv, triton_fftconv
from torchtitan_hyena.tools.conv_bench import OPS, make_op
from torchtitan_hyena.tools.selftest.report import Report

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# Relative Frobenius error of a float8 MLP vs bf16: e4m3 forward and e5m2 gradients keep 3 and 2 mantissa bits (about
# 0.05 and 0.08 measured on CPU, emulated); a wrong cast or scale is off by order one.
FLOAT8_TOL = 0.15
SECTION = "correctness"


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.detach().double() - expected.detach().double()).abs().max().item()
    return diff / max(1.0, expected.detach().abs().max().item())


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """No TF32 in the references: cuDNN convolutions and cuBLAS matmuls default to it on GPUs."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _fwd_bwd(name: str, impl: str, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device):
    """[output, gradient of every input] of operator ``name`` through ``impl``; both impls see the same inputs."""
    inputs, fn = make_op(name, impl, *shape, dtype, device)
    y = fn()
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device, y.dtype)
    return [y, *torch.autograd.grad(y, inputs, dy)]


def check_convs(report: Report, shape: tuple[int, int, int], device: torch.device) -> None:
    """Featurizer, SE and MR kernels at (batch, length, width) ``shape`` in fp32 and bf16, through the dispatch the
    model uses; a kernel this device does not run (fp32 MR on AMD LDS) is a skipped row naming the reason."""
    for name, spec in OPS.items():
        for dtype in (torch.float32, torch.bfloat16):
            label = f"triton {name} fwd+bwd {str(dtype).removeprefix('torch.')}"
            reason = triton_conv.fallback_reason(dtype, spec["taps"]) if spec["gated"] else None
            if reason is not None:
                report.check(SECTION, label, None, f"no kernel here: {reason}")
                continue
            actual = _fwd_bwd(name, "triton", shape, dtype, device)
            with full_precision():
                expected = _fwd_bwd(name, "conv1d", shape, dtype, device)
            grads = ("dx", "dw") if not spec["gated"] else ("dq", "dk", "dv", "dh", "dskip")
            errors = {k: scaled_error(a, e) for k, a, e in zip(("y", *grads), actual, expected)}
            worst = max(errors.values())
            report.check(SECTION, label, worst <= TOL[dtype], f"worst {worst:.2e} <= {TOL[dtype]:g}", **errors)


def check_li(report: Report, lengths: tuple[int, ...], batch: int, channels: int, device: torch.device) -> None:
    """The Hyena-LI Triton pipeline against the vortex-style reference, per length, fp32 and bf16 inputs."""
    for dtype in (torch.float32, torch.bfloat16):
        with full_precision():
            rows = triton_fftconv.compare_with_reference(device, lengths, batch=batch, channels=channels, dtype=dtype)
        for row in rows:
            errors = {k: v for k, v in row.items() if k not in ("length", "batch", "channels", "dtype")}
            worst = max(errors.values())
            label = f"triton LI fwd+bwd {str(dtype).removeprefix('torch.')} L={row['length']}"
            report.check(SECTION, label, worst <= TOL[dtype], f"worst {worst:.2e} <= {TOL[dtype]:g}", **errors)


def check_flash(report: Report, shape: tuple[int, int, int, int, int], device: torch.device) -> None:
    """flash-attn against SDPA, bf16, GQA, causal, forward and backward. Both are judged against an fp32 SDPA
    reference: flash passes when its error is at most twice SDPA-bf16's (plus 1e-3), as flash-attn's own tests."""
    flash_attn_func = import_flash_attn_func()
    if device.type != "cuda" or flash_attn_func is None:
        why = "no GPU" if device.type != "cuda" else "flash_attn is not installed"
        report.check(SECTION, "flash-attn vs SDPA", None, why)
        return
    flash = make_flash_attention(flash_attn_func)
    batch, heads, kv_heads, length, head_dim = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, length, head_dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, length, head_dim, generator=g) for _ in range(2))
    dy = torch.randn(batch, heads, length, head_dim, generator=g).to(device)

    def run(fn, dtype: torch.dtype) -> list[torch.Tensor]:
        leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        y = fn(*leaves)
        return [y, *torch.autograd.grad(y, leaves, dy.to(dtype))]

    with full_precision():
        reference = run(sdpa_attention, torch.float32)
    base, actual = run(sdpa_attention, torch.bfloat16), run(flash, torch.bfloat16)
    names = ("y", "dq", "dk", "dv")
    errors = {n: scaled_error(a, r) for n, a, r in zip(names, actual, reference)}
    bounds = {n: 2 * scaled_error(b, r) + 1e-3 for n, b, r in zip(names, base, reference)}
    ok = all(errors[n] <= bounds[n] for n in names)
    detail = "; ".join(f"{n} {errors[n]:.1e} (bound {bounds[n]:.1e})" for n in names)
    report.check(SECTION, "flash-attn vs SDPA bf16 fwd+bwd", ok, detail, **errors)


def _float8_linear_error(config: Float8, device: torch.device) -> float:
    """Relative error of a two-layer float8 MLP's output and weight gradients against the same MLP in bf16."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(256, 512, bias=False), nn.Linear(512, 256, bias=False)).to(device)
    model = copy.deepcopy(reference)
    convert_to_float8(model, config, tp_degree=1, compiled=False)
    x = torch.randn(128, 256, device=device)
    results = []
    for m in (model, reference):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = m(x)
        y.float().square().mean().backward()
        results.append([y.float(), *(p.grad.float() for p in m.parameters())])
    return max(((a - e).norm() / e.norm()).item() for a, e in zip(*results))


def check_float8(report: Report, device: torch.device) -> None:
    """``float8.enable = true`` must be accepted exactly where the gate finds fp8 matmuls; where accepted, a float8
    MLP runs forward and backward and stays near bf16. On CPU the emulated path runs instead (it keeps the accepted
    branch of this check exercised between GPU runs)."""
    acc = describe_accelerator(device)
    reason = float8_unsupported_reason(acc)
    layout = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, world_size=1)
    try:
        validate_float8(Float8(enable=True, filter_fqns=[]), layout, acc)
        refusal = None
    except ConfigError as e:
        refusal = str(e)
    consistent = (refusal is None) == (reason is None)
    verdict = "refused" if refusal is not None else "accepted"
    detail = f"{verdict} for {acc.name} {acc.gfx_arch or acc.capability}" + (f": {reason}" if reason else "")
    report.check(SECTION, f"float8 gate ({verdict})", consistent, detail)
    if refusal is None:
        error = _float8_linear_error(Float8(enable=True, filter_fqns=[]), device)
        report.check(SECTION, "float8 MLP fwd+bwd vs bf16", error <= FLOAT8_TOL, f"rel error {error:.3f}", error=error)
    elif device.type == "cpu":
        error = _float8_linear_error(Float8(enable=True, emulate=True, filter_fqns=[]), device)
        ok = error <= FLOAT8_TOL
        report.check(SECTION, "float8 MLP fwd+bwd vs bf16 (emulated)", ok, f"rel error {error:.3f}", error=error)
