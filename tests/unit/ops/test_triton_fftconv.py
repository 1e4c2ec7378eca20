"""The Triton Hyena-LI pipeline (``ops/triton_fftconv.py``) against the vortex-style reference, forward and backward.

The reference materialises the (D, N, L) modal tensor and differentiates through ``torch.fft`` with autograd
(``ops.fftconv``). On CPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest), so shapes stay tiny; on a
GPU with it unset they run compiled. Activations are strided views of an interleaved (B, L, 3D) projection, as in
the model.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from torchtitan_hyena.ops import conv, fftconv
from torchtitan_hyena.ops import triton_conv as tc
from torchtitan_hyena.ops import triton_fftconv as tf

if not tf.INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = torch.device("cpu" if tf.INTERPRETED else "cuda")


def _inputs(B: int, L: int, D: int, M: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """q, k, v (strided views of one (B, L, 3D) tensor), log_poles, residues, skip, and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, L, 3 * D, generator=g).to(DEVICE, dtype)
    log_poles = -torch.rand(D, M, generator=g) * 0.3 - 1e-3
    residues = torch.randn(D, M, generator=g) / M**0.5
    skip, dy = torch.randn(D, generator=g), torch.randn(B, L, D, generator=g)
    return [
        z[..., 0::3],
        z[..., 1::3],
        z[..., 2::3],
        *(t.to(DEVICE) for t in (log_poles, residues, skip)),
        dy.to(DEVICE),
    ]


def _reference(q, k, v, log_poles, residues, skip):
    return fftconv.gated_fft_conv_reference(
        q, k, v, fftconv.modal_filter_reference(log_poles, residues, q.shape[1]), skip
    )


def _fwd_bwd(fn, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """[output, gradient of each of the six inputs] for the upstream gradient ``inputs[-1]``."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:-1]]
    y = fn(*leaves)
    return [y, *torch.autograd.grad(y, leaves, inputs[-1])]


def _assert_matches(actual: list[torch.Tensor], expected: list[torch.Tensor], tol: float) -> None:
    """Max abs error <= tol, relative to the tensor's scale when that exceeds 1 (filter gradients sum B*L terms)."""
    names = ["y", "dq", "dk", "dv", "d_log_poles", "d_residues", "dskip"]
    for name, a, e in zip(names, actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{name}: {a.dtype} {a.shape} vs {e.dtype} {e.shape}"
        err = (a.detach().double() - e.detach().double()).abs().max().item()
        scale = max(1.0, e.detach().abs().max().item())
        assert err <= tol * scale, f"{name}: max abs error {err:.3g} > {tol} x {scale:.3g}"


@pytest.mark.parametrize(
    "B, L, D, M, block",
    [
        (2, 16, 6, 4, None),  # L a power of two, one channel block
        (1, 37, 6, 4, 4 * 37),  # L not a power of two; channel blocks of 4 and 2 (a block boundary inside D)
        (1, 200, 40, 3, None),  # several time and channel tiles, two time splits in both reductions, 3 modes
    ],
)
def test_matches_reference_fwd_bwd(monkeypatch, B, L, D, M, block):
    if block is not None:
        monkeypatch.setattr(tf, "BLOCK_ELEMENTS", block)
    inputs = _inputs(B, L, D, M, seed=L)
    _assert_matches(_fwd_bwd(tc.gated_modal_conv, inputs), _fwd_bwd(_reference, inputs), 1e-5)


def test_bf16_activations():
    inputs = _inputs(1, 40, 4, 4, dtype=torch.bfloat16)
    actual = _fwd_bwd(tc.gated_modal_conv, inputs)
    expected = _fwd_bwd(_reference, [t.float() for t in inputs])
    assert actual[0].dtype == torch.bfloat16 and actual[4].dtype == torch.float32
    _assert_matches([t.float() for t in actual], expected, 2e-2)


def test_torch_and_triton_dispatch_agree_and_gradients_are_deterministic():
    inputs = _inputs(1, 24, 3, 2)
    triton = _fwd_bwd(lambda *a: conv.gated_modal_conv(*a, impl="triton"), inputs)
    again = _fwd_bwd(lambda *a: conv.gated_modal_conv(*a, impl="triton"), inputs)
    assert all(torch.equal(a, b) for a, b in zip(triton, again))
    _assert_matches(triton, _fwd_bwd(lambda *a: conv.gated_modal_conv(*a, impl="torch"), inputs), 1e-5)
    assert conv.resolve_impl("auto", torch.device("cpu")) == "torch"


def test_custom_op_passes_opcheck_and_compiles_without_graph_breaks():
    """Schema, fake (meta) implementation, autograd registration; fullgraph torch.compile runs the same op."""
    q, k, v, log_poles, residues, skip, dy = _inputs(1, 8, 2, 2)
    args = [t.detach().clone().requires_grad_() for t in (q, k, v, log_poles, residues, skip)]
    torch.library.opcheck(torch.ops.torchtitan_hyena.triton_modal_conv.default, tuple(args))
    torch._dynamo.reset()
    compiled = torch.compile(tc.gated_modal_conv, backend="aot_eager", fullgraph=True)
    inputs = [q, k, v, log_poles, residues, skip, dy]
    _assert_matches(_fwd_bwd(compiled, inputs), _fwd_bwd(tc.gated_modal_conv, inputs), 0.0)


def test_dtensor_sharding_one_rank_mesh():
    """DTensor inputs sharded by batch (filter replicated) or by channel (filter rows sharded with them)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group in this process")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo" if DEVICE.type == "cpu" else "nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh(DEVICE.type, (1,))
        inputs = [t.contiguous() for t in _inputs(2, 12, 4, 2)]
        expected = _fwd_bwd(tc.gated_modal_conv, inputs)
        for act, filt in [(Shard(0), Replicate()), (Shard(2), Shard(0))]:
            acts = [distribute_tensor(inputs[i], mesh, [act]) for i in (0, 1, 2, 6)]
            params = [distribute_tensor(t, mesh, [filt]) for t in inputs[3:6]]
            actual = _fwd_bwd(tc.gated_modal_conv, [*acts[:3], *params, acts[3]])
            assert actual[0].placements == (act,)
            _assert_matches([t.full_tensor() for t in actual], expected, 1e-5)
    finally:
        dist.destroy_process_group()


def test_compare_with_reference_reports_small_errors():
    """The helper a device self-test calls: one row per length, every error within 1e-5 in fp32."""
    rows = tf.compare_with_reference(DEVICE, lengths=(24,), batch=1, channels=3, modes=2)
    assert [r["length"] for r in rows] == [24]
    errors = {k: v for k, v in rows[0].items() if k in ("y", "dq", "dk", "dv", "d_log_poles", "d_residues", "dskip")}
    assert len(errors) == 7 and max(errors.values()) <= 1e-5, errors


def test_shape_errors_and_cpu_without_interpreter(monkeypatch):
    q, k, v, log_poles, residues, skip, _ = _inputs(1, 8, 2, 2)
    with pytest.raises(ValueError, match="must be \\(D, N\\)"):
        tc.gated_modal_conv(q, k, v, log_poles, residues[:, :1], skip)
    monkeypatch.setattr(tc, "INTERPRETED", False)
    if DEVICE.type == "cpu":
        with pytest.raises(tc.ConfigError, match="TRITON_INTERPRET=1"):
            conv.gated_modal_conv(q, k, v, log_poles, residues, skip, impl="triton")
