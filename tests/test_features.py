"""Backbone feature extraction through timm's own machinery (``features_only``, ``out_indices``, ``feature_cfg``,
``feature_cls``) on every prefix, CIFAR-style and ImageNet-style: `feature_info` says what the forward returns."""

from __future__ import annotations

import pytest
import timm
import torch

from attnlab.models import VARIANTS

# every prefix on a CIFAR-style net; the ImageNet-style nets on one basic-block and one bottleneck depth
NAMES = [f"{v}_resnet20" if v else "resnet20" for v in VARIANTS] + ["resnet18c"]
NAMES += [f"{v}_resnet18" for v in VARIANTS if v] + ["aw_se_resnet50", "fmm_resnet50"]


def _check(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = model(x)
    out = list(out.values()) if isinstance(out, dict) else out
    info = model.feature_info
    assert [o.shape[1] for o in out] == info.channels()
    assert [(o.shape[2], o.shape[3]) for o in out] == [
        (-(-x.shape[2] // r), -(-x.shape[3] // r)) for r in info.reduction()
    ]  # "same" padding: ceil
    return out


@pytest.mark.parametrize("name", NAMES)
def test_features_only_every_level_matches_feature_info(name):
    torch.manual_seed(0)
    model = timm.create_model(name, features_only=True).eval()
    stages = 3 if "resnet20" in name else 4
    assert len(model.feature_info) == stages + 1  # the stem and every stage
    x = torch.randn(2, 3, 32, 32)
    full = _check(model, x)
    # out_indices picks levels; the same tensors as the full extractor's (same weights under the same seed)
    torch.manual_seed(0)
    picked = timm.create_model(name, features_only=True, out_indices=(1, stages)).eval()
    assert picked.feature_info.channels() == [model.feature_info.channels()[i] for i in (1, stages)]
    for a, b in zip(_check(picked, x), (full[1], full[stages])):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["se_resnet20", "aw_resnet18", "cram_resnet18c"])
@pytest.mark.parametrize(
    "options", [{"feature_cfg": {"out_indices": (2,)}}, {"feature_cls": "hook"}, {"feature_cls": "dict"}]
)
def test_features_only_takes_timms_feature_options(name, options):
    model = timm.create_model(name, features_only=True, **options).eval()
    out = _check(model, torch.randn(1, 3, 40, 24))
    assert len(out) == (1 if "feature_cfg" in options else len(model.feature_info))


@pytest.mark.parametrize("name", ["fmm_resnet20", "cram_resnet18c", "aw_se_resnet18"])
def test_forward_intermediates_gives_the_feature_extractors_maps_and_forward_features(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    torch.manual_seed(0)
    listed = timm.create_model(name, features_only=True).eval()
    torch.manual_seed(0)
    getter = timm.create_model(name, features_only=True, feature_cls="getter").eval()
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        for a, b, c in zip(maps, listed(x), _check(getter, x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            torch.testing.assert_close(a, c, rtol=0, atol=0)
        last = len(maps) - 1
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], maps[1], rtol=0, atol=0)
        model.prune_intermediate_layers([last - 1])
        torch.testing.assert_close(model.forward_features(x), maps[last - 1], rtol=0, atol=0)


def test_features_only_keeps_attention_placement():
    model = timm.create_model("se_resnet20", features_only=True, attn_where="last")
    assert [blk.se is not None for blk in model.layer2] == [False, False, True]
