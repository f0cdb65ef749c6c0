"""Detection run configuration: one dataclass, the single source of the defaults, written to ``OUT/config.yaml``.

Default recipe (our reading of torchvision's detection reference, scaled to a CPU and to backbones trained from
scratch): SGD with momentum 0.9, batch 16, lr 0.02 after a one-epoch linear warm-up, cosine decay to zero, weight
decay 1e-4 on conv/linear weights only, horizontal flips, bf16 autocast where the device has native bf16 (``precision``
as the classifiers'; ``amp``, its old name, is still read); every backbone layer trainable with ordinary BatchNorm
(torchvision freezes layers and BN only under pretrained weights, which attnlab does not have).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import AttnlabError, unknown_name
from ..io import read_yaml
from ..models import list_models
from ..schema import check_fields, check_keys
from ..train.config import PRECISIONS, SCHEDULES, resolve_precision, seed_and_split_checks, upgrade_settings
from .detector import DETECTORS


@dataclass
class DetectConfig:
    """Everything that defines a detection run. Field names are the CLI flags (``--batch-size`` → ``batch_size``)."""

    model: str = "resnet20"
    detector: str = "fasterrcnn"
    dataset: str = "detection-fashion-mnist"
    data_dir: str | None = None
    out: str = "runs/detect"
    epochs: int = 12
    batch_size: int = 16
    lr: float = 0.02
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    hflip: bool = True
    seed: int = 0
    subset: int | None = None
    val_size: int | float | None = None
    device: str = "cpu"
    precision: str = "auto"  # as the classifiers': bf16 autocast where the device has native bf16, else fp32
    fpn_channels: int = 64
    out_indices: list[int] | None = None  # backbone levels under the pyramid (None: every stage)
    anchor_scale: float = 8.0
    min_size: int | None = None  # None: a fixed-size dataset's own size, else 800
    max_size: int | None = None  # None: min_size for a fixed-size dataset, else 1333
    trainable_layers: int | None = None
    frozen_bn: bool = False
    backbone_weights: str | None = None
    grad_clip: float | None = None
    eval_batch_size: int = 32
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    detector_kwargs: dict[str, Any] = field(default_factory=dict)  # more FasterRCNN / RetinaNet arguments
    dataset_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self)  # every field against its annotation, as TrainConfig's
        positive = ("epochs", "batch_size", "eval_batch_size", "lr", "fpn_channels", "anchor_scale")
        checks = [(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}") for name in positive]
        checks += [
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (not (self.nesterov and self.momentum == 0), "nesterov needs momentum > 0"),
            (self.weight_decay >= 0, f"weight_decay must be ≥ 0, got {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be ≥ 0, got {self.warmup_epochs}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (
                self.precision in PRECISIONS,
                f"precision must be one of {', '.join(PRECISIONS[1:])}, got {self.precision!r}",
            ),
            (self.detector in DETECTORS, f"detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}"),
            (self.subset is None or self.subset > 0, f"subset must be > 0, got {self.subset}"),
            (self.min_size is None or self.min_size > 0, f"min_size must be > 0, got {self.min_size}"),
            (self.max_size is None or self.max_size > 0, f"max_size must be > 0, got {self.max_size}"),
            (self.device.split(":")[0] in ("cpu", "cuda"), f"device must be cpu or cuda[:N], got {self.device!r}"),
            *seed_and_split_checks(self.seed, self.val_size),
        ]
        for ok, message in checks:
            if not ok:
                raise AttnlabError(message)
        if self.model not in list_models():
            raise unknown_name("model", self.model, list_models())
        self.precision = resolve_precision(self.precision, self.device)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> DetectConfig:
        try:
            values = upgrade_settings(values)  # ``amp``, the old name of ``precision``
            check_keys(values, [f.name for f in dataclasses.fields(cls)])
            return cls(**values)
        except AttnlabError as e:
            raise AttnlabError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> DetectConfig:
        return cls.from_dict(read_yaml(path), source=str(path))


NEUTRAL = frozenset({"out", "device", "data_dir", "eval_batch_size"})
"""Settings that say where a detection run executes, not what it computes (as `attnlab.train.config.NEUTRAL`)."""
RESUMABLE_CHANGES = NEUTRAL | {"epochs"}
"""What may change when a run is resumed: the neutral settings, and the length (more epochs stretch the schedule)."""
