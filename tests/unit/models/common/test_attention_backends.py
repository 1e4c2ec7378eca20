"""Attention backend selection: SDPA, flash-attn (mocked: present, absent, unsupported calls) and auto."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from torchtitan_hyena.models.common import attention, flash_attention
from torchtitan_hyena.models.common.attention import InnerAttention, resolve_attention_backend, sdpa_attention
from torchtitan_hyena.tools.logging import logger


def reference_attention(q, k, v, scale=None):
    """Plain softmax attention on (B, H, L, D), K/V heads repeated, causal mask aligned bottom-right."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    lq, lk = q.size(2), k.size(2)
    scores = (q.float() @ k.float().transpose(-1, -2)) * (scale if scale is not None else q.size(-1) ** -0.5)
    mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    return (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.float()).to(q.dtype)


def qkv(dtype=torch.float32, heads=8, kv_heads=2, length=32, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, length, dim, generator=g).to(dtype)
    k = torch.randn(2, kv_heads, length, dim, generator=g).to(dtype)
    v = torch.randn(2, kv_heads, length, dim, generator=g).to(dtype)
    return q, k, v


@pytest.fixture
def fresh(monkeypatch, caplog):
    """Reset the warn-once/log-once memory and let the package logger reach caplog."""
    monkeypatch.setattr(flash_attention, "_warned", set())
    monkeypatch.setattr(attention, "_logged", set())
    monkeypatch.setattr(logger, "propagate", True)
    caplog.set_level(logging.INFO, logger="torchtitan_hyena")
    return caplog


@pytest.fixture
def fake_flash(monkeypatch):
    """A flash_attn module whose flash_attn_func checks flash-attn's calling convention and records calls."""
    calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
        assert q.shape[0] == k.shape[0] and q.shape[-1] == k.shape[-1] and q.shape[2] % k.shape[2] == 0
        calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "scale": softmax_scale, "causal": causal})
        out = reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale)
        return out.transpose(1, 2)  # (B, L, H, D) like flash-attn

    module = types.ModuleType("flash_attn")
    module.flash_attn_func = flash_attn_func
    module.__version__ = "2.7.4-test"
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setattr(flash_attention, "GPU_DEVICE_TYPES", ("cuda", "cpu"))  # let CPU tensors stand in for GPU
    return calls


def test_sdpa_matches_reference_including_query_chunks():
    q, k, v = qkv()
    full = sdpa_attention(q, k, v)
    assert torch.allclose(full, reference_attention(q, k, v), atol=1e-5)
    # A context-parallel rank's query chunk against the keys up to its end: bottom-right causal alignment.
    for start, end in ((0, 8), (8, 24), (24, 32)):
        chunk = sdpa_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end])
        assert torch.allclose(chunk, full[:, :, start:end], atol=1e-5)


def test_flash_backend_passes_blhd_views_gqa_and_causal(fresh, fake_flash):
    fn = resolve_attention_backend("flash")
    assert fn is not sdpa_attention
    q, k, v = qkv(torch.bfloat16)
    out = fn(q, k, v, 0.3)
    assert torch.allclose(out.float(), sdpa_attention(q.float(), k.float(), v.float(), 0.3), atol=2e-2)
    # (B, L, H, D) layout, K/V heads not repeated (flash-attn groups them), causal, our scale
    assert fake_flash == [{"q": (2, 32, 8, 16), "k": (2, 32, 2, 16), "scale": 0.3, "causal": True}]
    chunk = fn(q[:, :, 24:], k, v, 0.3)  # CP-style local call: fewer queries than keys
    assert torch.allclose(chunk.float(), out[:, :, 24:].float(), atol=2e-2) and len(fake_flash) == 2
    assert "attention backend: flash (flash-attn 2.7.4-test" in fresh.text


@pytest.mark.parametrize(("dtype", "dim", "cause"), [(torch.float32, 16, "in torch.float32"),
                                                      (torch.bfloat16, 512, "head_dim 512 (at most 256)")])  # fmt: skip
def test_flash_backend_falls_back_to_sdpa_with_one_warning(fresh, fake_flash, dtype, dim, cause):
    fn = resolve_attention_backend("flash")
    q, k, v = qkv(dtype, dim=dim)
    for _ in range(3):
        out = fn(q, k, v)
    assert fake_flash == []
    assert torch.equal(out, sdpa_attention(q, k, v))
    warnings = [r.getMessage() for r in fresh.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and cause in warnings[0] and "using SDPA" in warnings[0]


def test_flash_backend_off_gpu_falls_back(fresh, fake_flash, monkeypatch):
    monkeypatch.setattr(flash_attention, "GPU_DEVICE_TYPES", ("cuda",))
    q, k, v = qkv(torch.bfloat16)
    resolve_attention_backend("flash")(q, k, v)
    assert fake_flash == [] and "flash-attn cannot run on cpu tensors" in fresh.text


def test_flash_requested_but_absent_uses_sdpa_with_one_warning(fresh, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn raises ImportError
    layers = [InnerAttention("flash") for _ in range(4)]
    assert all(layer.attention_fn is sdpa_attention for layer in layers)
    warnings = [r.getMessage() for r in fresh.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "flash_attn cannot be imported" in warnings[0] and "GPU_ARCHS=gfx90a" in warnings[0]
    infos = [r.getMessage() for r in fresh.records if r.getMessage().startswith("attention backend")]
    assert infos == ["attention backend: sdpa (model.attention_backend = flash)"]


@pytest.mark.parametrize(("gpu", "installed", "expected"), [(True, True, "flash"), (True, False, "sdpa"),
                                                           (False, True, "sdpa")])  # fmt: skip
def test_auto_picks_flash_only_on_a_gpu_with_flash_attn(fresh, fake_flash, monkeypatch, gpu, installed, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    if not installed:
        monkeypatch.setitem(sys.modules, "flash_attn", None)
    fn = resolve_attention_backend("auto")
    assert (fn is sdpa_attention) == (expected == "sdpa")
    assert f"attention backend: {expected}" in fresh.text and "(model.attention_backend = auto)" in fresh.text
    assert not [r for r in fresh.records if r.levelno == logging.WARNING]  # auto never warns
