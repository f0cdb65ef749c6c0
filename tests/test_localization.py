"""Localisation: exact polygon overlaps against analytic values and a plain-Python clipper, and a hand-built attention
that looks exactly at the object (IoU 1, equivariance error 0, identical layers)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from attnlab import AttnlabError, create_model
from attnlab.analysis import box_iou, localization, localization_iou, polygon_iou, rectangle_box_iou
from attnlab.analysis.localization import (
    box_polygon,
    convex_intersection_area,
    headline,
    map_boxes,
    mask_iou,
    rectangle_polygon,
    region_masks,
)
from attnlab.layers.cram_geometry import rectangle_from_scores, rectangle_mask
from attnlab.layers.probe import AttentionProbe


def test_box_iou_analytic():
    a = torch.tensor([[0.0, 0, 4, 4], [0, 0, 2, 2], [0, 0, 1, 1], [1, 1, 3, 5]])
    b = torch.tensor([[2.0, 2, 6, 6], [0, 0, 2, 2], [5, 5, 6, 6], [1, 2, 3, 3]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([4 / 28, 1.0, 0.0, 2 / 8]))
    torch.testing.assert_close(polygon_iou(box_polygon(a.double()), box_polygon(b.double())).float(), box_iou(a, b))


def test_rotated_rectangles_analytic():
    size = 32
    # a square of side s turned by 45° over the box of the same square: the box loses four corner triangles with
    # legs s(1 − 1/√2), so the intersection is s² − 2 s² (1 − 1/√2)²
    s = 16.0
    center, side = torch.zeros(1, 2, dtype=torch.float64), torch.full((1, 2), s / size * 2, dtype=torch.float64)
    rect = {"center": center, "size": side, "angle": torch.tensor([math.pi / 4], dtype=torch.float64)}
    box = torch.tensor([[8.0, 8.0, 24.0, 24.0]])
    inter = s * s - 2 * s * s * (1 - 1 / math.sqrt(2)) ** 2
    assert rectangle_box_iou(rect, box, (size, size)).item() == pytest.approx(inter / (2 * s * s - inter), rel=1e-6)
    # a w×h rectangle turned by 90° is the h×w box
    rect = {
        "center": torch.tensor([[0.25, -0.125]]),
        "size": torch.tensor([[0.5, 0.25]]),
        "angle": torch.tensor([math.pi / 2]),
    }
    assert rectangle_box_iou(rect, torch.tensor([[18.0, 10.0, 22.0, 18.0]]), (size, size)).item() == pytest.approx(1)
    # the same diamond well inside a large box: IoU = its area / the box's
    rect = {
        "center": center,
        "size": torch.full((1, 2), 0.25, dtype=torch.float64),
        "angle": torch.tensor([math.pi / 4], dtype=torch.float64),
    }
    assert rectangle_box_iou(rect, torch.tensor([[0.0, 0.0, 32.0, 32.0]]), (size, size)).item() == pytest.approx(
        16 / 1024
    )


def _slow_intersection(subject: list[tuple[float, float]], clip: list[tuple[float, float]]) -> float:
    """Textbook Sutherland–Hodgman on Python lists (clip polygon counter-clockwise), then the shoelace formula."""

    def inside(p, a, b):
        return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) >= 0

    def cross(p, q, a, b):
        d = (p[0] - q[0]) * (a[1] - b[1]) - (p[1] - q[1]) * (a[0] - b[0])
        t = ((p[0] - a[0]) * (a[1] - b[1]) - (p[1] - a[1]) * (a[0] - b[0])) / d
        return (p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1]))

    out = subject
    for i in range(len(clip)):
        a, b = clip[i], clip[(i + 1) % len(clip)]
        points, out = out, []
        for j in range(len(points)):
            p, q = points[j], points[(j + 1) % len(points)]
            if inside(q, a, b):
                if not inside(p, a, b):
                    out.append(cross(p, q, a, b))
                out.append(q)
            elif inside(p, a, b):
                out.append(cross(p, q, a, b))
        if not out:
            return 0.0
    return 0.5 * abs(sum(out[i][0] * out[i - 1][1] - out[i - 1][0] * out[i][1] for i in range(len(out))))


coordinate = st.floats(-1.2, 1.2)
side = st.floats(0.05, 2.0)


@given(
    coordinate,
    coordinate,
    side,
    side,
    st.floats(-math.pi, math.pi),
    st.floats(0, 30),
    st.floats(0, 30),
    st.floats(0.5, 20),
    st.floats(0.5, 20),
)
def test_batched_clipping_equals_the_textbook_algorithm(cx, cy, w, h, angle, x0, y0, bw, bh):
    f64 = dict(dtype=torch.float64)
    poly = rectangle_polygon(
        torch.tensor([[cx, cy]], **f64), torch.tensor([[w, h]], **f64), torch.tensor([angle], **f64), (32, 32)
    )
    box = torch.tensor([[x0, y0, x0 + bw, y0 + bh]], dtype=torch.float64)
    fast = convex_intersection_area(poly, box_polygon(box)).item()
    slow = _slow_intersection([tuple(p) for p in poly[0].tolist()], [tuple(p) for p in box_polygon(box)[0].tolist()])
    assert fast == pytest.approx(slow, abs=1e-9)
    other = rectangle_polygon(
        torch.tensor([[cy, cx]], **f64), torch.tensor([[h, w]], **f64), torch.tensor([angle / 2], **f64), (32, 32)
    )
    assert polygon_iou(poly, other).item() == pytest.approx(polygon_iou(other, poly).item(), abs=1e-9)


def test_masks_and_map_boxes():
    maps = torch.zeros(2, 1, 8, 8)
    maps[0, 0, 2:5, 1:3] = 1.0
    maps[1] = 0.3
    maps[1, 0, 6:, 6:] = 0.9
    boxes = map_boxes(maps, (32, 32))  # 4 image pixels per map pixel
    torch.testing.assert_close(boxes, torch.tensor([[4.0, 8, 12, 20], [24, 24, 32, 32]]))
    assert map_boxes(maps, (32, 32), threshold=0.5, threshold_mode="absolute")[1].tolist() == [24, 24, 32, 32]
    rect = {"center": torch.tensor([[-0.5, 0.0]]), "size": torch.tensor([[0.5, 1.0]]), "angle": torch.zeros(1)}
    mask = region_masks(rect, "rectangle", (8, 8))[0]  # columns 1..2, rows 2..5 (pixel centres strictly inside)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 1:3] = True
    assert torch.equal(mask, expected)
    assert mask_iou(mask[None], expected[None]).item() == 1.0
    assert math.isnan(mask_iou(torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(1, 2, 2, dtype=torch.bool)).item())


class LookAtObject(nn.Module):
    """CRAM-style attention whose score map is 0 on the object's pixels and −∞ elsewhere: the moments rectangle of a
    uniform map over a pixel-aligned box is that box (attnlab.layers.cram_geometry)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.probe = AttentionProbe(kind)

    def forward(self, x):
        scores = torch.where(x > 0, 0.0, -math.inf)
        if self.kind == "spatial":
            return x * self.probe((x > 0).float())
        center, size, angle = rectangle_from_scores(scores)
        mask = rectangle_mask(center, size, angle, x.shape[-2], x.shape[-1], 50.0)
        return x * self.probe({"center": center, "size": size, "angle": angle, "mask": mask})["mask"]


class Head(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :2]


def _objects(n: int = 12, size: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, size, size)
    x0, y0 = torch.randint(4, 10, (n,), generator=g), torch.randint(4, 10, (n,), generator=g)
    w, h = torch.randint(2, 9, (n,), generator=g), torch.randint(2, 9, (n,), generator=g)
    for i in range(n):  # building the test images, not analysis code
        images[i, 0, y0[i] : y0[i] + h[i], x0[i] : x0[i] + w[i]] = 1.0
    return images, torch.stack([x0, y0, x0 + w, y0 + h], 1).float()


def test_attention_on_the_object_scores_iou_one_and_no_equivariance_error():
    images, boxes = _objects()
    model = nn.Sequential(LookAtObject("rectangle"), LookAtObject("spatial"), LookAtObject("rectangle"), Head())
    per_layer = localization_iou(model.eval(), images, boxes)
    assert per_layer[0]["iou_rect"] == pytest.approx(torch.ones(12), abs=1e-4)  # float32 moments
    for layer in per_layer:
        assert layer["iou_map"] == pytest.approx(torch.ones(12), abs=1e-6)
    result = localization(model, images, boxes, keep_examples=2)
    cross = torch.tensor(result["cross_layer_iou"]["matrix"])
    assert torch.allclose(cross, torch.ones(3, 3)) and result["cross_layer_iou"]["mean"] == pytest.approx(1.0)
    for layer in result["layers"]:
        assert set(layer["equivariance_error"]) == {"hflip", "rot90", "shift"}
        assert layer["equivariance_error_mean"] == pytest.approx(0.0, abs=1e-6)
    assert result["examples"]["images"].shape == (2, 1, 24, 24)


def test_localization_on_real_models_and_errors():
    images, boxes = _objects(4, 16)
    model = create_model("cram_resnet20", num_classes=2, in_chans=1).eval()
    result = localization(model, images, boxes)
    assert [layer["kind"] for layer in result["layers"]] == ["rectangle"] * 9
    assert all(0 <= layer["iou_rect"]["mean"] <= 1 for layer in result["layers"])
    assert len(result["cross_layer_iou"]["matrix"]) == 9
    with pytest.raises(AttnlabError, match="no spatial attention"):
        localization(create_model("se_resnet20", num_classes=2, in_chans=1), images, boxes)


class LookAtCorner(nn.Module):
    """Position-wise attention on a fixed 8×8 corner of a 24×24 image, whatever the input."""

    def __init__(self, corner: str):
        super().__init__()
        self.corner = corner
        self.probe = AttentionProbe("spatial")

    def forward(self, x):
        hot = torch.zeros_like(x)
        if self.corner == "top-left":
            hot[..., :8, :8] = 1.0
        else:
            hot[..., -8:, -8:] = 1.0
        return x * self.probe(hot)


def _corner_objects(n: int, corner: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.zeros(n, 1, 24, 24)
    start = 0 if corner == "top-left" else 16
    images[..., start : start + 8, start : start + 8] = 1.0
    return images, torch.tensor([[start, start, start + 8, start + 8]], dtype=torch.float32).expand(n, 4)


def test_best_layer_is_chosen_on_held_out_images_not_on_the_scored_ones():
    model = nn.Sequential(LookAtCorner("top-left"), LookAtCorner("bottom-right"), Head()).eval()
    scored, scored_boxes = _corner_objects(6, "top-left")  # layer 0 is perfect here, layer 1 misses
    held_out, held_out_boxes = _corner_objects(6, "bottom-right")  # ... and the other way round here
    optimistic = localization(model, scored, scored_boxes, transforms=())
    assert optimistic["selected_layer"]["on"] == "scored images"
    assert headline(optimistic)["iou_best_layer"] == pytest.approx(1.0)
    honest = localization(
        model, scored, scored_boxes, transforms=(), select_images=held_out, select_boxes=held_out_boxes
    )
    assert honest["selected_layer"] == {
        "index": 1,
        "on": "validation",
        "path": "1",
        "images": 6,
        "iou_map_on_selection": [0.0, 1.0],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no transform, no equivariance error: NaN, without numpy's warning
        numbers = headline(honest)
    assert numbers["iou_best_layer"] == pytest.approx(0.0) and math.isnan(numbers["equivariance_error"])


def test_every_model_is_compared_on_the_thresholded_map_iou_only():
    """CRAM's exact-rectangle IoU is a CRAM-only figure: it never enters the cross-model comparison figure."""
    layer = {"kind": "rectangle", "equivariance_error_mean": 0.0}
    result = {
        "layers": [
            {**layer, "iou_map": {"mean": 0.3}, "iou_rect": {"mean": 0.9}},
            {**layer, "iou_map": {"mean": 0.2}, "iou_rect": {"mean": 0.95}},
        ],
        "selected_layer": {"index": 0, "on": "validation"},
        "cross_layer_iou": {"mean": 0.5},
    }
    numbers = headline(result)
    assert numbers["iou_best_layer"] == 0.3
    assert numbers["iou_rect_best_layer"] == 0.9


def test_the_overlay_title_names_only_what_is_drawn():
    from attnlab.analysis.plots import overlay_title

    spatial = {"layer1.0.attn": "spatial", "layer3.2.attn": "spatial"}
    assert overlay_title("sp", spatial) == "sp: true box (green), spatial attention map of layer3.2.attn (heat)"
    cram = {"layer2.0.cram": "rectangle", "layer3.0.cram": "rectangle", "layer3.0.cram.mask": "spatial"}
    assert overlay_title("cram", cram) == (
        "cram: true box (green), CRAM rectangles of 2 layers (yellow → red by depth), spatial attention map of "
        "layer3.0.cram.mask (heat)"
    )
