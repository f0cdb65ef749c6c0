"""Training configuration: one dataclass, the single source of the defaults, written to ``OUT/config.yaml``.

Default recipe (chosen for small images on a CPU; `benchmarks/train_speed.py` measures it): SGD with Nesterov momentum
0.9, batch 128, peak lr 0.1 reached by a one-epoch linear warm-up and then cosine-decayed to zero, weight decay 5e-4
on conv/linear weights only (none on BN and biases), label smoothing 0.1, random crop with padding and horizontal flips
where the data suits them, channels-last memory format (faster convolutions on CPU and on tensor-core GPUs; not for
AW models, whose batch-folded grouped convolution is 1.5× slower in it on CPU).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import AttnlabError
from ..layers.cram import DEFAULT_EQUIVARIANCE_TRANSFORMS, check_transforms

AMP_CHOICES = ("off", "auto", "bf16", "fp16")
SCHEDULES = ("cosine", "onecycle")
NONFINITE = ("stop", "skip")


@dataclass
class TrainConfig:
    """Everything that defines a training run. Field names are the CLI flags (``--batch-size`` → ``batch_size``)."""

    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    out: str = "runs/latest"
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    augment: bool = True
    seed: int = 0
    subset: int | None = None
    val_size: int | float | None = None
    device: str = "cpu"
    amp: str = "off"
    channels_last: bool | None = None  # None: channels-last unless the model has AW convolutions (slower there)
    equivariance: float = 0.0
    equivariance_transforms: list[str] = field(default_factory=lambda: list(DEFAULT_EQUIVARIANCE_TRANSFORMS))
    grad_clip: float | None = None
    nonfinite: str = "stop"
    detect_anomaly: bool = False
    eval_batch_size: int = 512
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be ≥ 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be ≥ 1, got {self.eval_batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (not (self.nesterov and self.momentum == 0), "nesterov needs momentum > 0"),
            (self.weight_decay >= 0, f"weight_decay must be ≥ 0, got {self.weight_decay}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be ≥ 0, got {self.warmup_epochs}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.amp in AMP_CHOICES, f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}"),
            (self.nonfinite in NONFINITE, f"nonfinite must be one of {', '.join(NONFINITE)}, got {self.nonfinite!r}"),
            (self.equivariance >= 0, f"equivariance must be ≥ 0, got {self.equivariance}"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}"),
            (self.subset is None or self.subset > 0, f"subset must be > 0, got {self.subset}"),
            (self.device.split(":")[0] in ("cpu", "cuda"), f"device must be cpu or cuda[:N], got {self.device!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise AttnlabError(message)
        self.equivariance_transforms = list(check_transforms(self.equivariance_transforms))
        if self.equivariance > 0 and not self.equivariance_transforms:
            raise AttnlabError("equivariance > 0 needs at least one of equivariance_transforms: hflip, rot90, shift")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            from ..errors import unknown_name

            raise AttnlabError(f"{source}: {unknown_name('setting', unknown[0], known)}")
        try:
            return cls(**values)
        except TypeError as e:
            raise AttnlabError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_yaml(path), source=str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``, or a one-line `AttnlabError` saying what is wrong with the file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise AttnlabError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise AttnlabError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise AttnlabError(f"{path}: a config must be a mapping of settings, got {type(values).__name__}")
    return values


# Settings that may differ between a run and its resumption (they do not change the numbers a run computes).
RESUMABLE_CHANGES = frozenset({"out", "device", "epochs", "data_dir", "eval_batch_size", "detect_anomaly"})


def first_difference(saved: dict[str, Any], wanted: dict[str, Any], may_differ: frozenset[str]) -> tuple | None:
    """The first setting on which two configs differ, as ``(key, saved value, wanted value)``, ignoring the keys in
    ``may_differ``; None when they agree. Resuming a run and reusing a finished one both ask this."""
    for key in dict.fromkeys([*saved, *wanted]):
        if key not in may_differ and saved.get(key) != wanted.get(key):
            return key, saved.get(key), wanted.get(key)
    return None
