"""Every registered model: shapes at odd sizes, gradients to every parameter, timm interop, attention capture."""

from __future__ import annotations

import pytest
import timm
import torch

import attnlab
from attnlab import AttnlabError, capture_attention, create_model, list_models
from attnlab.models import ARCHS, VARIANTS

SIZES = [(1, 28, 28), (3, 32, 32), (3, 37, 29)]
ODD_SIZES = [(1, 28, 28), (3, 37, 29)]
"""The wider architectures (resnet18c, resnet18, resnet50) train at the odd sizes only: 32 × 32 halves evenly at every
stage, and every prefix trains at it on resnet20 here (and at 32 or 64 px in timm's ``test_model_backward``)."""


def _check_train_step(model: torch.nn.Module, shape: tuple[int, int, int], num_classes: int) -> None:
    model.zero_grad(set_to_none=True)
    x = torch.randn(2, *shape)
    out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"


DEEPER = {
    "resnet32": "resnet20",
    "resnet56": "resnet20",
    "resnet110": "resnet20",
    "resnet34": "resnet18",
    "resnet101": "resnet50",
}
"""Depths that repeat the blocks of a shallower one (same block, stages and widths, more blocks per stage)."""


def _arch(name: str) -> str:
    return name.rsplit("_", 1)[-1]


@pytest.mark.parametrize("name", [n for n in list_models() if _arch(n) not in DEEPER])
def test_forward_backward_every_model_at_every_size(name):
    torch.manual_seed(0)
    sizes = SIZES if _arch(name) == "resnet20" else ODD_SIZES
    for chans in sorted({c for c, _, _ in sizes}):
        model = create_model(name, num_classes=7, in_chans=chans)
        for shape in (s for s in sizes if s[0] == chans):
            _check_train_step(model, shape, 7)


@pytest.mark.parametrize("name", [n for n in list_models() if _arch(n) in DEEPER])
def test_a_deeper_model_is_its_shallower_twin_with_more_blocks(name):
    """The forward and backward of these blocks is tested on the shallower twin above; here the deeper network has
    the twin's modules with the block counts of its architecture, and runs."""
    arch = _arch(name)
    deep = create_model(name, num_classes=7)
    twin = create_model(name.replace(arch, DEEPER[arch]), num_classes=7, device="meta")  # its modules, not its init
    stages = [n for n, _ in twin.named_children() if n.startswith("layer")]
    assert [len(getattr(deep, n)) for n in stages] == list(ARCHS[arch].layers)
    assert {type(m) for m in deep.modules()} == {type(m) for m in twin.modules()}
    with torch.no_grad():
        assert deep.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_names_cover_every_variant_and_arch_without_clashing_with_timm():
    names = set(list_models())
    assert {"resnet20", "resnet32", "resnet56", "resnet110", "resnet18c"} <= names
    for prefix in ("se", "eca", "cbam", "spatial", "cram", "aw", "fmm", "aw_se", "aw_cbam"):
        assert f"{prefix}_resnet20" in names and f"{prefix}_resnet50" in names
    # plain ImageNet depths stay timm's own
    assert not {"resnet18", "resnet34", "resnet50", "resnet101"} & names
    assert len(names) == len(VARIANTS) * len(ARCHS) - sum(a.imagenet for a in ARCHS.values())


@pytest.mark.parametrize("name", ["resnet20", "cram_resnet20", "aw_se_resnet20", "fmm_resnet18c", "eca_resnet18"])
def test_timm_create_model_builds_the_same_network(name):
    torch.manual_seed(0)
    ours = create_model(name, num_classes=5, in_chans=1)
    torch.manual_seed(0)
    theirs = timm.create_model(name, num_classes=5, in_chans=1)
    assert type(ours) is type(theirs)
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert theirs.pretrained_cfg["classifier"] == "fc"
    assert name in timm.list_models()


def test_timm_features_only_and_reset_classifier():
    feats = timm.create_model("se_resnet20", features_only=True)
    shapes = [f.shape for f in feats(torch.randn(2, 3, 32, 32))]
    assert shapes == [(2, 16, 32, 32), (2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]
    model = create_model("resnet20")
    model.reset_classifier(3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_cifar_resnet_depths_and_widths():
    def convs(m):
        return sum(isinstance(x, torch.nn.Conv2d) and x.kernel_size == (3, 3) for x in m.modules())

    for depth in (20, 32, 56, 110):
        model = create_model(f"resnet{depth}")
        assert convs(model) + 1 == depth  # 3×3 convs + the classifier = 6n + 2 weighted layers
    assert [s[-1].conv2.out_channels for s in (create_model("resnet18c").layer1, create_model("resnet18c").layer4)] == [
        64,
        512,
    ]


def test_attention_sits_after_last_bn_before_merge_and_placement_option():
    model = create_model("spatial_resnet20", attn_where="last")
    with_attn = [(s, b) for s in (1, 2, 3) for b, blk in enumerate(getattr(model, f"layer{s}")) if blk.se is not None]
    assert with_attn == [(1, 2), (2, 2), (3, 2)]
    model = create_model("se_resnet20", attn_where="2,3")
    assert all(blk.se is None for blk in model.layer1) and all(blk.se is not None for blk in model.layer3)
    # the attention sees the output of bn2: hook both and compare
    block = model.layer3[0]
    seen = {}
    block.bn2.register_forward_hook(lambda m, i, o: seen.__setitem__("bn2", o))
    block.se.register_forward_hook(lambda m, i, o: seen.__setitem__("se_in", i[0]))
    model(torch.randn(2, 3, 32, 32))
    assert seen["se_in"] is seen["bn2"]


def test_capture_attention_sees_every_gate_and_does_not_change_outputs():
    torch.manual_seed(0)
    model = create_model("cbam_resnet20").eval()
    x = torch.randn(3, 3, 32, 32)
    plain = model(x)
    with capture_attention(model) as record:
        observed = model(x)
    assert torch.equal(plain, observed)
    assert len(record) == 18 and set(record.kinds.values()) == {"channel", "spatial"}
    assert record["layer2.0.se.channel"].shape == (3, 32, 1, 1)
    assert record["layer3.2.se.spatial"].shape == (3, 1, 8, 8)
    assert all(((v >= 0) & (v <= 1)).all() for v in record.values())
    # hooks are gone afterwards
    model(x)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", ["eca_resnet20", "spatial_resnet20", "se_resnet50"])
def test_capture_attention_channel_gates_have_channel_shape(name):
    model = timm.create_model(name, num_classes=10).eval()
    with capture_attention(model) as record:
        model(torch.randn(2, 3, 32, 32))
    assert record and all(v.shape[0] == 2 for v in record.values())
    for path, kind in record.kinds.items():
        assert record[path].ndim == 4 and (record[path].shape[1] == 1) == (kind == "spatial")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: create_model("se_resnet21"), "unknown model 'se_resnet21'; did you mean"),
        (lambda: create_model("resnet20", attn_layer="sex"), "unknown attention 'sex'; did you mean se"),
        (lambda: create_model("resnet20", merge="mull"), "unknown merge 'mull'"),
        (lambda: create_model("resnet20", attn_where="first"), "attn_where must be"),
        (lambda: create_model("resnet20", attn_where="4"), "stage 4 does not exist"),
        (lambda: create_model("resnet20", pretrained=True), "no pretrained weights"),
        (lambda: create_model("resnet20")(torch.randn(1, 3, 7, 9)), "too small"),
        (lambda: create_model("resnet20")(torch.randn(1, 1, 32, 32)), "expects 3 input channels, got 1"),
        (lambda: create_model("resnet20")(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), "floating point"),
        (lambda: create_model("resnet20")(torch.randn(3, 32, 32)), "B×C×H×W"),
        (lambda: attnlab.create_attn("cbma", 16), "did you mean cbam"),
        (
            lambda: create_model("resnet20", zero_init_lst=False),
            "unknown resnet20 option 'zero_init_lst'; did you mean",
        ),
        (lambda: timm.create_model("fmm_resnet20", stem_type="deep"), "unknown fmm_resnet20 option 'stem_type'"),
        (lambda: timm.create_model("aw_resnet18", foo=1), "unknown aw_resnet18 option 'foo'"),
    ],
)
def test_bad_model_input_gives_one_clear_line(build, message):
    with pytest.raises(AttnlabError, match=message) as info:
        build()
    assert "\n" not in str(info.value)
