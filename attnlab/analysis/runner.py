"""``run_analysis``: trained runs in, ``OUT/<name>.json`` and ``OUT/<name>_*.png`` out.

Each checkpoint (a run folder) is loaded with `attnlab.train.load_trained`, its dataset from the run's config, and the
analysis runs on ``images`` test images, the same ones for every checkpoint (the first of a permutation seeded by
``seed``). The JSON holds every number, ``"headline"`` ({label: {metric: value}}, what a report quotes) and
``"groups"``: runs that differ only in their training seed are grouped, and each headline metric gets a mean with a
95% interval over the group's seeds.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..data import DataBundle, Split, batches, load_dataset
from ..data.bundle import seeded_generator
from ..errors import AttnlabError, unknown_name
from . import plots
from .consistency import consistency
from .consistency import headline as consistency_headline
from .landscape import headline as landscape_headline
from .landscape import landscape
from .localization import headline as localization_headline
from .localization import localization
from .smoothness import headline as smoothness_headline
from .smoothness import smoothness
from .stats import mean_ci

ANALYSES: tuple[str, ...] = ("consistency", "smoothness", "landscape", "localization")

# the library function of each analysis, and the keyword arguments the runner sets itself (not user options)
_FUNCTIONS: dict[str, tuple[Callable[..., dict], set[str]]] = {
    "consistency": (consistency, {"keep_values"}),
    "smoothness": (smoothness, {"keep_curves"}),
    "landscape": (landscape, set()),
    "localization": (localization, {"keep_examples"}),
}
_HEADLINES = {
    "consistency": consistency_headline,
    "smoothness": smoothness_headline,
    "landscape": landscape_headline,
    "localization": localization_headline,
}
NOT_GROUPED = {"seed", "out", "device", "data_dir", "eval_batch_size", "detect_anomaly", "epochs"}
OVERLAY_EXAMPLES = 6


def analysis_options(name: str) -> dict[str, Any]:
    """The options (keyword → default) that ``run_analysis(name, ...)`` accepts."""
    if name not in _FUNCTIONS:
        raise unknown_name("analysis", name, ANALYSES)
    function, internal = _FUNCTIONS[name]
    return {
        p.name: p.default
        for p in inspect.signature(function).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in internal | {"seed"}
    }


def _coerce(name: str, key: str, value: Any, default: Any) -> Any:
    """Options from the command line arrive as YAML scalars: "a,b" becomes a list where the default is a sequence."""
    if isinstance(default, tuple | list) and isinstance(value, str):
        return [yaml.safe_load(v.strip()) for v in value.split(",") if v.strip()]
    if isinstance(default, bool) and not isinstance(value, bool):
        raise AttnlabError(f"{name} option {key} must be true or false, got {value!r}")
    if isinstance(default, int | float) and not isinstance(default, bool) and not isinstance(value, int | float):
        raise AttnlabError(f"{name} option {key} must be a number, got {value!r}")
    return value


def _check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    known = analysis_options(name)
    checked = {}
    for key, value in options.items():
        if key not in known:
            raise AttnlabError(f"{name}: {unknown_name('option', key, known)}")
        checked[key] = _coerce(name, key, value, known[key])
    return checked


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "run"


def _jsonable(value: Any) -> Any:
    """Plain JSON: numpy and torch numbers to Python, NaN/inf to null, tuples to lists, keys to strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _labels(checkpoints: list[Path], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        labels = [str(label) for label in labels]
        if len(labels) != len(checkpoints):
            raise AttnlabError(f"got {len(labels)} labels for {len(checkpoints)} checkpoints")
        if len(set(labels)) != len(labels):
            raise AttnlabError(f"labels must be distinct, got {labels}")
        return labels
    names = [c.name or str(c) for c in checkpoints]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def _test_subset(split: Split, images: int, seed: int) -> Split:
    n = min(images, len(split))
    return split.take(torch.randperm(len(split), generator=seeded_generator(seed))[:n].sort().values)


def _load(checkpoint: Path, device: str, cache: dict[str, DataBundle]) -> tuple[torch.nn.Module, Any, DataBundle]:
    from ..train import load_trained

    if not checkpoint.exists():
        raise AttnlabError(f"{checkpoint}: no such run folder")
    model, cfg = load_trained(checkpoint, device=device)
    if cfg is None:
        raise AttnlabError(f"{checkpoint}: no config.yaml beside the weights; analyze needs a run folder")
    key = json.dumps([cfg.dataset, cfg.data_dir, cfg.val_size, cfg.dataset_options], sort_keys=True, default=str)
    if key not in cache:
        cache[key] = load_dataset(cfg.dataset, cfg.data_dir, val_size=cfg.val_size, **cfg.dataset_options)
    bundle = cache[key]
    if bundle.in_chans != model.in_chans or bundle.num_classes != model.num_classes:
        raise AttnlabError(
            f"{checkpoint}: {cfg.dataset} has {bundle.in_chans} channel(s) and {bundle.num_classes} classes; the model "
            f"takes {model.in_chans} and {model.num_classes}"
        )
    return model, cfg, bundle


def _groups(configs: dict[str, Any], headlines: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Runs whose configs differ only in the seed (and other settings that do not change the recipe), with a mean and
    95% interval of every headline metric over their seeds."""
    buckets: dict[str, list[str]] = {}
    for label, cfg in configs.items():
        recipe = {k: v for k, v in cfg.to_dict().items() if k not in NOT_GROUPED}
        buckets.setdefault(json.dumps(recipe, sort_keys=True, default=str), []).append(label)
    groups = {}
    for members in buckets.values():
        if len(members) < 2:
            continue
        cfg = configs[members[0]]
        name = f"{cfg.model}@{cfg.dataset}"
        while name in groups:
            name += "'"
        metrics = sorted(set().union(*(headlines[m] for m in members)))
        groups[name] = {
            "members": members,
            "seeds": [configs[m].seed for m in members],
            "headline": {k: mean_ci([headlines[m].get(k, math.nan) for m in members]) for k in metrics},
        }
    return groups


def run_analysis(
    name: str,
    checkpoints: Sequence[str | Path],
    out: str | Path,
    *,
    images: int = 1000,
    seed: int = 0,
    device: str = "cpu",
    labels: Sequence[str] | None = None,
    **options,
) -> dict:
    """Run analysis ``name`` on trained runs and write ``OUT/<name>.json`` and ``OUT/<name>_*.png``.

    Args:
        name: one of `ANALYSES`.
        checkpoints: run folders (``attnlab train --out``); several are compared side by side.
        out: output folder (created).
        images: test images analysed per checkpoint (the same ones for all).
        seed: seed of the image choice and of every random draw of the analysis.
        device: where the models run.
        labels: names of the checkpoints in tables and plots (default: the run folder names).
        **options: options of the analysis (`analysis_options(name)` lists them with their defaults).

    Returns:
        The JSON dict: ``results`` per label, ``headline`` {label: {metric: float}}, ``groups`` over seeds,
        ``plots`` (PNG file names).
    """
    if name not in _FUNCTIONS:
        raise unknown_name("analysis", name, ANALYSES)
    options = _check_options(name, options)
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise AttnlabError(f"images must be a positive integer, got {images!r}")
    paths = [Path(c) for c in checkpoints]
    if not paths:
        raise AttnlabError(f"analyze {name}: give at least one --checkpoint")
    names = _labels(paths, labels)
    out = Path(out)
    function, _ = _FUNCTIONS[name]
    cache: dict[str, DataBundle] = {}
    results, configs, seconds, extras, n_images = {}, {}, {}, {}, {}
    for label, path in zip(names, paths):
        model, cfg, bundle = _load(path, device, cache)
        split = _test_subset(bundle.test, images, seed)
        if name == "localization" and split.boxes is None:
            raise AttnlabError(
                f"{path}: dataset {cfg.dataset} has no ground-truth boxes; localization needs a dataset with boxes "
                "such as cluttered-fashion-mnist"
            )
        x, y = next(batches(split, bundle, len(split), train=False, device=device))
        started = time.perf_counter()
        if name == "consistency":
            result = function(model, x, y, seed=seed, keep_values=True, **options)
            extras[label] = result.pop("values")
        elif name == "smoothness":
            result = function(model, x, y, seed=seed, keep_curves=True, **options)
        elif name == "landscape":
            result = function(model, x, y, seed=seed, **options)
        else:
            held_out = _test_subset(bundle.val, images, seed)  # the best layer is chosen here, not on the test images
            xv, _ = next(batches(held_out, bundle, len(held_out), train=False, device=device))
            result = function(
                model,
                x,
                split.boxes.to(device),
                keep_examples=OVERLAY_EXAMPLES,
                select_images=xv,
                select_boxes=held_out.boxes.to(device),
                **options,
            )
            extras[label] = result.pop("examples")
        seconds[label] = time.perf_counter() - started
        results[label], configs[label], n_images[label] = result, cfg, len(split)
    headlines = {label: _HEADLINES[name](r) for label, r in results.items()}

    out.mkdir(parents=True, exist_ok=True)
    written = _plots(name, results, extras, out)
    for result in results.values():
        result.pop("curves", None)  # drawn; the JSON keeps the numbers
    report = {
        "analysis": name,
        "checkpoints": {label: str(p) for label, p in zip(names, paths)},
        "models": {label: cfg.model for label, cfg in configs.items()},
        "datasets": {label: cfg.dataset for label, cfg in configs.items()},
        "images": n_images,
        "seed": seed,
        "device": device,
        "options": options,
        "seconds": seconds,
        "headline": headlines,
        "groups": _groups(configs, headlines),
        "results": results,
        "plots": written,
    }
    report = _jsonable(report)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    return report


def _plots(name: str, results: dict, extras: dict, out: Path) -> list[str]:
    written = []
    if name == "consistency":
        written.append(plots.consistency_bars(results, out / f"{name}_layers.png"))
        for label, values in extras.items():
            written.append(plots.consistency_scatter(values, out / f"{name}_{_slug(label)}_scatter.png", label))
    elif name == "smoothness":
        written.append(plots.smoothness_plot(results, out / f"{name}_curves.png"))
    elif name == "landscape":
        written.append(plots.landscape_1d_plot(results, out / f"{name}_1d.png"))
        for label, result in results.items():
            slug = _slug(label)
            written += plots.landscape_2d_plots(
                result["surface_2d"], out / f"{name}_{slug}_contour.png", out / f"{name}_{slug}_surface.png", label
            )
    else:
        written.append(plots.localization_bars(results, out / f"{name}_iou.png"))
        for label, examples in extras.items():
            written.append(plots.localization_overlay(examples, out / f"{name}_{_slug(label)}_overlay.png", label))
    return written


__all__ = ["ANALYSES", "analysis_options", "run_analysis"]
