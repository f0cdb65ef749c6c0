"""The layer registry builds in place, as timm's layers do: every attention, merge and block takes ``device``/``dtype``,
builds on the ``meta`` device without allocating anything elsewhere, and honours the dtype."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from attnlab.errors import AttnlabError
from attnlab.layers import create_attn, create_merge, list_attn, list_merges
from attnlab.layers.merge import FixedBiasBatchNorm2d
from attnlab.models.resnet import BasicBlock, Bottleneck

ATTENTIONS = [(name, {}) for name in list_attn()] + [
    ("cram", {"predictor": "regress"}),
    ("cram", {"score": "pool"}),
    ("aw", {"generator": "factorized", "depthwise": False}),
]
MERGES = [(name, {}) for name in list_merges()] + [
    ("mul_bn", {"bn_residual": True, "residual_bias": 1.0, "shortcut_bias": 1.0}),
    ("gate", {"bn_shortcut": True}),
]


class NothingOffMeta(TorchFunctionMode):
    """Records every torch call whose result lands on a device other than ``meta`` (an allocation there)."""

    def __init__(self):
        super().__init__()
        self.allocated: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.allocated.append(f"{getattr(func, '__name__', func)} on {t.device}")
        return out


def tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def build_on_meta(build) -> nn.Module:
    with NothingOffMeta() as watch:
        module = build()
    assert watch.allocated == []
    assert all(t.is_meta for t in tensors(module))
    return module


def test_the_watch_sees_an_allocation():
    with NothingOffMeta() as watch:
        nn.Linear(2, 2)
    assert watch.allocated


@pytest.mark.parametrize(("name", "kwargs"), ATTENTIONS, ids=str)
def test_every_attention_builds_on_meta_and_in_the_dtype(name, kwargs):
    build_on_meta(lambda: create_attn(name, 16, device="meta", **kwargs))
    module = create_attn(name, 16, dtype=torch.float64, **kwargs)
    assert all(t.dtype == torch.float64 for t in tensors(module) if t.is_floating_point())
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    assert module.eval()(x).dtype == torch.float64


@pytest.mark.parametrize(("name", "kwargs"), MERGES, ids=str)
def test_every_merge_builds_on_meta_and_in_the_dtype(name, kwargs):
    build_on_meta(lambda: create_merge(name, 8, device="meta", **kwargs))
    merge = create_merge(name, 8, dtype=torch.float64, **kwargs)
    assert all(t.dtype == torch.float64 for t in tensors(merge) if t.is_floating_point())
    f, s = torch.randn(2, 8, 4, 4, dtype=torch.float64), torch.randn(2, 8, 4, 4, dtype=torch.float64)
    assert merge.eval()(f, s).dtype == torch.float64


def test_fixed_bias_batchnorm_from_bn_stays_on_its_device_and_dtype():
    bn = nn.BatchNorm2d(4, device="meta", dtype=torch.float64)
    fixed = build_on_meta(lambda: FixedBiasBatchNorm2d.from_bn(bn, 1.0))
    assert all(t.dtype == torch.float64 for t in tensors(fixed) if t.is_floating_point())
    plain = FixedBiasBatchNorm2d.from_bn(nn.BatchNorm2d(4).requires_grad_(False), 1.0)
    assert plain.bias.tolist() == [1.0] * 4 and "bias" not in dict(plain.named_parameters())


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_blocks_pass_device_and_dtype_to_everything_they_build(block):
    options = dict(
        merge="mul_bn",
        merge_args={"residual_bias": 1.0, "shortcut_bias": 1.0},
        aw={"generator": "factorized"},
        attn_layer=functools.partial(create_attn, "cram"),
    )
    build_on_meta(lambda: block(16, 16 // block.expansion, device="meta", **options))
    built = block(16, 16 // block.expansion, dtype=torch.float64, **options)
    assert all(t.dtype == torch.float64 for t in tensors(built) if t.is_floating_point())


def test_spatial_attention_refuses_an_even_kernel_like_its_siblings():
    with pytest.raises(AttnlabError) as e:
        create_attn("spatial", 8, kernel_size=4)
    assert str(e.value) == "spatial attention kernel_size must be odd and positive, got 4"


def test_device_and_dtype_are_not_options():
    """They say where a layer is built (its builder passes them), so an option check does not offer them."""
    with pytest.raises(AttnlabError) as e:
        create_merge("add", 8, offset=1)
    assert str(e.value) == "merge 'add': unknown option 'offset'; known: none"
    with pytest.raises(AttnlabError, match="unknown option 'devic'; known: kernel_size"):
        create_attn("spatial", 8, devic="meta")
