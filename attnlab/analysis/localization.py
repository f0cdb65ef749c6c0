"""Where does spatial attention look? Overlap with the true object box, across layers, and under transformed inputs.

On a dataset with ground-truth boxes (``cluttered-fashion-mnist``), for every spatial attention of a model:

- CRAM rectangles: the exact IoU of the predicted (rotated) rectangle with the true box, as polygons. CRAM's
  normalised coordinates cover the whole feature map, and *our reading* maps them onto the whole input image
  (u = −1 … 1 ↦ x = 0 … W in pixel-edge coordinates, the convention of `F.affine_grid` with align_corners=False; a
  stride-s map is offset from this by at most half an input pixel).
- position-wise maps (spatial, CBAM spatial, and CRAM's mask too): the box around the thresholded map — each map
  rescaled to [0, 1] by its own min and max and cut at ``threshold`` (``threshold_mode="relative"``, our reading), or
  cut at the raw value (``"absolute"``) — scaled to image pixels, against the true box.
- stability across layers: each layer's attended region as a binary mask at the input resolution (the rectangle's
  pixel centres for CRAM, the thresholded map upsampled by nearest neighbour otherwise), and the pixel IoU between
  every pair of layers.
- equivariance: for grid transforms T of the input (a horizontal flip, a quarter turn, and a translation by whole
  multiples of the largest stride, zero-filled; `attnlab.layers.cram_equivariance.GridTransform`), the error
  1 − IoU(T(M(x)), M(T(x))) between the transformed mask of x and the mask of the transformed x.

Polygon overlaps are exact: the rectangle is clipped by the half-planes of the other convex polygon (Sutherland–
Hodgman), for the whole batch at once, keeping fixed-size vertex arrays in which a dropped vertex is replaced by its
predecessor (a repeated vertex adds nothing to the shoelace area).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.cluttered import tight_boxes
from ..errors import AttnlabError, unknown_name
from ..layers.cram_equivariance import EQUIVARIANCE_TRANSFORMS, GridTransform
from ..layers.cram_geometry import pixel_centers
from ..models.capture import capture_attention
from ..stats import mean_ci
from .sites import GateSite, gate_sites

SPATIAL_KINDS = ("spatial", "rectangle")
READS = "spatial attention (spatial, CBAM or CRAM)"
"""What localization reads (the kinds `SPATIAL_KINDS`): a network without any cannot be analysed."""
THRESHOLD_MODES = ("relative", "absolute")
TRANSFORMS = EQUIVARIANCE_TRANSFORMS


# ------------------------------------------------------------------------------------------------------------ geometry


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of each box of ``a`` with the same row of ``b`` (N×4 as x0, y0, x1, y1 → N); 0 where both are empty."""
    width = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp_min(0)
    height = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp_min(0)
    inter = width * height
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def box_polygon(boxes: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise (in x-right, y-up terms) corners of axis-aligned boxes, N×4×2."""
    x0, y0, x1, y1 = boxes.unbind(1)
    return torch.stack([torch.stack(c, 1) for c in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))], 1)


def rectangle_polygon(
    center: torch.Tensor, size: torch.Tensor, angle: torch.Tensor, image_size: tuple[int, int]
) -> torch.Tensor:
    """Corners (N×4×2, image pixel-edge coordinates x, y) of CRAM rectangles given in normalised units."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    axis_u = torch.stack([cos, sin], 1) * size[:, :1] / 2  # half the width along the rotated u axis
    axis_v = torch.stack([-sin, cos], 1) * size[:, 1:] / 2
    corners = torch.stack(
        [center - axis_u - axis_v, center + axis_u - axis_v, center + axis_u + axis_v, center - axis_u + axis_v], 1
    )
    height, width = image_size
    return (corners + 1) / 2 * corners.new_tensor([width, height])


def polygon_area(poly: torch.Tensor) -> torch.Tensor:
    """Shoelace area of each polygon (N×M×2, vertices in order, either orientation) → N."""
    x, y = poly[..., 0], poly[..., 1]
    return 0.5 * (x * y.roll(-1, 1) - x.roll(-1, 1) * y).sum(1).abs()


def _fill_dropped(points: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Replace each dropped point by the last kept one before it (cyclically); all zero if nothing is kept."""
    m = keep.shape[1]
    position = torch.arange(m, device=keep.device).expand_as(keep)
    last = torch.where(keep, position, -1).cummax(1).values
    wrap = torch.where(keep, position, -1).amax(1, keepdim=True)  # the last kept point overall fills the head
    source = torch.where(last >= 0, last, wrap).clamp_min(0)
    filled = points.gather(1, source.unsqueeze(-1).expand(-1, -1, 2))
    return filled * keep.any(1).view(-1, 1, 1)


def clip_polygon(poly: torch.Tensor, normal: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Sutherland–Hodgman: the part of each polygon (N×M×2) with normal·p ≤ offset (normal N×2, offset N), N×2M×2."""
    nxt = poly.roll(-1, 1)
    side, side_next = (
        (poly * normal[:, None]).sum(-1) - offset[:, None],
        (nxt * normal[:, None]).sum(-1) - offset[:, None],
    )
    inside, inside_next = side <= 0, side_next <= 0
    t = side / torch.where(side != side_next, side - side_next, torch.ones_like(side))
    crossing = poly + t.unsqueeze(-1) * (nxt - poly)
    points = torch.stack([poly, crossing], 2).flatten(1, 2)  # per edge: its start, then where it crosses
    keep = torch.stack([inside, inside != inside_next], 2).flatten(1, 2)
    return _fill_dropped(points, keep)


def convex_intersection_area(poly: torch.Tensor, convex: torch.Tensor) -> torch.Tensor:
    """Area of the intersection of each polygon with the same row's convex polygon (N×M×2 and N×K×2) → N."""
    orientation = torch.sign(
        (convex[..., 0] * convex[..., 1].roll(-1, 1) - convex[..., 0].roll(-1, 1) * convex[..., 1]).sum(1)
    )
    for k in range(convex.shape[1]):  # one clip per edge of the convex polygon (4 for a rectangle)
        a, b = convex[:, k], convex[:, (k + 1) % convex.shape[1]]
        edge = b - a
        normal = torch.stack([edge[:, 1], -edge[:, 0]], 1) * orientation[:, None]  # outward for either orientation
        poly = clip_polygon(poly, normal, (normal * a).sum(1))
    return polygon_area(poly) * (orientation != 0)  # a degenerate convex polygon covers nothing


def polygon_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact IoU of convex polygons row by row (N×M×2, N×K×2) → N; 0 where the union is empty."""
    inter = convex_intersection_area(a, b)
    union = polygon_area(a) + polygon_area(b) - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def rectangle_box_iou(rect: dict[str, torch.Tensor], boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Exact IoU of CRAM rectangles (dict center, size, angle) with boxes in image pixels, N."""
    poly = rectangle_polygon(rect["center"].double(), rect["size"].double(), rect["angle"].double(), image_size)
    return polygon_iou(poly, box_polygon(boxes.double())).float()


# ------------------------------------------------------------------------------------------------------------- masks


def _normalised_maps(maps: torch.Tensor, threshold_mode: str) -> torch.Tensor:
    if threshold_mode not in THRESHOLD_MODES:
        raise unknown_name("threshold mode", threshold_mode, THRESHOLD_MODES)
    maps = maps.float()
    if threshold_mode == "absolute":
        return maps
    low, high = maps.amin((1, 2, 3), keepdim=True), maps.amax((1, 2, 3), keepdim=True)
    return (maps - low) / (high - low).clamp_min(1e-12)


def map_boxes(
    maps: torch.Tensor, image_size: tuple[int, int], *, threshold: float = 0.5, threshold_mode: str = "relative"
) -> torch.Tensor:
    """Box (N×4, image pixels) around the positions of each map (N×1×h×w) at or above the threshold."""
    hot = (_normalised_maps(maps, threshold_mode) >= threshold).float()
    boxes = tight_boxes(hot)
    height, width = image_size
    return boxes * boxes.new_tensor([width / maps.shape[-1], height / maps.shape[-2]] * 2)


def region_masks(
    value: Any, kind: str, image_size: tuple[int, int], *, threshold: float = 0.5, threshold_mode: str = "relative"
) -> torch.Tensor:
    """Binary N×H×W mask at the input resolution of what one layer attends to (module docstring)."""
    height, width = image_size
    if kind == "rectangle":
        center, size, angle = (value[k].float() for k in ("center", "size", "angle"))
        u = pixel_centers(width, device=center.device)
        v = pixel_centers(height, device=center.device)
        du, dv = (u - center[:, :1])[:, None, :], (v - center[:, 1:])[:, :, None]
        cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
        along, across = cos * du + sin * dv, cos * dv - sin * du
        return (along.abs() <= size[:, 0, None, None] / 2) & (across.abs() <= size[:, 1, None, None] / 2)
    hot = _normalised_maps(value, threshold_mode) >= threshold
    return F.interpolate(hot.float(), size=image_size, mode="nearest")[:, 0] > 0.5


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pixel IoU of binary masks row by row (N×H×W) → N; NaN where both are empty."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))


# ------------------------------------------------------------------------------------------------------------- model


@torch.inference_mode()
def _attention(model: nn.Module, x: torch.Tensor, sites: list[GateSite], batch_size: int) -> dict[str, Any]:
    """Every site's record entry for all of x ({path: tensor or dict}), computed in batches."""
    parts: dict[str, list[Any]] = {s.path: [] for s in sites}
    with capture_attention(model) as record:
        for xb in x.split(batch_size):
            model(xb)
            for s in sites:
                parts[s.path].append(record[s.path])
    out = {}
    for s in sites:
        values = parts[s.path]
        out[s.path] = (
            {k: torch.cat([v[k] for v in values]) for k in values[0]} if s.kind == "rectangle" else (torch.cat(values))
        )
    return out


def _stride(image_size: tuple[int, int], value: Any) -> int:
    maps = value["mask"] if isinstance(value, dict) else value
    return max(max(1, round(i / m)) for i, m in zip(image_size, maps.shape[-2:]))


def grid_transforms(names: Sequence[str], image_size: tuple[int, int], step: int) -> dict[str, GridTransform]:
    """The named transforms: ``hflip``, ``rot90`` (one quarter turn; square inputs only) and ``shift`` (by the
    multiple of ``step`` pixels nearest 10% of the side, at least one ``step``, down and right)."""
    out = {}
    for name in names:
        if name not in TRANSFORMS:
            raise unknown_name("transform", name, TRANSFORMS)
        if name == "rot90" and image_size[0] != image_size[1]:
            continue
        shift = step * max(1, round(0.1 * min(image_size) / step))
        out[name] = {
            "hflip": GridTransform(flip=True),
            "rot90": GridTransform(turns=1),
            "shift": GridTransform(shift=(shift, shift)),
        }[name]
    return out


def _layer_ious(
    sites: list[GateSite], values: dict[str, Any], boxes: torch.Tensor, image_size: tuple[int, int], **kw: Any
) -> list[dict[str, Any]]:
    layers = []
    for s in sites:
        value = values[s.path]
        maps = value["mask"] if s.kind == "rectangle" else value
        target = boxes.to(maps.device).float()
        layer = {
            "path": s.path,
            "kind": s.kind,
            "map_size": list(maps.shape[-2:]),
            "iou_map": box_iou(map_boxes(maps, image_size, **kw), target),
        }
        if s.kind == "rectangle":
            layer["iou_rect"] = rectangle_box_iou(value, target, image_size)
        layers.append(layer)
    return layers


def _spatial_sites(model: nn.Module) -> list[GateSite]:
    sites = gate_sites(model, SPATIAL_KINDS)
    if not sites:
        raise AttnlabError(f"localization: the model has no {READS}")
    return sites


def localization_iou(
    model: nn.Module,
    images: torch.Tensor,
    boxes: torch.Tensor,
    *,
    threshold: float = 0.5,
    threshold_mode: str = "relative",
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """Per spatial-attention layer: IoU with the true boxes (N×4, image pixels) of the thresholded map's box
    (``iou_map``, N) and, for CRAM, of the exact rectangle (``iou_rect``, N). The model must be in eval mode."""
    sites = _spatial_sites(model)
    values = _attention(model, images, sites, batch_size)
    return _layer_ious(
        sites, values, boxes, tuple(images.shape[-2:]), threshold=threshold, threshold_mode=threshold_mode
    )


def localization(
    model: nn.Module,
    images: torch.Tensor,
    boxes: torch.Tensor,
    *,
    threshold: float = 0.5,
    threshold_mode: str = "relative",
    transforms: Sequence[str] = TRANSFORMS,
    batch_size: int = 256,
    keep_examples: int = 0,
    select_images: torch.Tensor | None = None,
    select_boxes: torch.Tensor | None = None,
) -> dict[str, Any]:
    """All localisation measures of ``model`` on ``images`` with true ``boxes`` (module docstring).

    Args:
        threshold, threshold_mode: how position-wise maps become regions.
        transforms: for the equivariance error, among ``hflip``, ``rot90``, ``shift``.
        batch_size: images per forward pass.
        keep_examples: also return the attention of the first few images under ``"examples"`` (for plots).
        select_images, select_boxes: held-out images (validation) on which the best layer is chosen, by the
            thresholded-map IoU that every model has; without them it is chosen on ``images`` themselves (optimistic,
            and the result says so under ``"selected_on"``).
    """
    was_training = model.training
    model.eval()
    try:
        image_size = tuple(images.shape[-2:])
        sites = _spatial_sites(model)
        values = _attention(model, images, sites, batch_size)
        kw = dict(threshold=threshold, threshold_mode=threshold_mode)
        per_layer = _layer_ious(sites, values, boxes, image_size, **kw)
        masks = {s.path: region_masks(values[s.path], s.kind, image_size, **kw) for s in sites}
        step = max(_stride(image_size, values[s.path]) for s in sites)
        equivariance = _equivariance_errors(model, images, sites, masks, transforms, step, batch_size, kw)
        chooser = per_layer if select_images is None else localization_iou(model, select_images, select_boxes, **kw)
        selection = [float(np.nanmean(layer["iou_map"].cpu().numpy())) for layer in chooser]
        result: dict[str, Any] = {
            "images": len(images),
            "layers": _layer_summaries(sites, per_layer, equivariance),
            "selected_layer": {
                "index": int(np.nanargmax(selection)) if not np.all(np.isnan(selection)) else 0,
                "on": "validation" if select_images is not None else "scored images",
                "path": sites[int(np.nanargmax(selection)) if not np.all(np.isnan(selection)) else 0].path,
                "images": len(select_images) if select_images is not None else len(images),
                "iou_map_on_selection": selection,
            },
            "cross_layer_iou": _cross_layer_iou(sites, masks),
            "settings": {
                "threshold": threshold,
                "threshold_mode": threshold_mode,
                "transforms": list(transforms),
                "shift_step": step,
            },
        }
        if keep_examples:
            result["examples"] = _examples(images, boxes, sites, values, min(keep_examples, len(images)))
        return result
    finally:
        model.train(was_training)


def _cross_layer_iou(sites: list[GateSite], masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """IoU between the regions of every pair of layers (a handful of pairs, each batched over all samples)."""
    n = len(sites)
    cross = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(n):
            cross[i, j] = mean_ci(mask_iou(masks[sites[i].path], masks[sites[j].path]).cpu().numpy())["mean"]
    off_diagonal = cross[~np.eye(n, dtype=bool)] if n > 1 else np.array([])
    return {
        "paths": [s.path for s in sites],
        "matrix": cross.tolist(),
        "mean": float(np.nanmean(off_diagonal)) if off_diagonal.size else float("nan"),
    }


def _equivariance_errors(model, images, sites, masks, transforms, step: int, batch_size: int, kw) -> dict:
    """{layer path: {transform: 1 − IoU(moved region of x, region of moved x)}}."""
    image_size = tuple(images.shape[-2:])
    equivariance: dict[str, dict[str, Any]] = {s.path: {} for s in sites}
    for name, transform in grid_transforms(transforms, image_size, step).items():
        moved = _attention(model, transform(images), sites, batch_size)
        for s in sites:
            expected = transform(masks[s.path].unsqueeze(1).float())[:, 0] > 0.5
            got = region_masks(moved[s.path], s.kind, image_size, **kw)
            equivariance[s.path][name] = mean_ci(1 - mask_iou(expected, got).cpu().numpy())
    return equivariance


def _layer_summaries(sites: list[GateSite], per_layer: list[dict], equivariance: dict) -> list[dict[str, Any]]:
    layers = []
    for s, layer in zip(sites, per_layer):
        out = {
            "path": s.path,
            "kind": s.kind,
            "map_size": layer["map_size"],
            "iou_map": mean_ci(layer["iou_map"].cpu().numpy()),
        }
        if "iou_rect" in layer:
            out["iou_rect"] = mean_ci(layer["iou_rect"].cpu().numpy())
        out["equivariance_error"] = equivariance[s.path]
        errors = [v["mean"] for v in equivariance[s.path].values()]
        out["equivariance_error_mean"] = float(np.mean(errors)) if errors else float("nan")
        layers.append(out)
    return layers


def _examples(images, boxes, sites: list[GateSite], values: dict, k: int) -> dict[str, Any]:
    """The first ``k`` images, their boxes and every layer's attention, on the CPU (for the overlay figure)."""
    return {
        "images": images[:k].cpu(),
        "boxes": boxes[:k].cpu(),
        "attention": {
            s.path: (
                {key: v[:k].cpu() for key, v in values[s.path].items()}
                if s.kind == "rectangle"
                else values[s.path][:k].cpu()
            )
            for s in sites
        },
        "kinds": {s.path: s.kind for s in sites},
    }


IOU_BEST_LAYER = "iou_best_layer"
"""Headline: IoU with the true box of the best-localising layer."""
CROSS_LAYER_IOU = "cross_layer_iou"
"""Headline: IoU between the regions of different layers (stability across layers)."""
EQUIVARIANCE_ERROR = "equivariance_error"
"""Headline: 1 − IoU between the transformed region and the region of the transformed image, mean over layers."""
METRICS = (IOU_BEST_LAYER, CROSS_LAYER_IOU, EQUIVARIANCE_ERROR)

METRIC_MEANINGS = {
    "iou_map_{kind}": "IoU of the thresholded {kind} maps' box with the true box, mean over those layers (1 = exact)",
    "iou_rect": "exact IoU of CRAM's rectangle with the true box, mean over CRAM layers",
    "equivariance_error_{kind}": "1 − IoU between the moved region and the region of the moved image, {kind} layers "
    "(0 = the attention moves with the object)",
    IOU_BEST_LAYER: "IoU with the true box of the layer that localises best on held-out validation images",
    "iou_rect_best_layer": "CRAM's exact-rectangle IoU in that same layer",
    CROSS_LAYER_IOU: "IoU between the regions of different layers (1 = every layer looks at the same place)",
    EQUIVARIANCE_ERROR: "1 − IoU between the moved region and the region of the moved image, mean over layers "
    "(0 = equivariant)",
}
"""One line per headline metric: the legend of ``attnlab analyze`` and of the docs."""


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The few numbers a report quotes from a `localization` result."""
    out: dict[str, float] = {}
    for kind in SPATIAL_KINDS:
        layers = [layer for layer in result["layers"] if layer["kind"] == kind]
        if layers:
            out[f"iou_map_{kind}"] = _nanmean([layer["iou_map"]["mean"] for layer in layers])
            if kind == "rectangle":
                out["iou_rect"] = _nanmean([layer["iou_rect"]["mean"] for layer in layers])
            out[f"equivariance_error_{kind}"] = _nanmean([layer["equivariance_error_mean"] for layer in layers])
    # the comparison figure: the same measure for every model (thresholded-map IoU, which every spatial attention
    # has) in the layer chosen on held-out images; CRAM's exact-rectangle IoU in that layer is a CRAM-only figure
    chosen = result["layers"][result["selected_layer"]["index"]]
    out["iou_best_layer"] = chosen["iou_map"]["mean"]
    if "iou_rect" in chosen:
        out["iou_rect_best_layer"] = chosen["iou_rect"]["mean"]
    out["cross_layer_iou"] = result["cross_layer_iou"]["mean"]
    out["equivariance_error"] = _nanmean([layer["equivariance_error_mean"] for layer in result["layers"]])
    return out


def selection_note(result: dict[str, Any]) -> list[str]:
    """How the best layer of ``iou_best_layer`` was chosen, and on which images: printed beside the headline."""
    chosen = result["selected_layer"]
    where = (
        f"{chosen['images']} held-out validation images, not the scored test images"
        if chosen["on"] == "validation"
        else "the scored images themselves (optimistic)"
    )
    path = chosen.get("path") or result["layers"][chosen["index"]]["path"]
    return [f"best layer: {path} ({chosen['index'] + 1} of {len(result['layers'])}), chosen by mean map IoU on {where}"]


def _nanmean(values) -> float:
    """The mean of the values that are not NaN; NaN (without numpy's empty-slice warning) when none is, as when no
    equivariance transform was asked for."""
    kept = [float(v) for v in values if not np.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


__all__ = [
    "METRIC_MEANINGS",
    "TRANSFORMS",
    "box_iou",
    "box_polygon",
    "clip_polygon",
    "convex_intersection_area",
    "grid_transforms",
    "headline",
    "localization",
    "localization_iou",
    "map_boxes",
    "mask_iou",
    "polygon_area",
    "polygon_iou",
    "rectangle_box_iou",
    "rectangle_polygon",
    "region_masks",
    "selection_note",
]
