"""Converted non-ResNet networks through the rest of the library: the smoothness, landscape and localisation analyses,
a detection backbone, torch.export and torch.compile, each at the smallest settings it takes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_convert import _trained_like
from test_convert_merge import _timm_efficientnet
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet

from attnlab import capture_attention, convert, create_model
from attnlab.analysis.landscape import landscape
from attnlab.analysis.localization import localization
from attnlab.analysis.smoothness import smoothness
from attnlab.detection.backbone import backbone
from attnlab.layers.merge import GateMerge
from attnlab.models.insert import Blended
from attnlab.train.compiling import compile_module, is_compiled


def _objects(n: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` dark 3-channel images with one bright rectangle each, and its box (x0, y0, x1, y1)."""
    g = torch.Generator().manual_seed(0)
    images = 0.1 * torch.randn(n, 3, size, size, generator=g)
    x0, y0 = torch.randint(2, 12, (n,), generator=g), torch.randint(2, 12, (n,), generator=g)
    w, h = torch.randint(8, 18, (n,), generator=g), torch.randint(8, 18, (n,), generator=g)
    for i in range(n):  # building the test images
        images[i, :, y0[i] : y0[i] + h[i], x0[i] : x0[i] + w[i]] += 1.0
    return images, torch.stack([x0, y0, x0 + w, y0 + h], 1).float()


def _finite(value) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


@pytest.mark.parametrize(
    "build, spatial",
    [
        (lambda: convert(_timm_efficientnet(), attention="cram", image_size=32), {"rectangle": 2}),  # EfficientNet
        (lambda: create_model("mobilenetv3_small_050", num_classes=5, attention="cbam"), {"spatial": 9}),  # MNv3
    ],
)
def test_smoothness_landscape_and_localisation_on_a_converted_network(build, spatial):
    torch.manual_seed(0)
    model = _trained_like(build()).eval()
    images, boxes = _objects()
    labels = torch.arange(4) % 2

    located = localization(model, images, boxes, transforms=("hflip",))
    assert {k: sum(layer["kind"] == k for layer in located["layers"]) for k in spatial} == spatial
    assert len(located["layers"]) == sum(spatial.values())
    assert all(0 <= layer["iou_map"]["mean"] <= 1 for layer in located["layers"])
    for layer in located["layers"]:  # a 1×1 map has no position to move: no equivariance error
        assert math.isfinite(layer["equivariance_error_mean"]) == (layer["map_size"] != [1, 1])

    smooth = smoothness(model, images, labels, pairs=2, steps=3, sigmas=(0.1,), draws=1, jacobian_images=2)
    assert _finite(smooth) and smooth["jacobian_fro"]["mean"] > 0 and smooth["input_grad_norm"]["mean"] > 0

    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(points=3, grid=2, surface_images=4, hessian_images=4, hessian_iters=2, trace_samples=1, batch_size=4)
    land = landscape(model, images, labels, **kw)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights left as they were
    assert len(land["surface_1d"]["loss"]) == 3 and _finite(land["surface_1d"]) and math.isfinite(land["loss"])


@pytest.mark.parametrize(
    "name, conversion, sites",
    [
        ("resnet10t", {"insert": "cbam", "merge": "gate"}, {"ChannelAttn": 4, "SpatialAttn": 4}),  # timm ResNet
        ("mobilenetv3_small_050", {"attention": "cram", "merge": "gate"}, {"CRAM": 9}),
    ],
)
def test_a_converted_network_is_a_detection_backbone(name, conversion, sites):
    torch.manual_seed(0)
    fpn = backbone(name, in_chans=1, out_channels=8, **conversion)
    assert any(isinstance(m, GateMerge) for m in fpn.body.modules())
    with capture_attention(fpn.eval()) as record:
        levels = fpn(torch.randn(2, 1, 64, 64))
    found: dict[str, int] = {}
    for site in record.sites.values():
        found[site.mechanism] = found.get(site.mechanism, 0) + 1
    assert found == sites and all(site.path.startswith("body.") for site in record.sites.values())
    assert [64 // v.shape[-1] for k, v in levels.items() if k != "pool"] == [f["reduction"] for f in fpn.feature_info]
    sum(v.sum() for v in fpn.train()(torch.randn(2, 1, 64, 64)).values()).backward()
    assert all(p.grad is not None for p in fpn.parameters() if p.requires_grad)


def _tiny_converted(**conversion) -> torch.nn.Module:
    """A two-stage EfficientNet (depthwise-separable, inverted residuals with SE), converted, weights trained-like."""
    arch = decode_arch_def([["ds_r1_k3_s1_c8"], ["ir_r2_k3_s1_e2_c8_se0.25"]])
    model = EfficientNet(arch, num_features=16, stem_size=8, num_classes=3)
    convert(model, **conversion, image_size=16)
    with torch.no_grad():
        for blended in (m for m in model.modules() if isinstance(m, Blended)):
            blended.blend.fill_(0.5)  # an inserted attention half blended in, so that it acts on the outputs
    return _trained_like(model).eval()


def test_torch_export_of_a_converted_network_gives_the_eager_outputs():
    model = _tiny_converted(attention="none", insert="cram", aw="3x3", merge="gate")  # every mode of convert
    g = torch.Generator().manual_seed(1)
    example, other = torch.randn(2, 3, 16, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}}).module()
    with torch.no_grad():
        for x in (example, other):
            torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # inductor compiles on the CPU: tens of seconds on 2 busy cores
def test_compiled_converted_network_matches_eager_and_keeps_its_keys():
    eager = _tiny_converted(attention="none", insert="eca", merge="gate").train()  # Blended ECA, merged blocks
    compiled = compile_module(copy.deepcopy(eager))
    assert is_compiled(compiled) and compiled.state_dict().keys() == eager.state_dict().keys()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    outs, grads = [], []
    for model in (eager, compiled):
        out = model(x)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-3, atol=1e-5, msg=name)
