"""attnlab.convert swaps every attention of a timm or torchvision network for another registered one."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from timm.layers import Conv2dSame

from attnlab import AttnlabError, capture_attention, convert, create_model
from attnlab.layers import CRAM, AWConv2d
from attnlab.layers.merge import MERGES, FixedBiasBatchNorm2d
from attnlab.models.capture import AttentionWarning
from attnlab.models.insert import Blended


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


# --- insert, AW, merge: what a converted network computes at initialisation -------------------------------------------


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Every norm's affine and running statistics, and every layer scale, drawn away from their defaults (a
    zero-initialised last BN would make any insertion after it trivially the identity), as a trained network's are."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.LayerNorm | torch.nn.GroupNorm) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                if getattr(m, "running_var", None) is not None:
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        for path, p in model.named_parameters():  # ConvNeXt's layer scales start at 1e-6, trained ones do not
            if path.rpartition(".")[2] in ("gamma", "layer_scale"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def _original_and_copy(name: str, tmp_path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A network with trained-like weights, and a second one loaded from those weights saved to a file."""
    torch.manual_seed(0)
    original = _trained_like(create_model(name, num_classes=5)).eval()
    torch.save(original.state_dict(), tmp_path / "weights.pth")
    copy = create_model(name, num_classes=5)
    copy.load_state_dict(torch.load(tmp_path / "weights.pth", weights_only=True))
    return original, copy.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))


def _shift(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((after - before).norm() / before.norm())


@pytest.mark.parametrize(
    "name, attention, sites",
    [
        ("resnet18", "se", {"SEModule": 8}),
        ("torchvision:resnet18", "cbam", {"ChannelAttn": 8, "SpatialAttn": 8}),
        ("regnetx_002", "eca", {"EcaModule": 13}),
        ("torchvision:regnet_x_400mf", "cram", {"CRAM": 22}),
        ("mobilenetv2_050", "se", {"SEModule": 17}),
        ("torchvision:mobilenet_v2", "spatial", {"SpatialAttention": 17}),
        ("convnext_atto", "cbam", {"ChannelAttn": 12, "SpatialAttn": 12}),
        ("torchvision:convnext_tiny", "se", {"SEModule": 18}),
        ("gernet_s", "aw", {"AWConv2d": 14}),
    ],
)
def test_inserted_attention_starts_as_the_identity(name, attention, sites, tmp_path):
    original, model = _original_and_copy(name, tmp_path)
    convert(model, insert=attention)
    assert torch.equal(_logits(model), _logits(original))  # x + 0·(attn(x) − x) is x exactly
    assert _mechanisms(model) == sites  # one attention per block, seen by capture_attention
    blended = [m for m in model.modules() if isinstance(m, Blended)]
    if "convnext" in name:  # the attention runs before the stochastic depth, as in timm's ResNet
        ends = [getattr(b, a, None) for b in model.modules() for a in ("drop_path", "stochastic_depth")]
        ends = [e for e in ends if isinstance(e, torch.nn.Sequential)]
        assert len(ends) == len(blended) and all(isinstance(e[0], Blended) for e in ends)
    assert len(blended) == (0 if attention == "aw" else sum(sites.values()) // len(sites))
    logits = model.train()(torch.randn(2, 3, 32, 32))
    logits.sum().backward()
    assert all(b.blend.grad is not None and b.blend.grad.abs() > 0 for b in blended)  # g learns from the first step
    with torch.no_grad():
        for b in blended:
            b.blend.fill_(1.0)
    if blended:  # the attention is on the path: fully blended in, it changes the logits
        assert not torch.allclose(_logits(model), _logits(original))


@pytest.mark.parametrize(
    "name, blocks",
    [("mobilenetv3_small_050", 11), ("torchvision:mobilenet_v3_small", 11), ("torchvision:efficientnet_b0", 16)],
)
def test_insert_after_removing_a_networks_own_attention(name, blocks):
    torch.manual_seed(0)
    model = _trained_like(create_model(name, num_classes=5))
    convert(model, attention="none")
    before = _logits(model)
    convert(model, insert="eca")
    assert torch.equal(_logits(model), before)
    assert _mechanisms(model) == {"EcaModule": blocks}  # every block, also those that had no SE


class UserBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, x):
        return x + self.bn(self.conv(x))


@pytest.mark.parametrize(
    "build, kwargs, message",
    [
        (
            lambda: create_model("seresnet18"),
            {"insert": "eca"},
            r"convert\(insert='eca'\): ResNet already has attention \(layer1.0.se: SEModule\); swap it with "
            r"attention=NAME, or remove it first with attention='none'",
        ),
        (
            lambda: create_model("torchvision:mobilenet_v3_small"),
            {"insert": "se"},
            r"already has attention \(features.1.block.1: SqueezeExcitation\)",
        ),
        (
            lambda: torch.nn.Sequential(UserBlock(), torch.nn.Flatten()),
            {"insert": "se"},
            r"convert\(insert='se'\): 0 is a test_convert.UserBlock, a block class convert does not know; known: ",
        ),
        (
            lambda: create_model("botnet26t_256"),
            {"insert": "eca"},
            r"stages.2.1 is a timm.models.byobnet.SelfAttnBlock, a block class convert does not know",
        ),
        (
            lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.BatchNorm2d(3)),
            {"insert": "se"},
            r"convert\(insert='se'\): Sequential has no residual block of a family convert knows",
        ),
        (lambda: create_model("resnet18"), {"insert": "none"}, r"nothing to insert; to remove attention, swap it"),
        (lambda: create_model("resnet18"), {}, r"convert: say what to convert: attention=, insert=, aw= or merge="),
    ],
)
def test_insert_refuses_in_one_line(build, kwargs, message):
    with pytest.raises(AttnlabError, match=message):
        convert(build(), **kwargs)


@pytest.mark.parametrize(
    "name, aw, converted",
    [
        ("resnet18", "3x3", 16),  # every dense 3×3 (the stem is 7×7): 2 per block, 8 blocks
        ("torchvision:resnet18", "layer4.*", 5),  # a glob over paths: layer4's two blocks' convs and downsample
        ("mobilenetv2_050", lambda path, conv: conv.kernel_size == (1, 1) and path.endswith("conv_pwl"), 16),
    ],
)
def test_aw_convolution_keeps_the_trained_weights_and_starts_as_the_identity(name, aw, converted, tmp_path):
    original, model = _original_and_copy(name, tmp_path)
    convert(model, aw=aw)
    assert sum(isinstance(m, AWConv2d) for m in model.modules()) == converted
    torch.testing.assert_close(_logits(model), _logits(original), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "build, kwargs, message",
    [
        (lambda: create_model("resnet18"), {"aw": "5x5"}, r"convert\(aw='5x5'\): selects none of ResNet's 20"),
        (
            lambda: create_model("resnet18"),
            {"aw": "3x3", "aw_kwargs": {"gate": "sigmoid"}},
            r"gate 'sigmoid' starts at 0.5 and would halve every converted convolution",
        ),
        (
            lambda: torch.nn.Sequential(Conv2dSame(3, 3, 3)),
            {"aw": "3x3"},
            r"0 is a Conv2dSame \(a Conv2d with its own forward\); AW-convolution replaces plain nn.Conv2d only",
        ),
    ],
)
def test_aw_refuses_in_one_line(build, kwargs, message):
    with pytest.raises(AttnlabError, match=message):
        convert(build(), **kwargs)


MERGE_SHIFTS: dict[tuple[str, str], float] = {}


@pytest.mark.parametrize(
    "name, merge",
    [(name, merge) for name in ("resnet18", "torchvision:resnet18") for merge in sorted(MERGES)]
    + [("resnet26", "gate_shortcut"), ("torchvision:resnet50", "gate")],  # bottlenecks
)
def test_merges_replace_the_residual_addition_and_move_the_logits(name, merge, tmp_path):
    original, model = _original_and_copy(name, tmp_path)
    keys = set(model.state_dict())
    convert(model, merge=merge)
    assert keys <= set(model.state_dict())  # every trained weight keeps its key
    merges = [m for m in model.modules() if isinstance(m, tuple(MERGES.values()))]
    assert len(merges) == {"resnet26": 8, "torchvision:resnet50": 16}.get(name, 8) and all(
        isinstance(m, MERGES[merge]) for m in merges
    )
    shift = _shift(_logits(original), _logits(model))
    MERGE_SHIFTS[name, merge] = shift  # docs/guides/your-network.md quotes these (pytest -s prints them)
    print(f"merge shift {name} {merge}: {shift:.3f}")
    if merge == "add":
        assert shift < 1e-6
    else:  # a product of the trained branches is another function: measured, not zero (docs say so)
        assert shift > 0.05
    model.train()(torch.randn(2, 3, 32, 32)).sum().backward()


@pytest.mark.parametrize(
    "build, kwargs, message",
    [
        (
            lambda: create_model("resnet18", drop_path_rate=0.1),
            {"merge": "mul"},
            r"layer1.1 has stochastic depth, which zeroes F; for merge 'mul' that zeroes the whole block",
        ),
        (lambda: create_model("resnet18"), {"merge": "product"}, r"unknown merge 'product'"),
    ],
)
def test_merge_refuses_in_one_line(build, kwargs, message):
    with pytest.raises(AttnlabError, match=message):
        convert(build(), **kwargs)


def test_a_merge_that_fixes_the_residual_bias_fixes_it_on_the_blocks_last_bn():
    model = convert(create_model("torchvision:resnet18"), merge="gate_shortcut", merge_kwargs={"residual_bias": 1.0})
    last = model.layer1[0].bn2
    assert isinstance(last, FixedBiasBatchNorm2d) and torch.equal(last.bias, torch.ones(64))


@pytest.mark.parametrize(
    "name, attention", [("efficientnet_b0", "eca"), ("efficientnet_b0", "cbam"), ("seresnet18", "cram")]
)
def test_a_swap_moves_the_logits_by_a_measured_amount(name, attention, tmp_path):
    original, model = _original_and_copy(name, tmp_path)
    convert(model, attention=attention)
    shift = _shift(_logits(original), _logits(model))
    print(f"swap shift {name} → {attention}: {shift:.3f}")  # docs/guides/your-network.md quotes these
    assert shift > 1e-3  # a swap cannot be the identity: the new attention has its own initialisation


def test_modes_compose_in_either_order_and_the_hooks_find_what_they_put_in(tmp_path):
    original, model = _original_and_copy("torchvision:resnet18", tmp_path)
    convert(model, merge="gate_shortcut", merge_kwargs={"residual_bias": 1.0})
    merged = _logits(model)
    convert(model, insert="cram", aw="layer4.*")  # into blocks already merged, around a BN already fixed
    torch.testing.assert_close(_logits(model), merged, rtol=1e-5, atol=1e-5)
    assert isinstance(model.layer1[0].bn2[0], FixedBiasBatchNorm2d) and _mechanisms(model)["CRAM"] == 8

    from attnlab.layers import training_hooks

    assert len(training_hooks(model, {"cram": {"equivariance": 0.1}, "aw": {}})) == 2

    one_call = convert(_original_and_copy("torchvision:resnet18", tmp_path)[1], insert="cram", merge="gate_shortcut")
    assert isinstance(one_call.layer1[0].bn2, torch.nn.Sequential) and _mechanisms(one_call)["CRAM"] == 8
