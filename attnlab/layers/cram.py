"""CRAM: spatial attention restricted to one soft, rotated rectangle per sample.

Nguyen et al., "Convolutional Rectangular Attention Module", arXiv 2503.10875. Provenance, honestly: the abstract
(all we have of the paper) says the attended region is a rectangle, predicted by the module and turned into a smooth
mask, trained end to end, more stable and interpretable than position-wise attention. The five parameters with an
*angle* and the *equivariance constraint* (transform the input and the rectangle moves the same way) come from
secondary summaries of the paper, not from its abstract. Everything below that is *our reading*:

- Coordinates are normalised like ``F.affine_grid(..., align_corners=False)``: pixel centres at ``(2j + 1)/W - 1``, so
  u (along the width) and v (along the height) lie in (-1, 1); the centre (cx, cy) is in these units and the sides
  (w, h) too (2 = the whole map). On a non-square map a rectangle in these units is a parallelogram in pixels, exactly
  as for ``affine_grid``; the angle θ turns the u axis towards the v axis and lies in (-π/2, π/2].
- Mask: with u' = cosθ(u-cx) + sinθ(v-cy) and v' = -sinθ(u-cx) + cosθ(v-cy),
  m = σ(β(w/2 - |u'|)) · σ(β(h/2 - |v'|)); β (per normalised unit) sets the edge sharpness and can be annealed.
- Two predictors of the rectangle, both batched:
  ``"moments"`` (default): a position-wise score map (``score="conv"``: a standardised 1×1 conv; ``score="pool"``: a
  standardised k×k conv over CBAM's channel mean/max; either times a learnt sharpness), softmax-normalised over
  positions; the rectangle is the one with the same centre of mass and covariance as that distribution, each pixel
  counted as a uniform square cell (so a uniform map over a pixel-aligned rectangle gives back exactly that
  rectangle, and a 1×1 map gives the whole map); the sides are 2√(3λ) of the covariance's eigenvalues, θ the major
  axis. Exactly equivariant to flips, quarter turns and translations of the score map. ``"regress"``: adaptive
  average pooling to a g×g grid and a two-layer MLP with bounded outputs (tanh centre, sides in (min_size, 2),
  θ = π/2·tanh).
- ``apply="mul"`` gives x ⊙ m like the position-wise baseline (`spatial.py`); ``apply="residual"`` gives x ⊙ (1 + m).
- Equivariance constraint: `equivariance_penalty` compares, for every CRAM in a model, the rectangle of T(x) with
  the rectangle of x moved by T, for a random T made of a horizontal flip and a whole-pixel translation (quarter turns
  are an option: out of distribution for upright images).
  Rectangles are compared by centre and the symmetric extent matrix E = R diag(w/2, h/2) Rᵀ, which is the same for
  the equivalent parametrisations (w, h, θ), (h, w, θ ± π/2) and (w, h, θ ± π), and is in the units of the centre.
  A rectangle covering the whole map cannot follow a translation, so the translation term also favours localised
  rectangles (``max_shift=0`` or no ``"shift"`` keeps only flips and quarter turns).
- Known limit of the rectangle reading: at equal eigenvalues (a square) the angle is undefined; θ is set to 0 there,
  so the mask of a near-square rectangle can jump (a square turned by 45°) and the angle's gradient grows like
  1/(λ₊ - λ₋) close to it. ``rotate=False`` (axis-aligned rectangles) has no such point.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AttnlabError, unknown_name
from .hooks import StepHook, register_training_hook
from .probe import AttentionProbe
from .spatial import channel_pool

PREDICTORS = ("moments", "regress")
APPLY_MODES = ("mul", "residual")
SCORES = ("pool", "conv")
FILLS = ("zero", "circular")
_ISOTROPY_TOL = 1e-5  # eigenvalue gap (relative to the trace) below which the angle is undefined and set to 0


def pixel_centers(n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalised pixel-centre coordinates ``(2j + 1 - n) / n`` of a side of n pixels (exactly antisymmetric)."""
    return (2 * torch.arange(n, device=device, dtype=dtype) + 1 - n) / n


def rectangle_from_scores(scores: Tensor, min_size: float = 0.0, rotate: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The rectangle with the centre of mass and covariance of ``softmax(scores)`` over positions.

    Each pixel is a uniform cell of side 2/W × 2/H, which adds diag(1/(3W²), 1/(3H²)) to the covariance of the pixel
    centres; ``min_size`` adds the covariance of a min_size-wide square, so every side is at least min_size. With
    eigenvalues λ₊ ≥ λ₋ of the covariance, w = 2√(3λ₊), h = 2√(3λ₋), and θ points along the major axis (0 where the
    covariance is isotropic; the gradient there is 0, not NaN).

    Args:
        scores: B×H×W or B×1×H×W logits (``-inf`` allowed outside the region of interest).
        min_size: smallest side, in normalised units.
        rotate: if False, the rectangle is axis-aligned (θ = 0, sides from the variances along u and v).

    Returns:
        center B×2 (cx, cy), size B×2 (w, h), angle B.
    """
    if scores.dim() == 4:
        scores = scores.squeeze(1)
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    if not torch.jit.is_scripting():  # (TorchScript compiles no autocast here)
        if torch.amp.is_autocast_available(scores.device.type):  # the meta device has no autocast to turn off
            with torch.autocast(scores.device.type, enabled=False):
                return _moments_rectangle(scores, min_size, rotate)
    return _moments_rectangle(scores, min_size, rotate)


def _moments_rectangle(
    scores: Tensor, min_size: float, rotate: bool, isotropy_tol: float = _ISOTROPY_TOL
) -> tuple[Tensor, Tensor, Tensor]:
    b, height, width = scores.shape
    p = torch.softmax(scores.reshape(b, -1), dim=1)
    u = pixel_centers(width, device=p.device, dtype=p.dtype).repeat(height)  # row-major, like p
    v = pixel_centers(height, device=p.device, dtype=p.dtype).repeat_interleave(width)
    # all five raw moments in one matmul; the cancellation in E[u²] - cx² is ~1e-7 in float32, far below the cell term
    cx, cy, uu, vv, uv = (p @ torch.stack([u, v, u * u, v * v, u * v], dim=1)).unbind(1)
    spread = min_size**2 / 12
    var_u = uu - cx * cx + (1 / (3 * width**2) + spread)
    var_v = vv - cy * cy + (1 / (3 * height**2) + spread)
    center = torch.stack([cx, cy], dim=1)
    if not rotate:
        return center, 2 * torch.sqrt(3 * torch.stack([var_u, var_v], dim=1)), torch.zeros_like(cx)
    cov = uv - cx * cy
    half_diff, mean = (var_u - var_v) / 2, (var_u + var_v) / 2
    gap2 = half_diff**2 + cov**2
    isotropic = gap2 <= (isotropy_tol * mean) ** 2
    # where() on the inputs as well as the outputs keeps the gradient finite at the isotropic point
    gap = torch.where(isotropic, 0.0, torch.sqrt(torch.where(isotropic, 1.0, gap2)))
    angle = torch.where(isotropic, 0.0, 0.5 * torch.atan2(cov, torch.where(isotropic, 1.0, half_diff)))
    eig = torch.stack([mean + gap, (mean - gap).clamp_min(spread + 1 / (3 * max(height, width) ** 2))], dim=1)
    return center, 2 * torch.sqrt(3 * eig), angle


def rectangle_mask(
    center: Tensor, size: Tensor, angle: Tensor | None, height: int, width: int, beta: Tensor | float
) -> Tensor:
    """Soft mask σ(β(w/2 - |u'|)) · σ(β(h/2 - |v'|)) of each rectangle on an H×W pixel-centre grid, B×1×H×W.

    ``angle=None`` means axis-aligned (θ = 0): the mask is then the outer product of one sigmoid profile along each
    axis, W + H sigmoids per sample instead of 2·H·W (the same numbers as θ = 0).
    """
    u = pixel_centers(width, device=center.device, dtype=center.dtype)
    v = pixel_centers(height, device=center.device, dtype=center.dtype)
    # one type for β (TorchScript cannot multiply a Tensor | float); a float in center's dtype gives the same numbers
    beta = beta if isinstance(beta, Tensor) else torch.tensor(beta, dtype=center.dtype, device=center.device)
    if angle is None:
        half = beta * size / 2
        along = torch.sigmoid(half[:, :1] - (beta * (u - center[:, :1])).abs())  # B×W
        across = torch.sigmoid(half[:, 1:] - (beta * (v - center[:, 1:])).abs())  # B×H
        return (across[:, :, None] * along[:, None, :]).unsqueeze(1)
    cos, sin = (beta * torch.cos(angle))[:, None, None], (beta * torch.sin(angle))[:, None, None]
    du = (u - center[:, :1])[:, None, :]  # B×1×W
    dv = (v - center[:, 1:])[:, :, None]  # B×H×1
    along = (cos * du) + (sin * dv)  # β·u', B×H×W
    across = (cos * dv) - (sin * du)  # β·v'
    half = (beta * size / 2)[:, :, None, None]
    mask = torch.sigmoid(half[:, 0] - along.abs()) * torch.sigmoid(half[:, 1] - across.abs())
    return mask.unsqueeze(1)


def extent_matrix(size: Tensor, angle: Tensor) -> Tensor:
    """E = R(θ) diag(w/2, h/2) R(θ)ᵀ, B×2×2: the same for every (w, h, θ) describing one rectangle."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    half_w, half_h = size[:, 0] / 2, size[:, 1] / 2
    e_uu = half_w * cos**2 + half_h * sin**2
    e_vv = half_w * sin**2 + half_h * cos**2
    e_uv = (half_w - half_h) * cos * sin
    return torch.stack([torch.stack([e_uu, e_uv], -1), torch.stack([e_uv, e_vv], -1)], -2)


class CRAM(nn.Module):
    """x ↦ x ⊙ m (or x ⊙ (1 + m)) with m the soft mask of one predicted rectangle per sample.

    Args:
        channels: input channels.
        predictor: ``"moments"`` (rectangle from the moments of a softmax score map) or ``"regress"`` (pooled MLP).
        apply: ``"mul"`` (x ⊙ m, like CBAM's spatial branch) or ``"residual"`` (x ⊙ (1 + m)).
        beta: mask sharpness per normalised unit (the edge goes from 12% to 88% over 4/β).
        beta_final: if set, `anneal` moves β geometrically from ``beta`` (progress 0) to this (progress 1).
        rotate: if False, rectangles stay axis-aligned (4 parameters; θ = 0).
        score: score map of ``"moments"``, a·BN(conv(·)) with a learnt sharpness a: ``"conv"`` (a 1×1 conv over the
            channels; point-wise, hence exactly equivariant, and cheap) or ``"pool"`` (CBAM's channel mean/max and a
            k×k conv, as `spatial.py`).
        kernel_size: k of ``score="pool"`` (7, as CBAM).
        reduction: hidden width of ``"regress"``'s MLP is max(channels // reduction, 8).
        grid: ``"regress"`` pools the map to grid×grid before its MLP, which keeps coarse position.
        min_size: smallest side in normalised units (0 to 2).
    """

    def __init__(
        self,
        channels: int,
        *,
        predictor: str = "moments",
        apply: str = "mul",
        beta: float = 10.0,
        beta_final: float | None = None,
        rotate: bool = True,
        score: str = "conv",
        kernel_size: int = 7,
        reduction: int = 4,
        grid: int = 4,
        min_size: float = 0.0,
    ):
        super().__init__()
        if predictor not in PREDICTORS:
            raise unknown_name("CRAM predictor", predictor, PREDICTORS)
        if apply not in APPLY_MODES:
            raise unknown_name("CRAM apply mode", apply, APPLY_MODES)
        if score not in SCORES:
            raise unknown_name("CRAM score map", score, SCORES)
        if beta <= 0 or (beta_final is not None and beta_final <= 0):
            raise AttnlabError(f"CRAM beta must be positive, got beta={beta}, beta_final={beta_final}")
        if not 0 <= min_size < 2:
            raise AttnlabError(f"CRAM min_size must be in [0, 2) normalised units, got {min_size}")
        if kernel_size % 2 != 1 or reduction < 1 or grid < 1:
            raise AttnlabError(
                f"CRAM needs an odd kernel_size and positive reduction and grid, got {kernel_size}, {reduction}, {grid}"
            )
        self.predictor, self.apply_mode, self.rotate, self.min_size = predictor, apply, rotate, min_size
        self.beta_start, self.beta_final = float(beta), beta_final
        self.register_buffer("beta", torch.tensor(float(beta)))
        if predictor == "moments":
            self.score_kind = score
            self.score = (
                nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
                if score == "pool"
                else nn.Conv2d(channels, 1, 1, bias=False)
            )
            # standardised scores times a learnt sharpness: the start does not depend on the conv's init scale, and
            # no BN bias (a shift of all scores cancels in the softmax and would never get a gradient)
            self.score_norm = nn.BatchNorm2d(1, affine=False)
            self.score_scale = nn.Parameter(torch.ones(()))
        else:
            hidden = max(channels // reduction, 8)
            self.pool = nn.AdaptiveAvgPool2d(grid)
            self.mlp = nn.Sequential(
                nn.Flatten(),
                nn.Linear(channels * grid * grid, hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, 5 if rotate else 4),
            )
            last = self.mlp[-1]
            nn.init.normal_(last.weight, std=0.01)  # start near the centred, 0.9-of-the-map rectangle
            nn.init.zeros_(last.bias)
            with torch.no_grad():
                last.bias[2:4] = math.log(9.0)  # σ⁻¹(0.9)
        self.probe = AttentionProbe("rectangle")

    def set_beta(self, value: float) -> None:
        """Set the mask sharpness β (kept in the state dict, so a checkpoint restores it)."""
        if value <= 0:
            raise AttnlabError(f"CRAM beta must be positive, got {value}")
        self.beta.fill_(float(value))

    def anneal(self, progress: float) -> None:
        """β at training progress in [0, 1]: geometric from ``beta`` to ``beta_final``; no-op without beta_final."""
        if self.beta_final is not None:
            t = min(max(float(progress), 0.0), 1.0)
            self.set_beta(self.beta_start * (self.beta_final / self.beta_start) ** t)

    def rectangle(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """center B×2, size B×2, angle B of the rectangle predicted for x (normalised units, see module doc)."""
        if hasattr(self, "score"):  # the "moments" predictor (hasattr: TorchScript compiles only this branch)
            if self.score_kind == "pool":
                scores = self.score(channel_pool(x))
            else:  # the 1×1 conv as a batched matmul: same result, ~4× faster on CPU than a conv with one output
                weight = self.score.weight.view(1, 1, -1).expand(x.shape[0], 1, -1)
                scores = torch.bmm(weight, x.flatten(2)).view_as(x[:, :1])
            scores = self.score_norm(scores) * self.score_scale
            return rectangle_from_scores(scores, min_size=self.min_size, rotate=self.rotate)
        out = self.mlp(self.pool(x))
        out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
        center = torch.tanh(out[:, :2])
        size = self.min_size + (2 - self.min_size) * torch.sigmoid(out[:, 2:4])
        angle = math.pi / 2 * torch.tanh(out[:, 4]) if self.rotate else torch.zeros_like(out[:, 0])
        return center, size, angle

    def forward(self, x: Tensor) -> Tensor:
        center, size, angle = self.rectangle(x)
        mask = rectangle_mask(center, size, angle if self.rotate else None, x.shape[-2], x.shape[-1], self.beta)
        if not torch.jit.is_scripting():  # the probe's value is untyped in TorchScript (probe.py)
            mask = self.probe({"center": center, "size": size, "angle": angle, "mask": mask})["mask"]
        mask = mask.to(x.dtype)
        return x * (mask if self.apply_mode == "mul" else 1 + mask)  # 1 + m on the small map: one product either way

    def extra_repr(self) -> str:
        return (
            f"predictor={self.predictor!r}, apply={self.apply_mode!r}, beta={self.beta.item():g}, "
            f"rotate={self.rotate}, min_size={self.min_size}"
        )


def has_cram(model: nn.Module) -> bool:
    """Whether any submodule of ``model`` is a CRAM."""
    return any(isinstance(m, CRAM) for m in model.modules())


def anneal_beta(model: nn.Module, progress: float) -> None:
    """Call `CRAM.anneal(progress)` on every CRAM of ``model`` (the trainer's per-step or per-epoch hook)."""
    for m in model.modules():
        if isinstance(m, CRAM):
            m.anneal(progress)


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


EQUIVARIANCE_TRANSFORMS = ("hflip", "rot90", "shift")
"""Grid transforms the equivariance term can draw from: a horizontal flip, quarter turns, whole-pixel shifts."""
DEFAULT_EQUIVARIANCE_TRANSFORMS = ("hflip", "shift")
"""The training default: what keeps an upright image in its distribution (the augmentation already flips and shifts)."""


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


@contextmanager
def capture_rectangles(model: nn.Module) -> Iterator[list[dict[str, Tensor]]]:
    """Yields a list that fills with the rectangle dict of every CRAM call of ``model``, in call order (not detached:
    the trainer can wrap its own forward in it and hand the list to `equivariance_penalty`)."""
    seen: list[dict[str, Tensor]] = []
    probes = [m.probe for m in model.modules() if isinstance(m, CRAM)]
    handles = [p.register_forward_hook(lambda _m, _args, out: seen.append(out)) for p in probes]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


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


@contextmanager
def running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers keep normalising with the batch's own statistics (training mode) but do not update their
    running statistics: an extra forward (the penalty's T(x)) must not count as data the network saw twice."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
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
    (`running_stats_frozen`), and compares each CRAM's rectangles by centre and extent matrix (see module doc). T is
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
    with capture_rectangles(model) as moved, running_stats_frozen(model):
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
    """CRAM's part in a training run: anneal every mask's sharpness over the run and, with weight λ > 0
    (``settings.equivariance``), add λ·`equivariance_penalty` over ``settings.equivariance_transforms``, computed
    from the rectangles of the training forward itself (one extra forward on T(x), through the bare model, so under
    DDP each rank makes its own)."""

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


def _cram_training(model: nn.Module, settings) -> CramTraining | None:
    weight = getattr(settings, "equivariance", 0.0)
    if not has_cram(model):
        if weight > 0:
            raise AttnlabError(f"--equivariance needs a model with CRAM layers; {settings.model} has none")
        return None
    return CramTraining(model, weight, getattr(settings, "equivariance_transforms", DEFAULT_EQUIVARIANCE_TRANSFORMS))


register_training_hook("cram", _cram_training)


__all__ = [
    "CRAM",
    "CramTraining",
    "GridTransform",
    "anneal_beta",
    "capture_rectangles",
    "equivariance_penalty",
    "extent_matrix",
    "has_cram",
    "pixel_centers",
    "random_transform",
    "rectangle_from_scores",
    "rectangle_mask",
]
