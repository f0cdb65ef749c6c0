"""CRAM's equivariance constraint: grid transforms of the input, the penalty that asks a rectangle to move with them,
and CRAM's training hook (which anneals β and adds the weighted penalty to the loss).

Nguyen et al., arXiv 2503.10875 (see `cram`); the constraint (transform the input and the rectangle moves the same
way) comes from secondary summaries of the paper. Our reading: `equivariance_penalty` compares, for every CRAM in a
model, the rectangle of T(x) with the rectangle of x moved by T, for a random T made of a horizontal flip and a
whole-pixel translation (quarter turns are an option: out of distribution for upright images), by centre and extent
matrix (`cram_geometry.extent_matrix`). A rectangle covering the whole map cannot follow a translation, so the
translation term also favours localised rectangles (``max_shift=0`` or no ``"shift"`` keeps only flips and quarter
turns).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AttnlabError, unknown_name
from ..schema import Range
from .cram import anneal_beta, capture_rectangles, has_cram
from .cram_geometry import extent_matrix
from .hooks import StepHook

FILLS = ("zero", "circular")
Transform = Literal["hflip", "rot90", "shift"]
EQUIVARIANCE_TRANSFORMS: tuple[str, ...] = typing.get_args(Transform)
"""Grid transforms the equivariance term can draw from: a horizontal flip, quarter turns, whole-pixel shifts."""
DEFAULT_EQUIVARIANCE_TRANSFORMS: tuple[str, ...] = ("hflip", "shift")
"""The training default: what keeps an upright image in its distribution (the augmentation already flips and shifts)."""


@dataclass(frozen=True)
class GridTransform:
    """A transform of images that maps the pixel grid onto itself, and its action on rectangles.

    Applied in this order: a horizontal flip (if ``flip``), ``turns`` quarter turns as ``torch.rot90(x, turns,
    (-2, -1))``, then a translation by ``shift`` = (dy, dx) input pixels, filling with zeros (``fill="zero"``) or
    wrapping around (``"circular"``).
    """

    flip: bool = False
    turns: int = 0
    shift: tuple[int, int] = (0, 0)
    fill: str = "zero"

    def __call__(self, x: Tensor) -> Tensor:
        if self.flip:
            x = x.flip(-1)
        x = torch.rot90(x, self.turns % 4, (-2, -1))
        dy, dx = self.shift
        if self.fill == "circular":
            return torch.roll(x, (dy, dx), (-2, -1))
        return F.pad(x, (dx, -dx, dy, -dy))  # negative padding crops: a shift with zero fill

    def linear(self, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
        """The 2×2 matrix A with (u, v) ↦ A (u, v) in normalised coordinates (no translation)."""
        quarter = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=dtype, device=device)  # rot90: (u, v) ↦ (v, -u)
        a = torch.linalg.matrix_power(quarter, self.turns % 4)
        return a @ torch.diag(torch.tensor([-1.0 if self.flip else 1.0, 1.0], dtype=dtype, device=device))

    def move(
        self, center: Tensor, extent: Tensor, map_size: tuple[int, int], stride: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """(center, extent) of a rectangle on a feature map of x, moved to the feature map of T(x).

        Args:
            center: B×2 centres on the feature map of x.
            extent: B×2×2 extent matrices (`extent_matrix`).
            map_size: (h, w) of the feature map of T(x).
            stride: (sy, sx) input pixels per feature pixel of that map.
        """
        a = self.linear(dtype=center.dtype, device=center.device)
        dy, dx = self.shift
        offset = center.new_tensor([2 * dx / stride[1] / map_size[1], 2 * dy / stride[0] / map_size[0]])
        return center @ a.T + offset, a @ extent @ a.T


def random_transform(
    generator: torch.Generator,
    size: tuple[int, int],
    *,
    step: int = 1,
    flips: bool = True,
    rotations: bool = True,
    max_shift: float = 0.15,
    fill: str = "zero",
) -> GridTransform:
    """A `GridTransform` for H×W = ``size`` inputs, uniform over the allowed ones other than the identity (which
    would teach nothing; the identity only when nothing else is allowed).

    Allowed: a horizontal flip, 0-3 quarter turns, and translations by multiples of ``step`` pixels (a network's
    largest stride, so every layer moves by whole pixels) up to max_shift·min(H, W) along each axis — ±4 pixels on
    28-32 pixel images at stride 4, as the usual pad-4 random crop.
    """
    if fill not in FILLS:
        raise unknown_name("translation fill", fill, FILLS)
    n = int(max_shift * min(size) // step)
    counts = (2 if flips else 1, 4 if rotations else 1, 2 * n + 1, 2 * n + 1)
    total = math.prod(counts)
    index = int(torch.randint(1, total, (), generator=generator, device=generator.device)) if total > 1 else 0
    flip, turns, dy, dx = (index // math.prod(counts[k + 1 :]) % counts[k] for k in range(4))  # index 0: identity
    dy, dx = ((d + n) % (2 * n + 1) - n for d in (dy, dx))
    return GridTransform(bool(flip), turns, (step * dy, step * dx), fill)


def _stride(image_size: tuple[int, ...], map_size: tuple[int, ...]) -> tuple[int, ...]:
    """Input pixels per feature pixel along each axis: the rounded size ratio (ceil-mode convs give 37 → 19 → 10)."""
    return tuple(max(1, round(i / m)) for i, m in zip(image_size, map_size))


def check_transforms(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, each one of `EQUIVARIANCE_TRANSFORMS` (one-line error otherwise)."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise AttnlabError(f"equivariance transforms must be a list of names, got {names!r}")
    for name in names:
        if name not in EQUIVARIANCE_TRANSFORMS:
            raise unknown_name("equivariance transform", name, EQUIVARIANCE_TRANSFORMS)
    return tuple(names)


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextmanager
def _running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers keep normalising with the batch's own statistics (training mode) but do not update their
    running statistics: an extra forward (the penalty's T(x)) must not count as data the network saw twice."""
    norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def equivariance_penalty(
    model: nn.Module,
    x: Tensor,
    generator: torch.Generator,
    *,
    rectangles: list[dict[str, Tensor]] | None = None,
    transforms: Sequence[str] = DEFAULT_EQUIVARIANCE_TRANSFORMS,
    max_shift: float = 0.15,
    fill: str = "zero",
) -> Tensor:
    """Mean over CRAM layers of E_batch ‖ρ(T)·r(x) − r(T x)‖² for one random grid transform T (`random_transform`).

    Runs ``model`` on T(x), and on x unless ``rectangles`` (what `capture_rectangles` caught during the caller's own
    forward of x) is given, in the model's current mode, without updating BatchNorm running statistics
    (`_running_stats_frozen`), and compares each CRAM's rectangles by centre and extent matrix (`extent_matrix`). T is
    drawn from ``transforms`` (among ``hflip``, ``rot90``, ``shift``; default: flips and shifts, as upright images
    allow — a quarter turn is out of their distribution). A layer's stride is the rounded ratio of input size to its
    map size; translations are whole multiples of the largest stride (up to ``max_shift`` of the side), so every
    layer moves by whole pixels. Returns a 0-dim tensor (0 without CRAM layers), differentiable through both forwards.
    """
    transforms = check_transforms(transforms)
    if not has_cram(model):
        return x.new_zeros(())
    if rectangles is None:
        with capture_rectangles(model) as rectangles:
            model(x)
    rectangles = list(rectangles)  # a snapshot: called inside the caller's capture, the list also grows with T(x)'s
    if not rectangles:
        raise AttnlabError("no CRAM rectangles for x: capture them with capture_rectangles(model) around model(x)")
    size = tuple(x.shape[-2:])
    step = max(max(_stride(size, r["mask"].shape[-2:])) for r in rectangles)
    transform = random_transform(
        generator,
        size,
        step=step,
        flips="hflip" in transforms,
        rotations="rot90" in transforms,
        max_shift=max_shift if "shift" in transforms else 0.0,
        fill=fill,
    )
    moved_x = transform(x)
    with capture_rectangles(model) as moved, _running_stats_frozen(model):
        model(moved_x)
    if len(moved) != len(rectangles):
        raise AttnlabError(f"got {len(rectangles)} CRAM rectangles for x but {len(moved)} for T(x)")
    terms = []
    for r, rt in zip(rectangles, moved):
        map_size = tuple(rt["mask"].shape[-2:])
        center, extent = transform.move(
            r["center"], extent_matrix(r["size"], r["angle"]), map_size, _stride(tuple(moved_x.shape[-2:]), map_size)
        )
        d_center = (center - rt["center"]).pow(2).sum(1)
        d_extent = (extent - extent_matrix(rt["size"], rt["angle"])).pow(2).sum((1, 2))
        terms.append((d_center + d_extent).mean())
    return torch.stack(terms).mean()


class CramTraining(StepHook):
    """CRAM's part in a training run: anneal every mask's sharpness over the run and, with weight λ > 0, add
    λ·`equivariance_penalty` over ``transforms``, computed from the rectangles of the training forward itself (one
    extra forward on T(x), through the bare model, so under DDP each rank makes its own)."""

    def __init__(self, model: nn.Module, weight: float, transforms: Sequence[str] = DEFAULT_EQUIVARIANCE_TRANSFORMS):
        super().__init__()
        self.model, self.weight, self.transforms = model, weight, tuple(transforms)
        self.rectangles: list[dict[str, Tensor]] | None = None

    def before_step(self, progress: float) -> None:
        anneal_beta(self.model, progress)

    @contextmanager
    def watch(self) -> Iterator[None]:
        if not self.weight:
            yield
            return
        with capture_rectangles(self.model) as seen:  # only this forward's: the penalty's own forward stays out
            self.rectangles = seen
            yield

    def extra_loss(self, x: Tensor, generator: torch.Generator) -> Tensor | None:
        if not self.weight:
            return None
        return self.weight * equivariance_penalty(
            self.model, x, generator, rectangles=self.rectangles, transforms=self.transforms
        )


def cram_training(
    model: nn.Module,
    *,
    equivariance: Annotated[float, Range(0)] = 0.0,
    transforms: Sequence[Transform] = DEFAULT_EQUIVARIANCE_TRANSFORMS,
) -> CramTraining | None:
    """CRAM's training hook for ``model`` (None without CRAM layers): β annealed over the run, and the equivariance
    penalty with weight ``equivariance`` over the grid ``transforms`` (the ``mechanisms.cram`` options of a run)."""
    if equivariance > 0 and not transforms:
        raise AttnlabError("mechanisms.cram.equivariance > 0 needs at least one transform among hflip, rot90, shift")
    return CramTraining(model, equivariance, transforms) if has_cram(model) else None


__all__ = [
    "DEFAULT_EQUIVARIANCE_TRANSFORMS",
    "EQUIVARIANCE_TRANSFORMS",
    "CramTraining",
    "GridTransform",
    "check_transforms",
    "cram_training",
    "equivariance_penalty",
    "random_transform",
]
