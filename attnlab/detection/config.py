"""Detection run configuration: `attnlab.train.config.RunConfig`'s shared fields with a detector's recipe and
options, written to ``OUT/config.yaml``.

Default recipe (our reading of torchvision's detection reference, scaled to a CPU and to backbones trained from
scratch): SGD with momentum 0.9, batch 16, lr 0.02 after a one-epoch linear warm-up, cosine decay to zero, weight
decay 1e-4 on conv/linear weights only, horizontal flips, bf16 autocast where the device has native bf16; every
backbone layer trainable with ordinary BatchNorm (torchvision freezes layers and BN only under pretrained weights,
which attnlab does not have).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..train.config import NEUTRAL as TRAIN_NEUTRAL
from ..train.config import RunConfig, redefault, setting

DETECTORS = ("fasterrcnn", "retinanet")

DATASETS_HELP = (
    "detection-fashion-mnist (1-5 garments per canvas, with clutter) or coco:PATH (PATH holding train.json + "
    "test.json [+ val.json] with images relative to PATH or PATH/images, or COCO's annotations/instances_*.json "
    "layout)"
)


@dataclass
class DetectConfig(RunConfig):
    """Everything that defines a detection run; ``model`` is the backbone."""

    dataset: str = setting("detection-fashion-mnist", group="run", help=DATASETS_HELP)
    out: str = redefault(RunConfig, "out", "runs/detect")
    epochs: int = redefault(RunConfig, "epochs", 12)
    batch_size: int = redefault(RunConfig, "batch_size", 16)
    eval_batch_size: int = redefault(RunConfig, "eval_batch_size", 32)
    lr: float = redefault(RunConfig, "lr", 0.02)
    nesterov: bool = redefault(RunConfig, "nesterov", False)
    weight_decay: float = redefault(RunConfig, "weight_decay", 1e-4)
    detector: str = setting("fasterrcnn", group="detector", choices=DETECTORS, help="the detection head")
    hflip: bool = setting(True, help="random horizontal flips (boxes flipped with the images)")
    fpn_channels: int = setting(64, group="detector", help="channels of the feature pyramid")
    out_indices: list[int] | None = setting(
        None, group="detector", help="backbone levels under the pyramid, e.g. 2,3 (0 = stem; default: every stage)"
    )
    anchor_scale: float = setting(8.0, group="detector", help="anchor side / level stride")
    min_size: int | None = setting(
        None, group="detector", help="resize the shorter image side to this (default: a fixed-size dataset's, or 800)"
    )
    max_size: int | None = setting(
        None, group="detector", help="longest image side after resizing (default: min_size, or 1333)"
    )
    trainable_layers: int | None = setting(
        None, group="detector", help="backbone stages kept trainable, from the last (default: all)"
    )
    frozen_bn: bool = setting(False, group="detector", help="freeze the backbone's BatchNorm")
    backbone_weights: str | None = setting(
        None, group="detector", help="start the backbone from a trained classifier run of the same model"
    )
    detector_kwargs: dict[str, Any] = setting(
        {},
        group="options",
        flag="--detector-arg",
        help="more FasterRCNN / RetinaNet arguments, e.g. box_batch_size_per_image=128",
    )

    POSITIVE: ClassVar[tuple[str, ...]] = (*RunConfig.POSITIVE, "fpn_channels", "anchor_scale")

    def checks(self) -> list[tuple[bool, str]]:
        return [
            *super().checks(),
            (self.detector in DETECTORS, f"detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}"),
            (self.min_size is None or self.min_size > 0, f"min_size must be > 0, got {self.min_size}"),
            (self.max_size is None or self.max_size > 0, f"max_size must be > 0, got {self.max_size}"),
        ]

    def __post_init__(self) -> None:
        super().__post_init__()
        from .backbone import check_backbone_name  # here, not at import: the flags are generated without torch

        check_backbone_name(self.model)


NEUTRAL = TRAIN_NEUTRAL - {"compile"}
"""Settings that say where a detection run executes, not what it computes (as `attnlab.train.config.NEUTRAL`)."""
RESUMABLE_CHANGES = NEUTRAL | {"epochs"}
"""What may change when a run is resumed: the neutral settings, and the length (more epochs stretch the schedule)."""

__all__ = ["DETECTORS", "NEUTRAL", "RESUMABLE_CHANGES", "DetectConfig"]
