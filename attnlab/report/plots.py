"""The comparison's figures: learning curves and accuracy against cost, as small PNGs (matplotlib, Agg backend).

Figures are deterministic (no timestamps or software tag in the file), so rebuilding a report gives the same bytes,
and small (≈100 dpi, a few tens of KB) so an HTML report that embeds them stays light.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.figure import Figure  # noqa: E402

DPI = 100
PNG_METADATA = {"Software": None}


def _color(i: int) -> tuple[float, ...]:
    return plt.get_cmap("tab10" if i < 10 else "tab20")(i % 20)


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at `DPI` and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)
    return path


def learning_curves(curves: dict[str, dict[int, list[float]]], order: Sequence[str], title: str, path: Path) -> Path:
    """Validation accuracy per epoch, one line per entry: the mean over seeds, with the min–max range as a band.

    Args:
        curves: ``{entry: {seed: [val_acc per epoch]}}``.
        order: entries in legend order (colours follow it).
        title: the figure title.
        path: where the PNG goes.
    """
    fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
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
        color = _color(i)
        ax.plot(epochs, mean, marker="o", markersize=3, color=color, label=f"{name} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch], color=color, alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, loc="best")  # curves may end anywhere: let matplotlib avoid them
    return save(fig, path)


def accuracy_vs_cost(summary: Sequence[dict[str, Any]], order: Sequence[str], title: str, path: Path) -> Path:
    """Mean test accuracy (± std over seeds) against parameters and against latency, one point per entry.

    Args:
        summary: rows of ``summary.csv`` for one dataset.
        order: every entry of the comparison, in legend order (colours follow it, as in `learning_curves`).
        title: the figure title.
        path: where the PNG goes.
    """
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.6), layout="constrained", sharey=True)
    panels = (("params", "parameters (thousands)", 1e-3), ("latency_ms", "latency per image (ms, batch 1)", 1.0))
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        for row in sorted(summary, key=lambda r: order.index(r["model"])):
            std = row["test_acc_std"]
            ax.errorbar(
                row[key] * scale,
                100 * row["test_acc_mean"],
                yerr=None if math.isnan(std) else 100 * std,
                fmt="o",
                capsize=3,
                color=_color(order.index(row["model"])),
                label=row["model"],
            )
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    return save(fig, path)
