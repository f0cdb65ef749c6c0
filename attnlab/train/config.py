"""Training configuration: one dataclass, the single source of the defaults, written to ``OUT/config.yaml``.

Default recipe (chosen for small images on a CPU; `benchmarks/train_speed.py` measures it): SGD with Nesterov momentum
0.9, batch 128, peak lr 0.1 reached by a one-epoch linear warm-up and then cosine-decayed to zero, weight decay 5e-4
on conv/linear weights only (none on BN and biases), label smoothing 0.1, random crop with padding and horizontal flips
where the data suits them, channels-last memory format (faster convolutions on CPU and on tensor-core GPUs; not for
AW models, whose batch-folded grouped convolution is 1.5× slower in it on CPU), bf16 autocast where the device has
native bf16 and fp32 elsewhere (`resolve_precision`). ``amp``, the old name of ``precision``, is still read
(`upgrade_settings`), so old config.yaml files load, resume and compare equal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import AttnlabError
from ..io import read_yaml
from ..layers.cram_equivariance import DEFAULT_EQUIVARIANCE_TRANSFORMS, check_transforms
from ..schema import check_fields, check_keys

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LEGACY_AMP = {"off": "fp32", "auto": "auto", "bf16": "bf16", "fp16": "fp16"}
"""``amp`` (the setting ``precision`` replaced) → ``precision``: old config.yaml files and ``--amp`` still work (an old
file's ``amp: auto`` means what it meant then: bf16 on CPU, bf16 or else fp16 on CUDA)."""
SCHEDULES = ("cosine", "onecycle")
NONFINITE = ("stop", "skip")


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes in bf16 natively: a CPU with AVX512_BF16 or AMX-BF16 (x86) or the BF16 extension
    (Arm), as cpuinfo reports it; a CUDA device that supports bf16."""
    if device.split(":")[0] == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return any(capabilities.get(flag) for flag in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` → ``bf16`` autocast where ``device`` has native bf16, else ``fp32``. bf16 trains about 1.4× faster than
    fp32 on this project's AVX-512/AMX CPU at the same validation accuracy (README, "Default recipe"); without native
    support it is emulated and slower, so fp32 there. ``fp16`` needs CUDA (with a gradient scaler)."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "fp16" and device.split(":")[0] != "cuda":
        raise AttnlabError("precision fp16 needs CUDA; on CPU use --precision bf16")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: full fp32)."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def upgrade_settings(values: dict[str, Any]) -> dict[str, Any]:
    """Settings as this version names them: ``amp`` (off, auto, bf16, fp16; before ``precision`` replaced it) becomes
    ``precision``. Old config.yaml files load, resume and count as the same settings through this."""
    if "amp" not in values:
        return values
    values = dict(values)
    amp = values.pop("amp")
    if not isinstance(amp, str) or amp not in LEGACY_AMP:
        raise AttnlabError(f"amp must be one of {', '.join(LEGACY_AMP)}, got {amp!r} (amp is now called precision)")
    precision = LEGACY_AMP[amp]
    if amp == "auto":
        device = str(values.get("device") or "cpu")
        precision = "bf16" if device.split(":")[0] != "cuda" or native_bf16(device) else "fp16"
    if values.setdefault("precision", precision) != precision:
        raise AttnlabError(f"amp: {amp} and precision: {values['precision']} disagree; give precision only")
    return values


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
    precision: str = "auto"  # "auto" becomes bf16 where the device has native bf16, else fp32 (`resolve_precision`)
    compile: bool = False  # torch.compile (inductor) of the model; neutral: same numbers within float tolerance
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
        check_fields(self)  # every field against its annotation: types, finite floats, 64-bit integers
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
            (
                self.precision in PRECISIONS,
                f"precision must be one of {', '.join(PRECISIONS[1:])}, got {self.precision!r}",
            ),
            (self.nonfinite in NONFINITE, f"nonfinite must be one of {', '.join(NONFINITE)}, got {self.nonfinite!r}"),
            (self.equivariance >= 0, f"equivariance must be ≥ 0, got {self.equivariance}"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}"),
            (self.subset is None or self.subset > 0, f"subset must be > 0, got {self.subset}"),
            *seed_and_split_checks(self.seed, self.val_size),
            (self.device.split(":")[0] in ("cpu", "cuda"), f"device must be cpu or cuda[:N], got {self.device!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise AttnlabError(message)
        try:
            self.equivariance_transforms = list(check_transforms(self.equivariance_transforms))
        except AttnlabError as e:
            raise AttnlabError(f"equivariance_transforms: {e}") from None
        self.precision = resolve_precision(self.precision, self.device)
        if self.equivariance > 0 and not self.equivariance_transforms:
            raise AttnlabError("equivariance > 0 needs at least one of equivariance_transforms: hflip, rot90, shift")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | None = "config") -> TrainConfig:
        """The config of ``values`` (setting → value; old names such as ``amp`` upgraded); a bad key or value is one
        line, prefixed with ``source``."""
        try:
            values = upgrade_settings(values)
            check_keys(values, [f.name for f in fields(cls)])
            return cls(**values)
        except AttnlabError as e:
            raise AttnlabError(f"{source}: {e}" if source else str(e)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_yaml(path), source=str(path))

    @classmethod
    def from_flags(cls, flags: Any, saved: str | Path | None = None) -> TrainConfig:
        """Defaults ← ``flags.config`` (a YAML file) or else ``saved`` (a run's own config.yaml, when resuming) ←
        the flags given on the command line (`given_flags`), with ``flags.model_arg``/``data_arg`` (KEY=VALUE pairs)
        and ``flags.in_chans`` merged into the model and dataset options."""
        values: dict[str, Any] = {}
        if getattr(flags, "config", None):
            values = read_yaml(flags.config)
        elif saved is not None and Path(saved).exists():
            values = read_yaml(saved)
        values.update(given_flags(flags))
        model_args = dict(getattr(flags, "model_arg", None) or [])
        if getattr(flags, "in_chans", None) is not None:
            model_args["in_chans"] = flags.in_chans
        for key, extra in (("model_kwargs", model_args), ("dataset_options", getattr(flags, "data_arg", None))):
            given = values.get(key, {})
            values[key] = {**given, **dict(extra or [])} if isinstance(given, dict) else given  # else: the check says
        return cls.from_dict(values, source=getattr(flags, "config", None))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def seed_and_split_checks(seed: int, val_size: int | float | None) -> list[tuple[bool, str]]:
    """(holds, message) checks every run config shares (`TrainConfig`, the detection config): the ranges of the
    seed and of the validation split, whose types the schema has checked already."""
    split_ok = val_size is None or (0 <= val_size < 1 if isinstance(val_size, float) else val_size >= 0)
    return [
        (seed >= 0, f"seed must be ≥ 0, got {seed}"),
        (split_ok, f"val_size must be a count ≥ 0 or a fraction in [0, 1), got {val_size}"),
    ]


NEUTRAL = frozenset({"out", "device", "data_dir", "eval_batch_size", "detect_anomaly", "compile"})
"""Settings that say where and how a run executes, not what it computes: two runs that differ only in these give the
same numbers up to float rounding. A finished run is reused by a comparison when its config differs from the wanted
one only here. ``compile`` is one of them, as ``device`` is: the compiled graph computes the same function with other
kernels, so its numbers agree with eager ones within float tolerance (tested), not bit for bit; a run may be resumed
with or without it (bit-identical resume holds when the setting is kept, as with a device)."""

NEUTRAL_WITHOUT_SKIPS = frozenset({"nonfinite"})
"""Settings that change nothing in a run none of whose steps was non-finite: ``stop`` raises and ``skip`` undoes only
such a step, so a finished run that skipped no step computed exactly what the other choice would have; it is reused
under either (e.g. by a preset that trains every entry with ``nonfinite: skip``)."""

RESUMABLE_CHANGES = NEUTRAL | {"epochs"}
"""What may change when a run is resumed: the neutral settings, and the length (more epochs stretch the schedule)."""

SAME_RECIPE = NEUTRAL | NEUTRAL_WITHOUT_SKIPS | {"epochs", "seed"}
"""Runs whose configs differ only in these are one recipe trained with several seeds (analyses group them); the
non-finite policy too, since a finished run under ``stop`` met no non-finite step: what a ``skip`` run's seeds differ
in is their luck, as with any seed."""

ENTRY_SETTINGS = ("model_kwargs", "dataset_options")
"""Settings given as KEY=VALUE options (``--model-arg``, ``--data-arg``), not as flags of their own."""


def given_flags(flags: Any, exclude: Collection[str] = ()) -> dict[str, Any]:
    """The settings given on a command line: the attributes of ``flags`` (an argparse namespace whose every default is
    None) that name a `TrainConfig` field and are not None; ``--val-size`` ≥ 1 is a count."""
    values = {}
    for f in fields(TrainConfig):
        given = getattr(flags, f.name, None)
        if given is not None and f.name not in exclude and f.name not in ENTRY_SETTINGS:
            values[f.name] = given
    if isinstance(values.get("val_size"), float) and values["val_size"] >= 1 and values["val_size"].is_integer():
        values["val_size"] = int(values["val_size"])  # a count; 32.5 stays a float, which the check refuses
    return values


def first_difference(saved: dict[str, Any], wanted: dict[str, Any], may_differ: frozenset[str]) -> tuple | None:
    """The first setting on which two configs differ, as ``(key, saved value, wanted value)``, ignoring the keys in
    ``may_differ``; None when they agree. Resuming a run and reusing a finished one both ask this."""
    saved, wanted = upgrade_settings(saved), upgrade_settings(wanted)
    for key in dict.fromkeys([*saved, *wanted]):
        if key not in may_differ and saved.get(key) != wanted.get(key):
            return key, saved.get(key), wanted.get(key)
    return None
