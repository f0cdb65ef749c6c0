"""Where a model gates its features, and what one "unit" of each gate is: a channel or a cell of positions.

Every attention that `attnlab.capture_attention` observes is a *site*: the module whose output is the gated feature
map (timm's SE/ECA module, CBAM's ``.channel`` and ``.spatial`` parts, `SpatialAttention`, `CRAM`, `AWConv2d`). The
analyses read the gate from the capture record and act on the module's output, so "zero unit u after the gate" is
"zero unit u of this module's output". Units:

- channel gates (SE, ECA, CBAM channel) and AW weight attention: one unit per output channel. A gate that varies
  over positions too (``"element"``: coordinate attention's row and column gates, GatherExcite with a local extent)
  is one unit per channel as well, its gate the mean over positions. AW attention
  (B×C_out×C_in×k×k) becomes one value per output channel — *our reading* of "AW maps reduced to channels":
  ``aw_reduce="mean"`` (default) averages A over C_in×k×k, the mean re-weighting a filter receives;
  ``"effective"`` takes ‖A ⊙ W‖ / ‖W‖ per filter, how much the attention scales the filter that is actually applied.
- spatial maps (position-wise maps, CBAM spatial, CRAM masks): one unit per *cell* of a partition of the H×W map into
  at most ``grid``×``grid`` near-equal blocks (row r belongs to cell ⌊r·G/H⌋); the gate of a cell is the map's mean
  over it. ``grid=None`` makes every position its own unit (costly: 1024 units on a 32×32 map).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import AttnlabError, unknown_name
from ..layers.awconv import AWConv2d
from ..models.capture import attention_points

AW_REDUCTIONS = ("mean", "effective")
UNIT_OF_KIND = {
    "channel": "channel",
    "element": "channel",
    "weight": "channel",
    "spatial": "position",
    "rectangle": "position",
}


@dataclass(frozen=True)
class GateSite:
    """One attention of a model.

    Attributes:
        path: its name in the capture record (a module path; ``path[h]`` for a gate run several times per forward).
        kind: ``"channel"``, ``"element"``, ``"spatial"``, ``"rectangle"`` or ``"weight"``.
        module: the module whose output carries the gate.
        mechanism: what computes the gate (the attention module's class name: ``"SEModule"``, ``"CRAM"``, ...).
    """

    path: str
    kind: str
    module: nn.Module
    mechanism: str = ""

    @property
    def units(self) -> str:
        """``"channel"`` or ``"position"``."""
        return UNIT_OF_KIND[self.kind]


def gate_sites(model: nn.Module, kinds: tuple[str, ...] | None = None) -> list[GateSite]:
    """Every attention site of ``model`` in forward order of definition, optionally only of the given kinds."""
    sites = []
    for site in attention_points(model):
        if site.kind not in UNIT_OF_KIND:
            raise AttnlabError(f"{site.path}: unknown attention kind {site.kind!r}")
        if kinds is None or site.kind in kinds:
            sites.append(GateSite(site.path, site.kind, site.module, site.mechanism))
    return sites


def attention_parameters(site: GateSite) -> list[nn.Parameter]:
    """The parameters that compute the gate of ``site`` (for AW: the generator's, not the convolution's own)."""
    if isinstance(site.module, AWConv2d):
        return [p for name, p in site.module.named_parameters() if name not in ("weight", "bias")]
    return list(site.module.parameters())


def cell_index(height: int, width: int, grid: int | None, device: torch.device | None = None) -> torch.Tensor:
    """H×W long tensor of cell numbers (row-major over cells) of the partition described in the module docstring."""
    gh, gw = (height, width) if grid is None else (min(grid, height), min(grid, width))
    rows = torch.arange(height, device=device) * gh // height
    cols = torch.arange(width, device=device) * gw // width
    return rows[:, None] * gw + cols[None, :]


def cell_matrix(height: int, width: int, grid: int | None, device: torch.device | None = None) -> torch.Tensor:
    """U×(H·W) float one-hot matrix: row u marks the positions of cell u."""
    index = cell_index(height, width, grid, device).flatten()
    return torch.nn.functional.one_hot(index, int(index.max()) + 1).T.float()


def keep_masks(site: GateSite, feature_shape: tuple[int, ...], grid: int | None) -> torch.Tensor:
    """U masks of ones with unit u zeroed, shaped to broadcast over the site's C×H×W output (U×C×1×1 or U×1×H×W)."""
    channels, height, width = feature_shape
    if site.units == "channel":
        return (1 - torch.eye(channels)).view(channels, channels, 1, 1)
    cells = cell_matrix(height, width, grid)
    return (1 - cells).view(-1, 1, height, width)


def unit_sums(values: torch.Tensor, site: GateSite, grid: int | None) -> torch.Tensor:
    """Per-unit sums of a B×C×H×W tensor over the elements of each unit: B×U."""
    if site.units == "channel":
        return values.sum((2, 3))
    b, _, h, w = values.shape
    return values.sum(1).reshape(b, h * w) @ cell_matrix(h, w, grid, values.device).T.to(values.dtype)


def gate_values(site: GateSite, value: Any, grid: int | None, aw_reduce: str = "mean") -> torch.Tensor:
    """The gate of every unit, B×U, from the site's entry in a capture record."""
    if site.kind == "channel":
        return value.flatten(1).float()
    if site.kind == "element":
        return value.float().mean((2, 3))
    if site.kind == "weight":
        if aw_reduce not in AW_REDUCTIONS:
            raise unknown_name("AW reduction", aw_reduce, AW_REDUCTIONS)
        if aw_reduce == "mean":
            return value.float().mean((2, 3, 4))
        weight = site.module.weight.detach().float()
        return (value.float() * weight).flatten(2).norm(dim=2) / weight.flatten(1).norm(dim=1).clamp_min(1e-12)
    spatial = value["mask"] if site.kind == "rectangle" else value
    b, _, h, w = spatial.shape
    cells = cell_matrix(h, w, grid, spatial.device)
    return spatial.float().reshape(b, h * w) @ (cells / cells.sum(1, keepdim=True)).T


__all__ = [
    "AW_REDUCTIONS",
    "GateSite",
    "attention_parameters",
    "cell_index",
    "cell_matrix",
    "gate_sites",
    "gate_values",
    "keep_masks",
    "unit_sums",
]
