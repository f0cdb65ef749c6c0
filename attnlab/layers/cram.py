"""CRAM: spatial attention restricted to one soft, rotated rectangle per sample.

Nguyen et al., "Convolutional Rectangular Attention Module", arXiv 2503.10875. Provenance, honestly: the abstract
(all we have of the paper) says the attended region is a rectangle, predicted by the module and turned into a smooth
mask, trained end to end, more stable and interpretable than position-wise attention. The five parameters with an
*angle* and the *equivariance constraint* (transform the input and the rectangle moves the same way) come from
secondary summaries of the paper, not from its abstract. Everything below that is *our reading*:

- The rectangle's coordinates, its mask ``σ(β(w/2 - |u'|)) · σ(β(h/2 - |v'|))`` and the rectangle of a score map's
  moments are `cram_geometry`'s; β (per normalised unit) sets the edge sharpness and can be annealed.
- Two predictors of the rectangle, both batched:
  ``"moments"`` (default): a position-wise score map (``score="conv"``: a standardised 1×1 conv; ``score="pool"``: a
  standardised k×k conv over CBAM's channel mean/max; either times a learnt sharpness), softmax-normalised over
  positions; the rectangle is the one with the same centre of mass and covariance (`rectangle_from_scores`).
  ``"regress"``: adaptive average pooling to a g×g grid and a two-layer MLP with bounded outputs (tanh centre, sides in
  (min_size, 2), θ = π/2·tanh).
- ``apply="mul"`` gives x ⊙ m like the position-wise baseline (`spatial.py`); ``apply="residual"`` gives x ⊙ (1 + m).
- The equivariance constraint, a loss term over a whole model, and CRAM's training hook are `cram_equivariance`'s.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import AttnlabError, unknown_name
from .cram_geometry import rectangle_from_scores, rectangle_mask
from .probe import AttentionProbe
from .spatial import channel_pool

PREDICTORS = ("moments", "regress")
APPLY_MODES = ("mul", "residual")
SCORES = ("pool", "conv")


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
        device, dtype: where and in what the parameters are built (as timm's layers).
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
        device: Any = None,
        dtype: Any = None,
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
        dd = {"device": device, "dtype": dtype}
        self.register_buffer("beta", torch.full((), float(beta), **dd))
        if predictor == "moments":
            self.score_kind = score
            self.score = (
                nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False, **dd)
                if score == "pool"
                else nn.Conv2d(channels, 1, 1, bias=False, **dd)
            )
            # standardised scores times a learnt sharpness: the start does not depend on the conv's init scale, and
            # no BN bias (a shift of all scores cancels in the softmax and would never get a gradient)
            self.score_norm = nn.BatchNorm2d(1, affine=False, **dd)
            self.score_scale = nn.Parameter(torch.ones((), **dd))
        else:
            hidden = max(channels // reduction, 8)
            self.pool = nn.AdaptiveAvgPool2d(grid)
            self.mlp = nn.Sequential(
                nn.Flatten(),
                nn.Linear(channels * grid * grid, hidden, **dd),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, 5 if rotate else 4, **dd),
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
        """center B×2, size B×2, angle B of the rectangle predicted for x (normalised units, `cram_geometry`)."""
        if hasattr(self, "score"):  # the "moments" predictor (hasattr: TorchScript compiles only this branch)
            if self.score_kind == "pool":
                scores = self.score(channel_pool(x))
            else:  # the 1×1 conv as a batched matmul: same result, faster on CPU than a conv with one output
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


__all__ = ["CRAM", "anneal_beta", "capture_rectangles", "has_cram"]
