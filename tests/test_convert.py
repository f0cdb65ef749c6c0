"""attnlab.convert swaps every attention of a timm or torchvision network for another registered one."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch

from attnlab import AttnlabError, capture_attention, convert, create_model
from attnlab.layers import CRAM
from attnlab.models.capture import AttentionWarning


def _mechanisms(model: torch.nn.Module, size: int = 32) -> Counter:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AttentionWarning)
        with torch.no_grad(), capture_attention(model.eval()) as record:
            model(torch.randn(2, model.in_chans, size, size))
    return Counter(s.mechanism for s in record.sites.values())


@pytest.mark.parametrize(
    "attention, expected",
    [
        ("eca", {"EcaModule": 16}),
        ("cbam", {"ChannelAttn": 16, "SpatialAttn": 16}),
        ("cram", {"CRAM": 16}),
        ("none", {}),
    ],
)
def test_efficientnet_se_swapped_for_each_registered_attention(attention, expected):
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", num_classes=4, in_chans=1)
    assert _mechanisms(model) == {"SqueezeExcite": 16}
    assert convert(model, attention=attention) is model
    assert _mechanisms(model) == expected
    logits = model.train()(torch.randn(2, 1, 32, 32))
    logits.sum().backward()  # the swapped network trains
    assert logits.shape == (2, 4)


def test_swapped_attention_gets_the_channels_the_old_one_saw():
    model = create_model("torchvision:mobilenet_v3_small", num_classes=3)
    channels = [m.fc1.in_channels for m in model.modules() if type(m).__name__ == "SqueezeExcitation"]
    convert(model, attention="cram", attn_kwargs={"score": "conv"})  # a C→1 score conv: its C is visible
    crams = [m for m in model.modules() if isinstance(m, CRAM)]
    assert [m.score.in_channels for m in crams] == channels and len(channels) == 9
    assert _mechanisms(model) == {"CRAM": 9}


def test_cbam_is_swapped_whole_and_coordinate_attention_once():
    model = create_model("cbam_resnet20")
    convert(model, attention="se")
    assert _mechanisms(model) == {"SEModule": 9}
    coord = create_model("resnet10t", num_classes=2, block_args={"attn_layer": "coord"})
    convert(coord, attention="eca")
    assert _mechanisms(coord) == {"EcaModule": 4}


@pytest.mark.parametrize(
    "build, kwargs, message",
    [
        (lambda: create_model("resnet10t"), {"attention": "eca"}, "convert: ResNet has no attention to swap"),
        (lambda: create_model("seresnet18"), {"attention": "ecca"}, "unknown attention 'ecca'; did you mean eca"),
    ],
)
def test_convert_refuses_in_one_line(build, kwargs, message):
    with pytest.raises(AttnlabError, match=message):
        convert(build(), **kwargs)


def test_training_hooks_find_the_mechanisms_put_in_by_convert():
    from attnlab.layers import training_hooks

    model = create_model("torchvision:mobilenet_v3_small", num_classes=3)
    assert training_hooks(model, {}) == []
    convert(model, attention="cram")
    assert len(training_hooks(model, {"cram": {"equivariance": 0.1}})) == 1
