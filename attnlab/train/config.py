"""Run configuration: one dataclass per kind of run, the single source of the defaults and of the command-line flags,
written to ``OUT/config.yaml``.

`RunConfig` holds what every run shares (model, data, optimiser, schedule, precision, mechanisms' options, the
non-finite policy); `TrainConfig` (classifiers) and `attnlab.detection.DetectConfig` add their own fields. Each field's
metadata carries its help text, so that ``attnlab train`` and ``attnlab detect train`` generate their flags from the
dataclass (`attnlab.cli.common.add_config_flags`) and cannot drift from it. This module imports no torch and no layer:
a mechanism's options are checked against the mechanism's own declaration by the engine, before any work
(`attnlab.layers.hooks.check_mechanisms`).

Default recipe for classifiers (chosen for small images on a CPU; `benchmarks/train_speed.py` measures it): SGD with
Nesterov momentum 0.9, batch 128, peak lr 0.1 reached by a one-epoch linear warm-up and then cosine-decayed to zero,
weight decay 5e-4 on conv/linear weights only (none on BN and biases), label smoothing 0.1, random crop with padding
and horizontal flips where the data suits them, channels-last memory format (not for AW models, whose batch-folded
grouped convolution is slower in it on CPU), bf16 autocast where the device has native bf16 and fp32 elsewhere
(`resolve_precision`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..errors import AttnlabError
from ..io import read_yaml
from ..schema import check_fields, check_keys

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "onecycle")
NONFINITE = ("stop", "skip")


def setting(default: Any = dataclasses.MISSING, *, help: str, group: str = "recipe", **meta: Any) -> Any:
    """A config field with what its command-line flag needs: ``help``, the flag's ``group``, and optionally
    ``choices``, ``flag`` (another flag name, e.g. ``--model-arg`` for ``model_kwargs``) and ``metavar``. A list or
    dict default is copied for every instance."""
    metadata = {"help": help, "group": group, **meta}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def redefault(base: type, name: str, default: Any) -> Any:
    """Field ``name`` of config class ``base`` with another default (a subclass's recipe), its flag metadata kept."""
    return setting(default, **base.__dataclass_fields__[name].metadata)


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes in bf16 natively: a CPU with AVX512_BF16 or AMX-BF16 (x86) or the BF16 extension
    (Arm), as cpuinfo reports it; a CUDA device that supports bf16."""
    import torch

    if device.split(":")[0] == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return any(capabilities.get(flag) for flag in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` → ``bf16`` autocast where ``device`` has native bf16, else ``fp32`` (emulated bf16 is slower than
    fp32; docs/MEASUREMENTS.md has the numbers). ``fp16`` needs CUDA (with a gradient scaler)."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "fp16" and device.split(":")[0] != "cuda":
        raise AttnlabError("precision fp16 needs CUDA; on CPU use --precision bf16")
    return precision


def autocast_dtype(precision: str):
    """The autocast dtype (a ``torch.dtype``) of a resolved precision (None: full fp32)."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0}


def checkpoint_interval(value: str | int) -> tuple[str, float] | None:
    """``checkpoint_every`` read: ``("steps", N)`` for a positive integer, ``("seconds", T)`` for a positive number
    followed by ``s``, ``min`` or ``h``; None when it is neither."""
    text = str(value).strip().lower()
    if text.isdigit():
        return ("steps", float(int(text))) if int(text) > 0 else None
    for unit, scale in _UNITS.items():
        number = text.removesuffix(unit)
        if number != text:
            try:
                seconds = float(number) * scale
            except ValueError:
                return None
            return ("seconds", seconds) if 0 < seconds < float("inf") else None
    return None


def _positive(value: float) -> str:
    return f"{'≥ 1' if isinstance(value, int) else '> 0'}, got {value}"


@dataclass
class RunConfig:
    """What every kind of run shares. Field names are the CLI flags (``--batch-size`` → ``batch_size``)."""

    model: str = setting(
        "resnet20",
        group="run",
        help="model name (see `attnlab models`) or an entry as compare writes it, NAME[key=value,...]",
    )
    weights: str | None = setting(
        None,
        group="options",
        metavar="FILE",
        help="start the model from this weights file: safetensors or a state dict (.pth/.pt/.bin, timm's and "
        "torchvision's checkpoints too); a classifier of another size is re-initialised",
    )
    pretrained: bool = setting(
        False,
        group="options",
        help="start the model from its own downloaded weights (timm's or torchvision's; an attnlab ImageNet variant "
        "from its base network's); offline, pass --weights FILE",
    )
    dataset: str = setting("fashion-mnist", group="run", help="dataset name (see `attnlab data`)")
    data_dir: str | None = setting(
        None, group="run", help="folder holding the dataset files (else $ATTNLAB_DATA, then system paths)"
    )
    out: str = setting("runs/latest", group="run", help="run folder; an existing run is never overwritten")
    seed: int = setting(0, group="run", help="seed of the initialisation, batch order and augmentation")
    subset: int | None = setting(None, group="run", help="train on the first N images of a seeded shuffle (quick runs)")
    val_size: int | float | None = setting(
        None, group="run", help="validation images carved from train (a count, or a fraction if < 1)"
    )
    device: str = setting("cpu", group="run", help="cpu or cuda[:N]")
    precision: str = setting(
        "auto",
        group="run",
        choices=PRECISIONS,
        help="fp32, or bf16/fp16 autocast (fp16: CUDA only); auto: bf16 where the CPU (AVX512_BF16, AMX) or GPU has "
        "native bf16, else fp32",
    )
    epochs: int = setting(15, help="epochs to train")
    batch_size: int = setting(128, help="training batch size (over every process together)")
    eval_batch_size: int = setting(512, help="batch size of validation and test (does not change the numbers)")
    lr: float = setting(0.1, help="peak learning rate")
    momentum: float = setting(0.9, help="SGD momentum")
    nesterov: bool = setting(True, help="Nesterov momentum")
    weight_decay: float = setting(5e-4, help="weight decay, on conv/linear weights only (never on BN or biases)")
    schedule: str = setting("cosine", choices=SCHEDULES, help="learning-rate schedule after the warm-up")
    warmup_epochs: float = setting(1.0, help="epochs of linear learning-rate warm-up")
    grad_clip: float | None = setting(None, help="clip the global gradient norm to this")
    ema_decay: float | None = setting(
        None,
        help="also keep an exponential moving average of the weights (timm's ModelEmaV3) with this decay per optimiser "
        "step, e.g. 0.999: validated, tested and saved beside the raw weights (val_ema_*, test_ema_*, "
        "model_ema.safetensors)",
    )
    accumulate: int = setting(
        1,
        help="batches per optimiser step, their gradients summed (loss / N): the step of a batch N × --batch-size "
        "in the memory of one; the schedule counts optimiser steps",
    )
    nonfinite: str = setting(
        "stop", choices=NONFINITE, help="on a NaN/Inf loss or gradients: stop the run, or skip the step"
    )
    checkpoint_every: str | int | None = setting(
        None,
        group="run",
        metavar="N|T",
        help="also checkpoint inside epochs: every N optimiser steps (500) or every T of wall time (10min, 90s, 2h); "
        "a run resumes from the newest, on the very batch it stopped at",
    )
    detect_anomaly: bool = setting(False, group="run", help="autograd anomaly mode: names the op of a NaN (slow)")
    model_kwargs: dict[str, Any] = setting(
        {}, group="options", flag="--model-arg", help="model option, e.g. merge=gate, attn_layer=se"
    )
    dataset_options: dict[str, Any] = setting(
        {}, group="options", flag="--data-arg", help="dataset option, e.g. canvas=64 for cluttered-fashion-mnist"
    )
    mechanisms: dict[str, dict[str, Any]] = setting(
        {},
        group="options",
        flag="--mechanism",
        metavar="MECH.OPTION=VALUE",
        help="a mechanism's training option, e.g. cram.equivariance=0.1 (see `attnlab.layers.hooks`)",
    )

    POSITIVE: ClassVar[tuple[str, ...]] = ("epochs", "batch_size", "eval_batch_size", "lr", "accumulate")

    def __post_init__(self) -> None:
        check_fields(self)  # every field against its annotation: types, finite floats, 64-bit integers
        for ok, message in self.checks():
            if not ok:
                raise AttnlabError(message)
        self.precision = resolve_precision(self.precision, self.device)

    def checks(self) -> list[tuple[bool, str]]:
        """(holds, message) range checks beyond the annotations; a subclass adds its own."""
        split_ok = self.val_size is None or (
            0 <= self.val_size < 1 if isinstance(self.val_size, float) else self.val_size >= 0
        )
        return [
            *[(getattr(self, n) > 0, f"{n} must be {_positive(getattr(self, n))}") for n in self.POSITIVE],
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (not (self.nesterov and self.momentum == 0), "nesterov needs momentum > 0"),
            (self.weight_decay >= 0, f"weight_decay must be ≥ 0, got {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be ≥ 0, got {self.warmup_epochs}"),
            *[
                (getattr(self, n) in allowed, f"{n} must be one of {', '.join(shown)}, got {getattr(self, n)!r}")
                for n, allowed, shown in (
                    ("schedule", SCHEDULES, SCHEDULES),
                    ("precision", PRECISIONS, PRECISIONS[1:]),
                    ("nonfinite", NONFINITE, NONFINITE),
                )
            ],
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}"),
            (self.ema_decay is None or 0 < self.ema_decay < 1, f"ema_decay must be in (0, 1), got {self.ema_decay}"),
            (self.subset is None or self.subset > 0, f"subset must be > 0, got {self.subset}"),
            (self.seed >= 0, f"seed must be ≥ 0, got {self.seed}"),
            (split_ok, f"val_size must be a count ≥ 0 or a fraction in [0, 1), got {self.val_size}"),
            (self.device.split(":")[0] in ("cpu", "cuda"), f"device must be cpu or cuda[:N], got {self.device!r}"),
            (
                self.checkpoint_every is None or checkpoint_interval(self.checkpoint_every) is not None,
                "checkpoint_every must be a number of steps (500) or a duration (10min, 90s, 2h), "
                f"got {self.checkpoint_every!r}",
            ),
            (not (self.pretrained and self.weights), "pretrained and weights exclude each other: pass one of them"),
        ]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | None = "config"):
        """The config of ``values`` (setting → value); a bad key or value is one line, prefixed with ``source``."""
        try:
            check_keys(values, [f.name for f in fields(cls)])
            return cls(**values)
        except AttnlabError as e:
            raise AttnlabError(f"{source}: {e}" if source else str(e)) from None

    @classmethod
    def from_yaml(cls, path: str | Path):
        return cls.from_dict(read_yaml(path), source=str(path))

    @classmethod
    def from_flags(cls, flags: Any, saved: str | Path | None = None):
        """Defaults ← ``flags.config`` (a YAML file) or else ``saved`` (a run's own config.yaml, when resuming) ←
        the flags given on the command line (`given_flags`): a flag left out changes nothing, and KEY=VALUE pairs of
        a mapping field are merged into the file's mapping."""
        values: dict[str, Any] = {}
        if getattr(flags, "config", None):
            values = read_yaml(flags.config)
        elif saved is not None and Path(saved).exists():
            values = read_yaml(saved)
        for key, given in given_flags(flags, config=cls).items():
            values[key] = merged(values.get(key), given)
        return cls.from_dict(values, source=getattr(flags, "config", None))


def merged(base: Any, given: Any) -> Any:
    """``given`` over ``base``: mappings merged key by key (a mechanism's options one by one), anything else
    replaced. A ``base`` that is not a mapping is kept for the config's check to name."""
    if not (isinstance(base, dict) and isinstance(given, dict)):
        return base if isinstance(given, dict) and base is not None else given
    return {**base, **{k: merged(base.get(k), v) if isinstance(base.get(k), dict) else v for k, v in given.items()}}


@dataclass
class TrainConfig(RunConfig):
    """Everything that defines a classifier's training run."""

    label_smoothing: float = setting(0.1, help="label smoothing of the cross-entropy")
    augment: bool = setting(True, help="random crop with padding and horizontal flips, where the data suits them")
    compile: bool = setting(
        False,
        group="run",
        help="torch.compile the model (inductor); falls back to eager, with one warning, where it cannot compile",
    )
    channels_last: bool | None = setting(
        None, group="run", help="channels-last memory format (default: unless a mechanism is slower in it)"
    )

    def checks(self) -> list[tuple[bool, str]]:
        ok = 0 <= self.label_smoothing < 1
        return [*super().checks(), (ok, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")]


def mapping_pairs(pairs: list[tuple[str, Any]], nested: bool) -> dict[str, Any]:
    """KEY=VALUE pairs of a flag as the mapping they set; ``nested``: keys are ``NAME.OPTION`` (``--mechanism
    cram.equivariance=0.1`` → ``{"cram": {"equivariance": 0.1}}``)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if not nested:
            out[key] = value
            continue
        name, dot, option = key.partition(".")
        if not dot or not name or not option:
            raise AttnlabError(f"{key}={value}: expected MECHANISM.OPTION=VALUE, e.g. cram.equivariance=0.1")
        out.setdefault(name, {})[option] = value
    return out


def given_flags(flags: Any, exclude: Collection[str] = (), config: type = TrainConfig) -> dict[str, Any]:
    """The settings given on a command line: the attributes of ``flags`` (an argparse namespace whose every default is
    None, or [] for KEY=VALUE flags) that name a field of ``config`` and are not None or empty, the KEY=VALUE pairs as
    mappings; ``--val-size`` ≥ 1 is a count."""
    values = {}
    for f in fields(config):
        given = getattr(flags, f.name, None)
        if f.name in exclude or given is None or given == []:
            continue
        if isinstance(given, list) and f.metadata.get("flag"):
            given = mapping_pairs(given, nested=f.name == "mechanisms")
        values[f.name] = given
    if isinstance(values.get("val_size"), float) and values["val_size"] >= 1 and values["val_size"].is_integer():
        values["val_size"] = int(values["val_size"])  # a count; 32.5 stays a float, which the check refuses
    return values


NEUTRAL = frozenset({"out", "device", "data_dir", "eval_batch_size", "detect_anomaly", "compile", "checkpoint_every"})
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


def first_difference(
    saved: dict[str, Any], wanted: dict[str, Any], may_differ: frozenset[str], config: type | None = None
) -> tuple | None:
    """The first setting on which two configs differ, as ``(key, saved value, wanted value)``, ignoring the keys in
    ``may_differ``; None when they agree. Resuming a run and reusing a finished one both ask this. A setting the saved
    config lacks is, given ``config`` (the run-config class), that class's default: the run predates the setting and
    ran as its default does (``weights``, ``pretrained``)."""
    defaults = _defaults(config) if config is not None else {}
    for key in dict.fromkeys([*saved, *wanted]):
        before = saved.get(key, defaults.get(key))
        if key not in may_differ and before != wanted.get(key):
            return key, before, wanted.get(key)
    return None


def _defaults(config: type) -> dict[str, Any]:
    return {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in fields(config)
    }
