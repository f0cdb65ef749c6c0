"""torchvision's Faster R-CNN or RetinaNet over an attnlab backbone, sized for small images.

Anchors follow the pyramid: one size per level, ``anchor_scale`` × the level's stride (torchvision's own choice is 8×:
32 px at stride 4), three aspect ratios (0.5, 1, 2); RetinaNet adds the usual three octave scales per level. Faster
R-CNN's box head is torchvision's two-layer MLP with ``4 × fpn_channels`` units (1024 for torchvision's 256-channel
pyramid). Images are normalised by the detector's transform with the data's mean/std, and resized so that the shorter
side is ``min_size`` (at most ``max_size`` on the longer); a fixed-size dataset passes its own size, so nothing is
resampled.
"""

from __future__ import annotations

import inspect

from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from ..errors import AttnlabError, unknown_name
from .backbone import backbone
from .config import DETECTORS

ROI_SIZE = 7  # RoIAlign output side of Faster R-CNN's box head, as in torchvision


def create_detector(
    name: str,
    num_classes: int,
    *,
    detector: str = "fasterrcnn",
    in_chans: int = 3,
    image_mean: tuple[float, ...] | list[float] | None = None,
    image_std: tuple[float, ...] | list[float] | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    anchor_scale: float = 8.0,
    trainable_layers: int | None = None,
    frozen_bn: bool = False,
    weights: str | None = None,
    detector_kwargs: dict | None = None,
    **model_kwargs,
) -> nn.Module:
    """A torchvision detector whose backbone is attnlab model ``name`` under a feature pyramid.

    Args:
        name: an attnlab model name, e.g. ``"aw_resnet20"``.
        num_classes: object classes, without the background (the detector's labels are 1..num_classes; 0 is
            background).
        detector: ``"fasterrcnn"`` or ``"retinanet"``.
        in_chans: image channels.
        image_mean, image_std: per-channel statistics the detector normalises with (default 0.5 / 0.25).
        min_size, max_size: the detector's resizing (see the module doc).
        fpn_channels: channels of the pyramid.
        anchor_scale: anchor side ÷ level stride.
        detector_kwargs: more keyword arguments of torchvision's `FasterRCNN` / `RetinaNet`, e.g.
            ``rpn_post_nms_top_n_train=300, box_batch_size_per_image=128`` for images with few objects.
        trainable_layers, frozen_bn, weights, model_kwargs: as for `attnlab.detection.backbone`.
    """
    if detector not in DETECTORS:
        raise unknown_name("detector", detector, DETECTORS)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise AttnlabError(f"num_classes must be a positive integer, got {num_classes!r}")
    body = backbone(
        name,
        in_chans=in_chans,
        out_channels=fpn_channels,
        trainable_layers=trainable_layers,
        frozen_bn=frozen_bn,
        weights=weights,
        **model_kwargs,
    )
    strides = [level["reduction"] for level in body.feature_info]
    strides.append(2 * strides[-1])  # the "pool" level of LastLevelMaxPool
    mean = list(image_mean) if image_mean is not None else [0.5] * in_chans
    std = list(image_std) if image_std is not None else [0.25] * in_chans
    if len(mean) != in_chans or len(std) != in_chans:
        raise AttnlabError(f"image_mean/image_std need {in_chans} value(s), got {len(mean)}/{len(std)}")
    _check_options(detector, detector_kwargs or {})
    common = dict(min_size=min_size, max_size=max_size, image_mean=mean, image_std=std, **(detector_kwargs or {}))
    try:
        return _assemble(detector, body, num_classes, strides, anchor_scale, fpn_channels, common)
    except TypeError as e:
        raise AttnlabError(f"detector {detector}: {str(e).splitlines()[0]}") from None


def _check_options(detector: str, options: dict) -> None:
    """Refuse an option torchvision's detector would silently pass on (its ``**kwargs`` reach the transform)."""
    cls = RetinaNet if detector == "retinanet" else FasterRCNN
    named = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    known = {
        name
        for fn in (cls.__init__, GeneralizedRCNNTransform.__init__)
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind in named and name != "self"
    } - {"backbone", "num_classes", "min_size", "max_size", "image_mean", "image_std"}
    for key in options:
        if key not in known:
            raise unknown_name(f"{cls.__name__} option", key, known)


def _assemble(detector, body, num_classes, strides, anchor_scale, fpn_channels, common) -> nn.Module:
    """The detector itself: anchors per pyramid level and, for Faster R-CNN, RoIAlign over the levels + box head."""
    ratios = ((0.5, 1.0, 2.0),) * len(strides)
    if detector == "retinanet":
        sizes = tuple(tuple(anchor_scale * s * 2 ** (i / 3) for i in range(3)) for s in strides)
        return RetinaNet(body, num_classes + 1, anchor_generator=AnchorGenerator(sizes, ratios), **common)
    sizes = tuple((anchor_scale * s,) for s in strides)
    levels = [str(i) for i in range(len(body.feature_info))]
    hidden = 4 * fpn_channels
    return FasterRCNN(
        body,
        rpn_anchor_generator=AnchorGenerator(sizes, ratios),
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=ROI_SIZE, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_channels * ROI_SIZE**2, hidden),
        box_predictor=FastRCNNPredictor(hidden, num_classes + 1),
        **common,
    )
