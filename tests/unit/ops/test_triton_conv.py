"""Triton causal-conv kernels against the torch reference (``ops/conv.py``), forward and backward.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (set by ``conftest.pytest_configure``), so shapes stay tiny;
with a GPU and ``TRITON_INTERPRET`` unset the same tests run the compiled kernels. Shapes cover odd lengths,
lengths below the filter length, channel counts that are not a multiple of the tile, batch > 1, grouped filters
(including 15 channels per group), several time splits and chunks, and the Toeplitz exactness boundary.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.ops import conv
from torchtitan_hyena.ops import triton_conv as tc
from torchtitan_hyena.ops.triton_toeplitz import chunk_for, toeplitz_backward, toeplitz_forward

if not tc.INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = torch.device("cpu" if tc.INTERPRETED else "cuda")
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _full_precision_reference():
    """cuDNN convolutions default to TF32 on GPUs; fp32 comparisons need full-precision references."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def _randn(*shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(DEVICE, dtype)


def _fwd_bwd(fn, inputs: list, dy: torch.Tensor) -> list[torch.Tensor]:
    """[output, grad of every tensor input] of ``fn(*inputs)`` for the upstream gradient ``dy``."""
    leaves = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
    y = fn(*leaves)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    return [y, *torch.autograd.grad(y, tensors, dy)]


def _on_cpu(inputs: list) -> list:
    return [t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in inputs]


def _assert_matches(actual: list[torch.Tensor], expected: list[torch.Tensor], tol: float) -> None:
    """Max abs error <= tol, relative to the tensor's scale when that exceeds 1 (filter gradients sum B*L*dg
    terms); dtypes must match the reference's."""
    names = ["output", *[f"grad {i}" for i in range(len(expected) - 1)]]
    for name, a, e in zip(names, actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{name}: {a.dtype} {a.shape} vs {e.dtype} {e.shape}"
        err = (a.detach().cpu().double() - e.double()).abs().max().item()
        scale = max(1.0, e.abs().max().item())
        assert err <= tol * scale, f"{name}: max abs error {err:.3g} > {tol} x {scale:.3g}"


def _check_gated(B, L, D, G, K, flip, with_skip, dtype=torch.float32, filter_dtype=None):
    torch.manual_seed(L * 131 + D * 7 + K)
    q, k, v, dy = (_randn(B, L, D, dtype=dtype) for _ in range(4))
    h = _randn(G, K, scale=K**-0.5, dtype=filter_dtype or dtype)
    skip = _randn(D, dtype=filter_dtype or dtype) if with_skip else None
    inputs = [q, k, v, h, skip, flip]
    actual = _fwd_bwd(tc.gated_causal_conv, inputs, dy)
    expected = _fwd_bwd(conv.gated_causal_conv_reference, _on_cpu(inputs), dy.cpu())
    _assert_matches(actual, expected, TOL[dtype])


@pytest.mark.parametrize(
    "B, L, D, G, K, flip, with_skip",
    [
        (2, 77, 48, 16, 7, False, False),  # Hyena-SE orientation, odd L, D not a multiple of the tile, dg = 3
        (1, 5, 16, 1, 7, True, True),  # L < K, impulse-response order, D term
        (1, 130, 32, 2, 16, False, True),  # longest direct filter, dg = 16, two time splits
    ],
)
def test_direct_gated_conv_matches_reference(B, L, D, G, K, flip, with_skip):
    _check_gated(B, L, D, G, K, flip, with_skip)


@pytest.mark.parametrize("B, L, C", [(2, 67, 96), (1, 2, 24)])
def test_featurizer_conv_matches_reference(B, L, C):
    torch.manual_seed(L + C)
    base, w, dy = _randn(B, L, C + 8), _randn(C, 3, scale=0.5), _randn(B, L, C)
    x = base[..., 4 : C + 4]  # a non-contiguous channel slice, as of a projection output
    actual = _fwd_bwd(tc.causal_conv, [x, w], dy)
    expected = _fwd_bwd(conv.causal_conv_reference, _on_cpu([x, w]), dy.cpu())
    _assert_matches(actual, expected, TOL[torch.float32])


@pytest.mark.parametrize(
    "B, L, D, G, K, flip, with_skip",
    [
        (2, 300, 32, 2, 128, True, True),  # Hyena-MR: 128 taps, chunk 128, L not a multiple of it, dg = 16
        (1, 50, 30, 2, 128, True, False),  # L < K, dg = 15 (Evo 2 1B) masked in a 16-wide tile
        (1, 100, 16, 1, 33, False, True),  # K = chunk + 1 = 33: the exactness boundary; two time splits
    ],
)
def test_toeplitz_gated_conv_matches_reference(B, L, D, G, K, flip, with_skip):
    _check_gated(B, L, D, G, K, flip, with_skip)


def test_toeplitz_exactness_condition_is_enforced():
    q, k, v, dy = (_randn(1, 150, 16) for _ in range(4))
    h = _randn(1, 66, scale=0.1)
    with pytest.raises(ValueError, match="filter_len <= chunk \\+ 1"):
        toeplitz_forward(q, k, v, h, None, lag_order=True, chunk=64)
    with pytest.raises(ValueError, match="filter_len <= chunk \\+ 1"):
        toeplitz_backward(dy, q, k, v, h, None, lag_order=True, chunk=64)
    h = h[:, :65]  # 65 taps with chunk 64 is exact
    y = toeplitz_forward(q, k, v, h, None, lag_order=True, chunk=64)
    expected = conv.gated_causal_conv_reference(*_on_cpu([q, k, v, h]), None, True)
    _assert_matches([y], [expected], TOL[torch.float32])
    assert chunk_for(128) == 128 and chunk_for(129) == 128 and chunk_for(7) == 16


@pytest.mark.parametrize("K", [7, 128])
def test_bf16_inputs_and_filters(K):
    """bf16 activations with a bf16 filter (FSDP mixed precision): fp32 accumulation, outputs and gradients in
    the inputs' and filter's dtypes, within bf16 rounding of the reference."""
    _check_gated(1, 70, 32, 2, K, K > 16, K > 16, dtype=torch.bfloat16)


def test_fp32_filter_with_bf16_activations():
    _check_gated(1, 40, 16, 1, 7, False, True, dtype=torch.bfloat16, filter_dtype=torch.float32)


def test_fp16_inputs():
    _check_gated(1, 40, 16, 1, 7, False, True, dtype=torch.float16)


@pytest.mark.parametrize("K", [3, 7, 40])
def test_expanded_upstream_gradient(K):
    """``y.sum().backward()`` hands the kernels a stride-0 (expanded) gradient."""
    torch.manual_seed(K)
    q, k, v = (_randn(1, 45, 16) for _ in range(3))
    h, skip = _randn(2, K, scale=K**-0.5), _randn(16)

    def grads(fn, inputs):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        fn(*leaves, K > 16).sum().backward()
        return [t.grad for t in leaves]

    actual = grads(tc.gated_causal_conv, [q, k, v, h, skip])
    expected = grads(conv.gated_causal_conv_reference, _on_cpu([q, k, v, h, skip]))
    _assert_matches(actual, expected, TOL[torch.float32])


def test_gradcheck_float64():
    """Finite differences in float64 (fp64 accumulation) for each kernel family."""
    torch.manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, device=DEVICE, requires_grad=True)

    checks = [
        (tc.causal_conv, (leaf(1, 6, 4), leaf(4, 3))),
        (tc.gated_causal_conv, (leaf(1, 6, 4), leaf(1, 6, 4), leaf(1, 6, 4), leaf(2, 3), leaf(4), False)),
        (tc.gated_causal_conv, (leaf(1, 20, 16), leaf(1, 20, 16), leaf(1, 20, 16), leaf(1, 17), leaf(16), True)),
    ]
    for fn, args in checks:
        assert torch.autograd.gradcheck(fn, args, fast_mode=True, atol=1e-6, rtol=1e-5)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of the custom ops."""
    torch.manual_seed(0)
    x, w = _randn(1, 9, 8), _randn(8, 3)
    q, k, v = (_randn(1, 9, 16) for _ in range(3))
    h = _randn(1, 7)
    for t in (x, w, q, k, v, h):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.torchtitan_hyena.triton_causal_conv.default, (x, w))
    torch.library.opcheck(torch.ops.torchtitan_hyena.triton_gated_conv.default, (q, k, v, h, None, False))


def test_filter_gradient_is_deterministic():
    torch.manual_seed(0)
    inputs = [*(_randn(1, 150, 16) for _ in range(3)), _randn(1, 128, scale=0.1), None, True]
    dy = _randn(1, 150, 16)
    first = _fwd_bwd(tc.gated_causal_conv, inputs, dy)[4]
    second = _fwd_bwd(tc.gated_causal_conv, inputs, dy)[4]
    assert torch.equal(first, second)


class _HyenaBlockStandIn(nn.Module):
    """Projection -> featurizer conv (3 taps on 3D channels) -> de-interleaved (q, k, v) channel triples ->
    grouped gated conv -> output projection, as in a Hyena-SE/MR block (``docs/stripedhyena2.md`` §2)."""

    def __init__(self, dim: int, groups: int, taps: int, flip: bool, with_skip: bool, impl: str) -> None:
        super().__init__()
        self.impl, self.flip = impl, flip
        self.proj = nn.Linear(dim, 3 * dim, bias=False)
        self.featurizer = nn.Parameter(torch.randn(3 * dim, 3) * 0.5)
        self.h = nn.Parameter(torch.randn(groups, taps) * taps**-0.5)
        self.skip = nn.Parameter(torch.randn(dim)) if with_skip else None
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = conv.causal_conv(self.proj(x), self.featurizer, impl=self.impl)
        q, k, v = z[..., 0::3], z[..., 1::3], z[..., 2::3]
        y = conv.gated_causal_conv(q, k, v, self.h, self.skip, self.flip, impl=self.impl)
        return x + self.out(y)


def _stand_in_model(impl: str) -> nn.Module:
    torch.manual_seed(0)
    se = _HyenaBlockStandIn(32, 2, 7, flip=False, with_skip=False, impl=impl)
    mr = _HyenaBlockStandIn(32, 2, 128, flip=True, with_skip=True, impl=impl)
    return nn.Sequential(se, mr).to(DEVICE)


def _train_losses(model: nn.Module, steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(2, 130, 32, generator=gen).to(DEVICE)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_compiled_hyena_block_trains_like_torch():
    """fullgraph torch.compile (inductor, as the trainer) of SE and MR stand-in blocks on the Triton ops: no
    graph breaks, both custom ops in the graph, and 3 AdamW steps whose losses match the eager torch reference
    (fp32, rel <= 1e-5)."""
    from torch._inductor.compile_fx import compile_fx

    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    model = _stand_in_model("triton")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    losses = _train_losses(compiled, steps=3)
    expected = _train_losses(_stand_in_model("torch"), steps=3)
    targets = {str(n.target).removesuffix(".default") for gm in graphs for n in gm.graph.nodes}
    assert {"torchtitan_hyena.triton_causal_conv", "torchtitan_hyena.triton_gated_conv"} <= targets
    for step, (a, e) in enumerate(zip(losses, expected), start=1):
        assert abs(a - e) <= 1e-5 * abs(e), f"step {step}: {a} vs {e}"


def test_compile_does_not_trace_the_device_query(monkeypatch):
    """The kernel choice queries the Triton driver, which Dynamo cannot trace: it must be evaluated, not traced,
    or fullgraph compilation of an MR block fails on GPUs."""
    from torchtitan_hyena.ops import triton_backend as tb
    from torchtitan_hyena.ops import triton_toeplitz as tt

    target = tb.detect_target(tc.INTERPRETED)

    def untraceable_detect(interpreted: bool) -> tb.Target:
        torch._dynamo.graph_break()
        return target

    monkeypatch.setattr(tb, "detect_target", untraceable_detect)
    monkeypatch.setattr(tt, "_PASS", tb.TunedKernel(tt._pass_kernel, "toeplitz", key=tt._PASS.key))
    monkeypatch.setattr(tt, "_FILTER_GRAD", tb.TunedKernel(tt._filter_grad_kernel, "filter_grad", key=["DG"]))
    torch._dynamo.reset()
    q, k, v = (_randn(1, 20, 16) for _ in range(3))
    h = _randn(1, 40, scale=0.2)
    fn = torch.compile(lambda *a: tc.gated_causal_conv(*a, None, True), backend="eager", fullgraph=True)
    _assert_matches([fn(q, k, v, h)], [conv.gated_causal_conv_reference(*_on_cpu([q, k, v, h]), None, True)], 1e-5)


def test_dtensor_sharding_one_rank_mesh():
    """DTensor inputs sharded by batch or by channel (filters sharded with their channels) reach the local
    kernels through the registered sharding rules, forward and backward."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group in this process")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo" if DEVICE.type == "cpu" else "nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh(DEVICE.type, (1,))
        torch.manual_seed(0)
        q, k, v, dy = (_randn(2, 20, 32) for _ in range(4))
        h, skip = _randn(2, 7, scale=0.4), _randn(32)
        expected = _fwd_bwd(tc.gated_causal_conv, [q, k, v, h, skip, False], dy)
        for act, filt in [(Shard(0), Replicate()), (Shard(2), Shard(0))]:
            shard = [distribute_tensor(t, mesh, [act]) for t in (q, k, v, dy)]
            params = [distribute_tensor(t, mesh, [filt]) for t in (h, skip)]
            actual = _fwd_bwd(tc.gated_causal_conv, [*shard[:3], *params, False], shard[3])
            assert actual[0].placements == (act,)
            _assert_matches([t.full_tensor() for t in actual], expected, TOL[torch.float32])
        x, w = distribute_tensor(q, mesh, [Shard(2)]), distribute_tensor(_randn(32, 3), mesh, [Shard(0)])
        y = tc.causal_conv(x, w)
        _assert_matches([y.full_tensor()], [tc.causal_conv(q, w.full_tensor())], TOL[torch.float32])
    finally:
        dist.destroy_process_group()


def test_triton_on_cpu_without_interpreter_is_a_config_error(monkeypatch):
    monkeypatch.setattr(tc, "INTERPRETED", False)
    x, w = torch.randn(1, 4, 3), torch.randn(3, 3)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        conv.causal_conv(x, w, impl="triton")
    assert conv.resolve_impl("auto", torch.device("cpu")) == "torch"


def test_unsupported_filters_fall_back_to_reference():
    torch.manual_seed(0)
    q, k, v = (_randn(1, 10, 4) for _ in range(3))
    h = _randn(1, 130, scale=0.1)  # over the two-pass kernel's 129 taps
    y = tc.gated_causal_conv(q, k, v, h, None, True)
    _assert_matches([y], [conv.gated_causal_conv_reference(*_on_cpu([q, k, v, h]), None, True)], 1e-5)
    w = _randn(4, 20, scale=0.2)  # ungated filters over the direct kernel's 16 taps
    _assert_matches([tc.causal_conv(q, w)], [conv.causal_conv_reference(*_on_cpu([q, w]))], 1e-5)
