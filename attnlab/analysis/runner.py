"""``run_analysis``: trained runs (or any network with its weights) in, ``OUT/<name>.json`` and ``OUT/<name>_*.png``
out.

Each checkpoint (a run folder) is loaded with `attnlab.train.load_trained`, its dataset from the run's config; a
`TrainConfig` instead of a folder is a network with no run folder (``attnlab analyze NAME --model M --weights FILE
--dataset D``), built for its dataset as training builds it (`attnlab.train.classify.build_model`: its ``weights`` or
``pretrained``, the data's channels, classes and image size) and put in eval mode. Either way the analysis runs on
``images`` test images, the same ones for every checkpoint (the first of a permutation seeded by ``seed``).

The JSON holds every number (``"results"`` per label) and ``"groups"``: the labels of runs that differ only in their
training seed. It holds no headline: `headlines` and `group_means` derive those numbers from the
results with today's code (the CLI's printout and the reports do), so a mended headline reaches analyses saved
before it and a file never says two things.

The JSON is written as the work goes: after every finished part of an analysis (a surface, a layer's ablation) and
every finished checkpoint, atomically, with ``"complete": false`` and the parts of the checkpoint under way in
``"unfinished"``; an interrupted analysis keeps what it finished. Progress shows as a bar on a terminal and one line
per part otherwise. A model at chance level on the analysed images is warned about on stderr and in the JSON's
``"warnings"``: its attention has learnt nothing for the analysis to find.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data import DataBundle, Split, batches
from ..data.bundle import seeded_generator
from ..errors import AttnlabError
from ..io import check_writable, jsonable, make_dir, write_json_atomic
from ..schema import check_call, check_keys
from ..stats import mean_ci
from ..train.compiling import compile_module, is_compiled, run_or_fall_back
from ..train.config import SAME_RECIPE, TrainConfig
from .registry import Analysis, analysis_options, get_analysis


def check_analysis_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The analysis's own options (not the runner's), of the types its function declares."""
    try:
        check_keys(options, analysis_options(name), "option")
    except AttnlabError as e:
        raise AttnlabError(f"{name}: {e}") from None
    return check_call(get_analysis(name).function, options, name)


Source = Path | TrainConfig
"""What an analysis runs on: a run folder, or the configuration of a network to build (`_load`)."""


def _where(source: Source) -> str:
    """A source as error messages and the JSON's ``checkpoints`` name it."""
    if isinstance(source, Path):
        return str(source)
    start = f"weights {source.weights}" if source.weights else "pretrained" if source.pretrained else "untrained"
    return f"{source.model} ({start})"


def _labels(checkpoints: list[Source], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        labels = [str(label) for label in labels]
        if len(labels) != len(checkpoints):
            raise AttnlabError(f"got {len(labels)} labels for {len(checkpoints)} checkpoints")
        if len(set(labels)) != len(labels):
            raise AttnlabError(f"labels must be distinct, got {labels}")
        return labels
    names = [(c.name or str(c)) if isinstance(c, Path) else c.model for c in checkpoints]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def _test_subset(split: Split, images: int, seed: int) -> Split:
    n = min(images, len(split))
    return split.take(torch.randperm(len(split), generator=seeded_generator(seed))[:n].sort().values)


def _load(checkpoint: Source, device: str, cache: dict[str, DataBundle]) -> tuple[torch.nn.Module, Any, DataBundle]:
    from ..train import check_fits, load_trained, run_data
    from ..train.classify import build_model

    if isinstance(checkpoint, TrainConfig):
        bundle = _data(checkpoint, cache, run_data)
        return build_model(checkpoint, bundle).to(device).eval(), checkpoint, bundle
    if not checkpoint.exists():
        raise AttnlabError(f"{checkpoint}: no such run folder")
    model, cfg = load_trained(checkpoint, device=device)
    if cfg is None:
        raise AttnlabError(f"{checkpoint}: no config.yaml beside the weights; analyze needs a run folder")
    bundle = _data(cfg, cache, run_data)
    check_fits(model, bundle, f"{checkpoint}: {cfg.dataset}")
    return model, cfg, bundle


def _data(cfg: TrainConfig, cache: dict[str, DataBundle], run_data) -> DataBundle:
    """The run's data (`attnlab.train.run_data`), loaded once for all sources that share it."""
    key = json.dumps([cfg.dataset, cfg.data_dir, cfg.val_size, cfg.dataset_options], sort_keys=True, default=str)
    if key not in cache:
        cache[key] = run_data(cfg)
    return cache[key]


def _groups(configs: dict[str, Any]) -> dict[str, Any]:
    """Runs whose configs differ only in the seed (and other settings that do not change the recipe):
    ``{"model@dataset": {"members": [label, ...], "seeds": [...]}}``, groups of one left out."""
    buckets: dict[str, list[str]] = {}
    for label, cfg in configs.items():
        recipe = {k: v for k, v in cfg.to_dict().items() if k not in SAME_RECIPE}
        buckets.setdefault(json.dumps(recipe, sort_keys=True, default=str), []).append(label)
    groups = {}
    for members in buckets.values():
        if len(members) < 2:
            continue
        cfg = configs[members[0]]
        name = f"{cfg.model}@{cfg.dataset}"
        while name in groups:
            name += "'"
        groups[name] = {"members": members, "seeds": [configs[m].seed for m in members]}
    return groups


def _saved(result: dict[str, Any]) -> dict[str, Any]:
    """A result as the JSON keeps it: the curves are drawn, not kept."""
    return {k: v for k, v in result.items() if k != "curves"}


def headlines(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{label: {metric: value}}`` of a saved analysis (`run_analysis`'s JSON): what a report quotes."""
    headline = get_analysis(report["analysis"]).headline
    return {label: headline(result) for label, result in report["results"].items()}


def group_means(report: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """``{group: {metric: mean_ci}}``: each headline metric's mean and 95% interval over a seed group's members."""
    numbers = headlines(report)
    means = {}
    for name, group in report.get("groups", {}).items():
        members = [numbers[m] for m in group["members"]]
        metrics = dict.fromkeys(k for m in members for k in m)  # in the headline's own order
        means[name] = {k: mean_ci([m.get(k, math.nan) for m in members]) for k in metrics}
    return means


def chance_margin(classes: int, images: int) -> float:
    """The accuracy below which a model is at chance level: 1/classes plus three binomial standard errors."""
    p = 1 / classes
    return p + 3 * math.sqrt(p * (1 - p) / images)


@torch.inference_mode()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    was_training = model.training
    model.eval()
    try:
        correct = sum(
            int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size))
        )
    finally:
        model.train(was_training)
    return correct / len(y)


class _Progress:
    """Shows an analysis's finished parts (a tqdm bar on a terminal, else a line each) and hands each to ``save``."""

    def __init__(self, what: str, save):
        self.what, self.save, self.started = what, save, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=what, unit="part", leave=False, file=sys.stderr)

    def __call__(self, part: str, finished: dict[str, Any]) -> None:
        self.save(finished)
        if self.bar is not None:
            self.bar.set_postfix_str(part, refresh=False)
            self.bar.update()
        else:
            print(f"{self.what}: {part} done ({time.perf_counter() - self.started:.0f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _analyse_one(
    analysis: Analysis, path: str, model, cfg, bundle, images: int, seed: int, device: str, options, progress
):
    """(result, the per-sample extra for the figures or None, images analysed, seconds, accuracy on the analysed
    images, number of classes) of one checkpoint."""
    split = _test_subset(bundle.test, images, seed)
    if analysis.needs_boxes and split.boxes is None:
        raise AttnlabError(
            f"{path}: dataset {cfg.dataset} has no ground-truth boxes; {analysis.name} needs a dataset with boxes "
            "such as cluttered-fashion-mnist"
        )
    x, y = next(batches(split, bundle, len(split), train=False, device=device))
    target = split.boxes.to(device) if analysis.needs_boxes else y
    keywords = {**analysis.internal, **options, **({"seed": seed} if analysis.seeded else {})}
    if "progress" in inspect.signature(analysis.function).parameters:
        keywords["progress"] = progress
    accuracy = _accuracy(model, x, y)
    started = time.perf_counter()
    if analysis.selects_on_validation:  # what it chooses (a layer), it chooses here, not on the scored test images
        held_out = _test_subset(bundle.val, images, seed)
        keywords["select_images"], _ = next(batches(held_out, bundle, len(held_out), train=False, device=device))
        keywords["select_boxes"] = held_out.boxes.to(device)
    result = analysis.function(model, x, target, **keywords)
    seconds = time.perf_counter() - started
    extra = result.pop(analysis.extra) if analysis.extra else None
    return result, extra, len(split), seconds, accuracy, bundle.num_classes


def run_analysis(
    name: str,
    checkpoints: Sequence[str | Path | TrainConfig],
    out: str | Path,
    *,
    images: int = 1000,
    seed: int = 0,
    device: str = "cpu",
    labels: Sequence[str] | None = None,
    compile: bool = False,
    **options,
) -> dict:
    """Run analysis ``name`` on trained runs and write ``OUT/<name>.json`` and ``OUT/<name>_*.png``.

    Args:
        name: one of `attnlab.analysis.ANALYSES`.
        checkpoints: run folders (``attnlab train --out``), or configurations of networks to build with no run folder
            (``TrainConfig(model="efficientnet_b0", weights="w.safetensors", dataset=...)``: its ``model``,
            ``model_kwargs``, ``weights`` / ``pretrained`` and data); several are compared side by side.
        out: output folder (created).
        images: test images analysed per checkpoint (the same ones for all).
        seed: seed of the image choice and of every random draw of the analysis.
        device: where the models run.
        labels: names of the checkpoints in tables and plots (default: the run folder names, a built network's
            model name).
        compile: torch.compile each model in place (`attnlab.train.compiling`); an analysis that cannot run compiled
            (a double backward, an op inductor refuses) runs again eagerly, with one warning line. The JSON's
            ``compile`` says per label what actually ran.
        **options: options of the analysis (`analysis_options(name)` lists them with their defaults).

    Returns:
        The JSON dict: ``results`` per label, ``groups`` over seeds, ``plots`` (PNG file names); `headlines` and
        `group_means` of it are the numbers to quote.
    """
    analysis = get_analysis(name)
    options = check_analysis_options(name, options)
    check_writable(out, "--out")
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise AttnlabError(f"images must be a positive integer, got {images!r}")
    paths = [c if isinstance(c, TrainConfig) else Path(c) for c in checkpoints]
    if not paths:
        raise AttnlabError(f"analyze {name}: give at least one --checkpoint")
    names = _labels(paths, labels)
    cache: dict[str, DataBundle] = {}
    results, configs, seconds, extras, n_images, compiled = {}, {}, {}, {}, {}, {}
    accuracy, warned = {}, []

    def report(unfinished: dict[str, Any] | None = None, plots: list[str] | None = None) -> dict[str, Any]:
        """The JSON as it stands; written at once (``complete`` once the figures are drawn)."""
        value = {
            "analysis": name,
            "complete": plots is not None,
            "checkpoints": {label: _where(p) for label, p in zip(names, paths)},
            "models": {label: cfg.model for label, cfg in configs.items()},
            "datasets": {label: cfg.dataset for label, cfg in configs.items()},
            "images": n_images,
            "accuracy": accuracy,
            "warnings": warned,
            "seed": seed,
            "device": device,
            "compile": compiled,
            "options": options,
            "seconds": seconds,
            "groups": _groups(configs),
            "results": {label: _saved(r) for label, r in results.items()},
            **({"unfinished": unfinished} if unfinished else {}),
            "plots": plots or [],
        }
        value = jsonable(value)
        write_json_atomic(make_dir(out, "--out") / f"{name}.json", value, indent=1)  # the folder once there is work
        return value

    for label, path in zip(names, paths):
        model, configs[label], bundle = _load(path, device, cache)
        if compile:
            compile_module(model)
        cfg = configs[label]
        progress = _Progress(f"{name} of {label}", lambda finished, label=label: report({label: _saved(finished)}))
        one = functools.partial(
            _analyse_one, analysis, _where(path), model, cfg, bundle, images, seed, device, options, progress
        )
        try:
            found = run_or_fall_back(model, f"{name} of {label}", one)
        finally:
            progress.close()
        compiled[label] = is_compiled(model)  # False where the compiled call failed and it ran eagerly
        results[label], extra, n_images[label], seconds[label], accuracy[label], classes = found
        if accuracy[label] <= chance_margin(classes, n_images[label]):
            warned.append(
                f"{label} is at chance level on the analysed images ({accuracy[label]:.1%} correct; chance "
                f"{1 / classes:.1%} for {classes} classes): it has learnt nothing its attention could show, and its "
                "numbers say nothing about the mechanism"
            )
            print(f"attnlab: WARNING: {warned[-1]}", file=sys.stderr, flush=True)
        if extra is not None:
            extras[label] = extra
        report()
    written = analysis.figures(results, extras, make_dir(out, "--out"))
    return report(plots=written)


__all__ = ["chance_margin", "check_analysis_options", "group_means", "headlines", "run_analysis"]
