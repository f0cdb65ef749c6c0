"""The comparison's figures: learning curves and accuracy against cost, in the house style of `attnlab.plotting`
(deterministic bytes, so rebuilding a report gives the same files; small, so an HTML report that embeds them stays
light)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import plotting


def learning_curves(
    curves: dict[str, dict[int, list[float]]],
    order: Sequence[str],
    title: str,
    path: Path,
    ylabel: str = "validation accuracy (%)",
) -> Path:
    """Validation score per epoch, one line per entry: the mean over seeds, with the min–max range as a band.

    Args:
        curves: ``{entry: {seed: [validation score (0–1) per epoch]}}``.
        order: entries in legend order (colours follow it).
        title: the figure title.
        path: where the PNG goes.
        ylabel: what the score is (shown ×100).
    """
    fig, ax = plotting.subplots(figsize=(6.4, 3.8))
    for i, name in enumerate(order):
        runs = list(curves.get(name, {}).values())
        if not runs:
            continue
        length = min(len(r) for r in runs)
        if length == 0:
            continue
        per_epoch = [[100 * r[e] for r in runs] for e in range(length)]
        epochs = list(range(1, length + 1))
        mean = [sum(v) / len(v) for v in per_epoch]
        color = plotting.color(i)
        ax.plot(epochs, mean, marker="o", markersize=3, color=color, label=f"{name} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch], color=color, alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, loc="best")  # curves may end anywhere: let matplotlib avoid them
    return plotting.save(fig, path)


COST_PANELS = (
    ("params", "parameters (thousands)", 1e-3),
    ("latency_ms", "latency per image (ms, batch 1; median over runs)", 1.0),
)


def measured_costs(summary: Sequence[dict[str, Any]]) -> list[str]:
    """The cost panels of `accuracy_vs_cost` that every row of ``summary`` has a number for."""
    return [key for key, *_ in COST_PANELS if all(math.isfinite(row.get(key, math.nan)) for row in summary)]


def accuracy_vs_cost(
    summary: Sequence[dict[str, Any]],
    order: Sequence[str],
    title: str,
    path: Path,
    score: str = "acc",
    ylabel: str = "test accuracy (%)",
) -> Path:
    """Mean test score (± std over seeds) against parameters and, where runs measured it, latency; one point per
    entry.

    Args:
        summary: rows of ``summary.csv`` for one dataset.
        order: every entry of the comparison, in legend order (colours follow it, as in `learning_curves`).
        title: the figure title.
        path: where the PNG goes.
        score: the summary's score (``test_<score>_mean``).
        ylabel: what the score is (shown ×100).
    """
    panels = [p for p in COST_PANELS if p[0] in measured_costs(summary)]
    fig, axes = plotting.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.6), sharey=True, squeeze=False)
    axes = list(axes[0])
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        for row in sorted(summary, key=lambda r: order.index(r["model"])):
            std = row[f"test_{score}_std"]
            ax.errorbar(
                row[key] * scale,
                100 * row[f"test_{score}_mean"],
                yerr=None if math.isnan(std) else 100 * std,
                fmt="o",
                capsize=3,
                color=plotting.color(order.index(row["model"])),
                label=row["model"],
            )
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    return plotting.save(fig, path)
