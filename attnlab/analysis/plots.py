"""PNG figures of the analyses, in the house style of `attnlab.plotting`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from .. import plotting


def _num(value: Any) -> float:
    """A float from a result value; None (NaN after a JSON round trip) becomes NaN."""
    return float("nan") if value is None else float(value)


def _short(path: str) -> str:
    return path.replace("layer", "L").replace(".se", "").replace(".channel", ".ch").replace(".spatial", ".sp")


def consistency_bars(results: dict[str, dict[str, Any]], path: Path) -> str:
    """Per-layer Spearman ρ between gate and importance, one panel per checkpoint: bars with 95% intervals for the
    reference method (ablation), markers for the other methods and for the two controls."""
    widest = max(len(r["layers"]) for r in results.values())
    fig, axes = plotting.subplots(
        len(results), 1, figsize=(max(6.0, 0.45 * widest + 2), 2.8 * len(results)), squeeze=False
    )
    markers = {"grad_x_act": "x", "captum": "+", "null_spearman": "o", "random_gate_spearman": "^"}
    names = {"null_spearman": "shuffled null", "random_gate_spearman": "random gate"}
    for ax, (i, (label, result)) in zip(axes[:, 0], enumerate(results.items())):
        layers, method = result["layers"], result["reference"]
        x = np.arange(len(layers))
        stats = [layer["spearman"][method] for layer in layers]
        mean = np.array([_num(s["mean"]) for s in stats])
        err = np.abs(
            np.array([[_num(s["mean"]) - _num(s["ci_low"]), _num(s["ci_high"]) - _num(s["mean"])] for s in stats]).T
        )
        ax.bar(x, mean, 0.7, yerr=err, color=plotting.color(i), capsize=2, label=method)
        for other in [m for m in result["methods"] if m != method]:
            ax.scatter(
                x,
                [_num(layer["spearman"][other]["mean"]) for layer in layers],
                marker=markers.get(other, "s"),
                color="k",
                zorder=3,
                label=other,
            )
        for key in ("null_spearman", "random_gate_spearman"):
            if all(key in layer for layer in layers):
                ax.scatter(
                    x,
                    [_num(layer[key]["mean"]) for layer in layers],
                    marker=markers[key],
                    facecolors="none",
                    edgecolors="grey",
                    zorder=3,
                    label=names[key],
                )
        ax.set_xticks(x)
        ax.set_xticklabels([_short(layer["path"]) for layer in layers], rotation=45, ha="right", fontsize=7)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel("Spearman ρ")
        ax.set_title(f"{label}: gate vs importance per layer (mean over samples, 95% CI)", fontsize=9)
        ax.legend(fontsize=7, ncol=5)
    return plotting.save(fig, path).name


def consistency_scatter(
    values: dict[str, dict[str, np.ndarray]], path: Path, label: str, *, points: int = 1500, seed: int = 0
) -> str:
    """Gate value against ablation importance for every (sample, unit), one panel per layer (subsampled)."""
    paths = list(values)
    cols = min(3, len(paths))
    rows = -(-len(paths) // cols)
    fig, axes = plotting.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    rng = np.random.default_rng(seed)
    for ax, p in zip(axes.flat, paths):
        method = "ablation" if "ablation" in values[p] else next(k for k in values[p] if k != "gate")
        gate, importance = values[p]["gate"].ravel(), values[p][method].ravel()
        pick = rng.choice(gate.size, size=min(points, gate.size), replace=False)
        ax.scatter(gate[pick], importance[pick], s=3, alpha=0.4)
        ax.set_title(_short(p), fontsize=9)
        ax.set_xlabel("gate", fontsize=8)
        ax.set_ylabel(f"{method} importance", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(paths) :]:
        ax.axis("off")
    fig.suptitle(f"{label}: gate vs importance per unit", fontsize=10)
    return plotting.save(fig, path).name


def smoothness_plot(results: dict[str, dict[str, Any]], path: Path) -> str:
    """Mean probability of the start and end labels along same- and different-class paths, the mean path loss, and
    accuracy under Gaussian noise; one colour per checkpoint."""
    fig, axes = plotting.subplots(1, 4, figsize=(17, 3.8))
    for i, (label, result) in enumerate(results.items()):
        color = plotting.color(i)
        curves = result["curves"]
        axes[0].plot(curves["same"]["t"], curves["same"]["p_a"], color=color, label=label)
        axes[1].plot(curves["diff"]["t"], curves["diff"]["p_a"], color=color, label=f"{label}: p(y_a)")
        axes[1].plot(curves["diff"]["t"], curves["diff"]["p_b"], color=color, ls="--", label=f"{label}: p(y_b)")
        axes[2].plot(curves["same"]["t"], curves["same"]["loss"], color=color, label=f"{label}: same")
        axes[2].plot(curves["diff"]["t"], curves["diff"]["loss"], color=color, ls="--", label=f"{label}: diff")
        sigmas = [float(s) for s in result["noise"]]
        axes[3].plot(
            [0.0, *sigmas],
            [result["clean_acc"], *[v["acc"] for v in result["noise"].values()]],
            marker="o",
            color=color,
            label=label,
        )
    titles = (
        "same-class paths: p(true class)",
        "different-class paths",
        "loss along paths (mixup target)",
        "accuracy under Gaussian noise",
    )
    for ax, title, xlabel in zip(axes, titles, ("t", "t", "t", "σ (normalised units)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7)
    return plotting.save(fig, path).name


def landscape_1d_plot(results: dict[str, dict[str, Any]], path: Path) -> str:
    """Loss along one filter-normalised direction, one curve per checkpoint."""
    fig, ax = plotting.subplots(figsize=(6, 4))
    for i, (label, result) in enumerate(results.items()):
        surface = result["surface_1d"]
        ax.plot(surface["alpha"], surface["loss"], marker=".", color=plotting.color(i), label=label)
    ax.set_xlabel("α (filter-normalised step)")
    ax.set_ylabel("test loss")
    ax.set_title("1-D loss surface")
    ax.legend(fontsize=8)
    return plotting.save(fig, path).name


def landscape_2d_plots(surface: dict[str, Any], contour_path: Path, surface_path: Path, label: str) -> list[str]:
    """Contour and 3-D surface of a 2-D loss surface."""
    a, b = np.meshgrid(surface["alpha"], surface["beta"])
    loss = np.array(surface["loss"], dtype=float)
    fig, ax = plotting.subplots(figsize=(5, 4.2))
    levels = ax.contour(a, b, loss, levels=15, cmap="viridis")
    ax.clabel(levels, fontsize=6)
    ax.plot([0], [0], "r+")
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_title(f"{label}: loss contours")
    names = [plotting.save(fig, contour_path).name]
    fig = plotting.figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(a, b, loss, cmap="viridis", linewidth=0)
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_zlabel("loss")
    ax.set_title(f"{label}: loss surface")
    names.append(plotting.save(fig, surface_path).name)
    return names


def overlay_title(label: str, kinds: dict[str, str]) -> str:
    """What `localization_overlay` draws for a model with these attention sites (path → kind), and nothing else."""
    rectangles = [p for p, k in kinds.items() if k == "rectangle"]
    maps = [p for p, k in kinds.items() if k == "spatial"]
    parts = ["true box (green)"]
    if len(rectangles) > 1:
        parts.append(f"CRAM rectangles of {len(rectangles)} layers (yellow → red by depth)")
    elif rectangles:
        parts.append(f"CRAM rectangle of {rectangles[0]}")
    if maps:
        parts.append(f"spatial attention map of {maps[-1]} (heat)")
    return f"{label}: " + ", ".join(parts)


def localization_overlay(examples: dict[str, Any], path: Path, label: str) -> str:
    """A few images with the true box (green), every CRAM layer's rectangle (outlines, light → dark with depth) and the
    deepest position-wise map as a heat overlay; the title names only what is drawn (`overlay_title`)."""
    from .localization import rectangle_polygon

    images = examples["images"]
    n, image_size = len(images), tuple(images.shape[-2:])
    fig, axes = plotting.subplots(1, n, figsize=(2.6 * n, 2.8), squeeze=False)
    kinds = examples["kinds"]
    rect_paths = [p for p, k in kinds.items() if k == "rectangle"]
    map_paths = [p for p, k in kinds.items() if k == "spatial"]
    cmap = plotting.pyplot().get_cmap("autumn")
    height, width = image_size
    for i, ax in enumerate(axes[0]):
        image = images[i].float()
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
        ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", extent=(0, width, height, 0))
        if map_paths:
            heat = examples["attention"][map_paths[-1]][i, 0].float().numpy()
            ax.imshow(heat, cmap="jet", alpha=0.35, extent=(0, width, height, 0))
        for j, p in enumerate(rect_paths):
            rect = examples["attention"][p]
            poly = rectangle_polygon(
                rect["center"][i : i + 1].double(),
                rect["size"][i : i + 1].double(),
                rect["angle"][i : i + 1].double(),
                image_size,
            )[0].numpy()
            ax.add_patch(
                plotting.pyplot().Polygon(poly, fill=False, lw=1.2, color=cmap(j / max(1, len(rect_paths) - 1)))
            )
        x0, y0, x1, y1 = examples["boxes"][i].tolist()
        ax.add_patch(plotting.pyplot().Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5, color="lime"))
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.axis("off")
    fig.suptitle(overlay_title(label, kinds), fontsize=9)
    return plotting.save(fig, path).name


def localization_bars(results: dict[str, dict[str, Any]], path: Path) -> str:
    """IoU with the true box per layer (rectangle and thresholded map), one colour per checkpoint."""
    fig, ax = plotting.subplots(figsize=(8, 4))
    for i, (label, result) in enumerate(results.items()):
        layers = result["layers"]
        x = np.arange(len(layers))
        color = plotting.color(i)
        ax.plot(x, [layer["iou_map"]["mean"] for layer in layers], marker="o", color=color, label=f"{label}: map box")
        if any("iou_rect" in layer for layer in layers):
            ax.plot(
                x,
                [layer.get("iou_rect", {}).get("mean", np.nan) for layer in layers],
                marker="s",
                ls="--",
                color=color,
                label=f"{label}: rectangle",
            )
    ax.set_xlabel("spatial-attention layer (input → output)")
    ax.set_ylabel("IoU with true box")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Where spatial attention looks")
    return plotting.save(fig, path).name


# ----------------------------------------------------------------------------------------- the figures of each analysis


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "run"


def consistency_figures(results: dict, extras: dict, out: Path) -> list[str]:
    """Per-layer bars for all checkpoints, and one gate-against-importance scatter per checkpoint."""
    written = [consistency_bars(results, out / "consistency_layers.png")]
    for label, values in extras.items():
        written.append(consistency_scatter(values, out / f"consistency_{_slug(label)}_scatter.png", label))
    return written


def smoothness_figures(results: dict, extras: dict, out: Path) -> list[str]:
    return [smoothness_plot(results, out / "smoothness_curves.png")]


def landscape_figures(results: dict, extras: dict, out: Path) -> list[str]:
    """The 1-D surfaces side by side, and a contour and a 3-D view of each checkpoint's 2-D surface."""
    written = [landscape_1d_plot(results, out / "landscape_1d.png")]
    for label, result in results.items():
        slug = _slug(label)
        contour, surface = out / f"landscape_{slug}_contour.png", out / f"landscape_{slug}_surface.png"
        written += landscape_2d_plots(result["surface_2d"], contour, surface, label)
    return written


def localization_figures(results: dict, extras: dict, out: Path) -> list[str]:
    """IoU per layer for all checkpoints, and a few overlaid examples per checkpoint."""
    written = [localization_bars(results, out / "localization_iou.png")]
    for label, examples in extras.items():
        written.append(localization_overlay(examples, out / f"localization_{_slug(label)}_overlay.png", label))
    return written


__all__ = [
    "consistency_bars",
    "consistency_figures",
    "consistency_scatter",
    "landscape_1d_plot",
    "landscape_2d_plots",
    "landscape_figures",
    "localization_bars",
    "localization_figures",
    "localization_overlay",
    "overlay_title",
    "smoothness_figures",
    "smoothness_plot",
]
