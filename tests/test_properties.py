"""Property-based checks of every attention layer, merge and AW convolution over wide input spaces (hypothesis):
channels 1…512, sizes 1…64 (odd included), batch 1, stride, fp32 and bf16 on CPU — outputs finite with the right
shape, eval mode deterministic, gradients finite."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from attnlab.layers import AWConv2d, create_attn, create_merge, list_attn, list_merges

channels = st.integers(1, 512)
sizes = st.integers(1, 64)
batches = st.integers(1, 3)
dtypes = st.sampled_from([torch.float32, torch.bfloat16])


def _small_enough(c: int, h: int, w: int, b: int) -> bool:
    return c * h * w * b <= 1 << 20  # keep each example cheap (≤ 1M values)


def _train_ok(b: int, h: int, w: int) -> bool:
    """BatchNorm in training mode needs more than one value per channel."""
    return b * h * w > 1


def _forward(module: torch.nn.Module, dtype: torch.dtype, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        return module(*inputs)


def _assert_finite_grads(module: torch.nn.Module, *inputs: torch.Tensor) -> None:
    for t in inputs:
        assert t.grad is not None and torch.isfinite(t.grad).all()
    for name, p in module.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("name", list_attn())
@settings(max_examples=12)
@given(c=channels, h=sizes, w=sizes, b=batches, dtype=dtypes)
def test_attention_layers(name, c, h, w, b, dtype):
    assume(_small_enough(c, h, w, b))
    torch.manual_seed(0)
    module = create_attn(name, c)
    x = torch.randn(b, c, h, w, requires_grad=True)
    if _train_ok(b, h, w):
        out = _forward(module.train(), dtype, x)
        assert out.shape == x.shape and torch.isfinite(out.float()).all()
        out.float().square().mean().backward()
        _assert_finite_grads(module, x)
    module.eval()
    with torch.no_grad():
        first, second = _forward(module, dtype, x), _forward(module, dtype, x)
    assert first.shape == x.shape and torch.isfinite(first.float()).all()
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", list_merges())
@settings(max_examples=12)
@given(c=channels, h=sizes, w=sizes, b=batches, dtype=dtypes)
def test_merges(name, c, h, w, b, dtype):
    assume(_small_enough(c, h, w, b))
    torch.manual_seed(0)
    merge = create_merge(name, c)
    f = torch.randn(b, c, h, w, requires_grad=True)
    s = torch.randn(b, c, h, w).relu().requires_grad_()  # shortcuts are post-ReLU activations
    if _train_ok(b, h, w):
        out = _forward(merge.train(), dtype, f, s)
        assert out.shape == f.shape and torch.isfinite(out.float()).all()
        out.float().square().mean().backward()
        _assert_finite_grads(merge, f, s)
    merge.eval()
    with torch.no_grad():
        first, second = _forward(merge, dtype, f, s), _forward(merge, dtype, f, s)
    assert torch.isfinite(first.float()).all() and torch.equal(first, second)


@settings(max_examples=20)
@given(
    cin=st.integers(1, 64),
    cout=st.integers(1, 64),
    h=st.integers(1, 33),
    w=st.integers(1, 33),
    b=batches,
    k=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    dtype=dtypes,
)
def test_aw_convolution(cin, cout, h, w, b, k, stride, dtype):
    torch.manual_seed(0)
    conv = AWConv2d(cin, cout, k, stride=stride, padding=k // 2)
    x = torch.randn(b, cin, h, w, requires_grad=True)
    out = _forward(conv, dtype, x)
    expected = ((h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1)
    assert out.shape == (b, cout, *expected) and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    _assert_finite_grads(conv, x)
    conv.eval()
    with torch.no_grad():
        assert torch.equal(_forward(conv, dtype, x), _forward(conv, dtype, x))
