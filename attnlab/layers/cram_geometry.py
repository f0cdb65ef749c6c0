"""CRAM's rectangle geometry: normalised coordinates, the rectangle of a score map's moments, its soft mask and its
extent matrix. Plain tensor functions (no module), shared by the layer (`cram`), its equivariance term
(`cram_equivariance`) and the localization analysis.

Our reading of Nguyen et al., "Convolutional Rectangular Attention Module", arXiv 2503.10875 (see `cram`):

- Coordinates are normalised like ``F.affine_grid(..., align_corners=False)``: pixel centres at ``(2j + 1)/W - 1``, so
  u (along the width) and v (along the height) lie in (-1, 1); the centre (cx, cy) is in these units and the sides
  (w, h) too (2 = the whole map). On a non-square map a rectangle in these units is a parallelogram in pixels, exactly
  as for ``affine_grid``; the angle θ turns the u axis towards the v axis and lies in (-π/2, π/2].
- Mask: with u' = cosθ(u-cx) + sinθ(v-cy) and v' = -sinθ(u-cx) + cosθ(v-cy),
  m = ``σ(β(w/2 - |u'|)) · σ(β(h/2 - |v'|))``; β (per normalised unit) sets the edge sharpness.
- The rectangle of a score map: the one with the same centre of mass and covariance as its softmax over positions,
  each pixel counted as a uniform square cell (so a uniform map over a pixel-aligned rectangle gives back exactly that
  rectangle, and a 1×1 map gives the whole map); the sides are 2√(3λ) of the covariance's eigenvalues, θ the major
  axis. Exactly equivariant to flips, quarter turns and translations of the score map.
- Rectangles compare by centre and the symmetric extent matrix E = R diag(w/2, h/2) Rᵀ, which is the same for the
  equivalent parametrisations (w, h, θ), (h, w, θ ± π/2) and (w, h, θ ± π), and is in the units of the centre.
- Known limit: at equal eigenvalues (a square) the angle is undefined; θ is set to 0 there, so the mask of a
  near-square rectangle can jump (a square turned by 45°) and the angle's gradient grows like 1/(λ₊ - λ₋) close to it.
  Axis-aligned rectangles (``rotate=False``) have no such point.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
    """Soft mask ``σ(β(w/2 - |u'|)) · σ(β(h/2 - |v'|))`` of each rectangle on an H×W pixel-centre grid, B×1×H×W.

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


__all__ = ["extent_matrix", "pixel_centers", "rectangle_from_scores", "rectangle_mask"]
