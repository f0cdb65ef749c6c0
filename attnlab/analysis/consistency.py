"""Do attention weights agree with feature importance? (FMMNet's first claim: only weakly.)

For every gate of a model (SE, ECA, CBAM's channel and spatial parts, position-wise maps, CRAM masks, AW attention
reduced to channels; see `attnlab.analysis.sites`) and every sample, the gate's value per unit is compared with the
unit's importance for the true class (`attnlab.analysis.importance`): by exact ablation, by gradient × activation and,
when captum is installed, by captum's layer integrated gradients. Per layer and per sample: Spearman's ρ, Kendall's
τ-b and the top-k overlap; then the mean over samples with a 95% Student-t interval.

Two controls give "weak" a yardstick:

- *null*: the same gates against each sample's importances randomly permuted over the units — what ρ chance gives
  (≈ 0, with the interval showing the noise of N samples);
- *random gate*: the same network with the parameters of every attention module randomly permuted (entries shuffled
  within each tensor, so their scale is kept but what they learnt is gone), analysed in full: gates that are a random
  function of the input, against the importances in the network they now gate — what ρ the architecture alone gives.
  It runs on the first ``control_images`` samples.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import AttnlabError, unknown_name
from ..models.capture import capture_attention
from ..stats import mean_ci
from .importance import (
    DEFAULT_MAX_ROWS,
    ablation_importance,
    captum_available,
    captum_importance,
    gradient_x_activation,
    inference_copy,
)
from .ranks import kendall_rows, shuffled_rows, spearman_rows, topk_overlap
from .sites import GateSite, attention_parameters, gate_sites, gate_values

METHODS = ("ablation", "grad_x_act", "captum")
READS = "attention gates (SE, ECA, CBAM, spatial, CRAM or AW)"
"""What consistency reads: a network without any cannot be analysed."""


@torch.inference_mode()
def gates_and_losses(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sites: list[GateSite],
    *,
    grid: int | None = 8,
    aw_reduce: str = "mean",
    batch_size: int = 512,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every site's gate per unit ({path: N×U}) and the per-sample true-class loss, from one pass over ``x``."""
    gates: dict[str, list[torch.Tensor]] = {s.path: [] for s in sites}
    losses = []
    with capture_attention(model) as record:
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            losses.append(torch.nn.functional.cross_entropy(model(xb).float(), yb, reduction="none"))
            for site in sites:
                gates[site.path].append(gate_values(site, record[site.path], grid, aw_reduce))
    return {p: torch.cat(v) for p, v in gates.items()}, torch.cat(losses)


def shuffle_attention(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """A copy of ``model`` whose attention parameters are each randomly permuted (the random-gate control)."""
    control = copy.deepcopy(model)
    with torch.no_grad():
        for site in gate_sites(control):
            for p in attention_parameters(site):
                order = torch.randperm(p.numel(), generator=generator).to(p.device)
                p.copy_(p.flatten()[order].view_as(p))
    return control


def _row_stats(gate: torch.Tensor, importance: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    return {
        "spearman": spearman_rows(gate, importance),
        "kendall": kendall_rows(gate, importance),
        "topk": topk_overlap(gate, importance, k),
    }


def _layer_mean(per_layer: list[np.ndarray]) -> np.ndarray:
    """Per-sample mean over layers, skipping the layers where a sample's correlation is undefined."""
    stacked = np.stack(per_layer)
    counts = np.isfinite(stacked).sum(0)
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, np.nansum(stacked, 0) / np.maximum(counts, 1), np.nan)


def _checked_methods(methods, images: torch.Tensor, labels: torch.Tensor) -> tuple[list[str], dict[str, str]]:
    """The importance methods to run (captum dropped, and noted, when it is not installed)."""
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise AttnlabError(f"consistency needs at least one importance method: {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise unknown_name("importance method", m, METHODS)
    if len(images) != len(labels) or len(images) == 0:
        raise AttnlabError(f"consistency needs as many labels as images (got {len(images)} and {len(labels)})")
    notes = {}
    if "captum" in methods and not captum_available():
        methods.remove("captum")
        notes["captum"] = "skipped: captum is not installed (pip install captum)"
        if not methods:
            raise AttnlabError("consistency: captum is not installed and no other importance method was asked for")
    return methods, notes


def _importances(
    model: nn.Module,
    work: nn.Module,
    sites: list[GateSite],
    images: torch.Tensor,
    x: torch.Tensor,
    labels: torch.Tensor,
    base_loss: torch.Tensor,
    methods: list[str],
    notes: dict[str, str],
    opts: dict[str, Any],
    done: Callable[[str, str, dict[str, torch.Tensor]], None],
) -> dict[str, dict[str, torch.Tensor]]:
    """{method: {site path: N×U importances}} (captum on the first ``captum_images`` images only); each method's
    importances are handed to ``done(part, method, {path: importances})`` as they are finished (ablation: per layer)."""
    importances: dict[str, dict[str, torch.Tensor]] = {m: {} for m in methods}
    grid = opts["grid"]
    if "ablation" in methods:
        for site in sites:
            importances["ablation"][site.path] = ablation_importance(
                work, x, labels, site, grid=grid, max_rows=opts["max_rows"], base_loss=base_loss
            )
            done(f"ablation {site.path}", "ablation", {site.path: importances["ablation"][site.path]})
    if {"grad_x_act", "captum"} & set(methods):  # gradients in the default layout (AW's backward needs it)
        backward_work = inference_copy(model, fold_bn=opts["fast"], channels_last=False)
        backward_sites = gate_sites(backward_work)
    if "captum" in methods:
        n = min(opts["captum_images"], len(x))
        for site, twin in zip(sites, backward_sites):
            importances["captum"][site.path] = captum_importance(
                backward_work, images[:n], labels[:n], twin, grid=grid, steps=opts["captum_steps"]
            )
        notes["captum"] = f"LayerIntegratedGradients of log p_y, {opts['captum_steps']} steps, first {n} images"
        done("captum", "captum", importances["captum"])
    if "grad_x_act" in methods:
        importances["grad_x_act"] = gradient_x_activation(backward_work, images, labels, backward_sites, grid=grid)
        done("grad_x_act", "grad_x_act", importances["grad_x_act"])
    return importances


def _random_gate_spearman(
    work: nn.Module, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, opts: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Per site, Spearman's ρ of the shuffled-attention control's gates against its own ablation importances."""
    n = min(opts["control_images"], len(x))
    control = shuffle_attention(work, generator)
    control_sites = gate_sites(control)
    control_gates, control_loss = gates_and_losses(
        control, x[:n], labels[:n], control_sites, grid=opts["grid"], aw_reduce=opts["aw_reduce"]
    )
    return {
        s.path: spearman_rows(
            control_gates[s.path],
            ablation_importance(
                control, x[:n], labels[:n], s, grid=opts["grid"], max_rows=opts["max_rows"], base_loss=control_loss
            ),
        )
        for s in control_sites
    }


def _layer_statistics(
    site: GateSite,
    gate: torch.Tensor,
    importances: dict[str, dict[str, torch.Tensor]],
    per_sample: dict[str, list[np.ndarray]],
    topk: float,
) -> dict[str, Any]:
    """One layer's statistics for every method; appends each per-sample statistic to ``per_sample``."""
    units = gate.shape[1]
    k = max(1, min(units, math.ceil(topk * units) if topk < 1 else int(topk)))
    layer: dict[str, Any] = {
        "path": site.path,
        "kind": site.kind,
        "mechanism": site.mechanism,
        "units": site.units,
        "n_units": units,
        "k": k,
        "gate_mean": float(gate.mean()),
        "gate_std": float(gate.std()),
    }
    for method, by_site in importances.items():
        importance = by_site[site.path]
        rows = _row_stats(gate[: len(importance)], importance, k)
        for stat, values in rows.items():
            layer.setdefault(stat, {})[method] = mean_ci(values)
            per_sample.setdefault(f"{stat}_{method}", []).append(values)
        layer.setdefault("importance_mean", {})[method] = float(importance.mean())
    return layer


def _controls_of_layer(
    layer: dict[str, Any],
    gate: torch.Tensor,
    reference: torch.Tensor | None,
    control: np.ndarray | None,
    per_sample: dict[str, list[np.ndarray]],
    generator: torch.Generator,
) -> None:
    """Adds the null (shuffled ``reference`` importances) and random-gate control statistics to ``layer``."""
    if reference is not None:
        shuffled = shuffled_rows(reference, generator)
        values = spearman_rows(gate[: len(shuffled)], shuffled)
        layer["null_spearman"] = mean_ci(values)
        per_sample.setdefault("null_spearman", []).append(values)
    if control is not None:
        layer["random_gate_spearman"] = mean_ci(control)
        per_sample.setdefault("random_gate_spearman", []).append(control)


def consistency(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    methods: tuple[str, ...] | list[str] = METHODS,
    grid: int | None = 8,
    topk: float = 0.2,
    aw_reduce: str = "mean",
    null: bool = True,
    random_gate: bool = True,
    control_images: int = 128,
    captum_images: int = 128,
    captum_steps: int = 8,
    max_rows: int = DEFAULT_MAX_ROWS,
    fast: bool = True,
    seed: int = 0,
    keep_values: bool = False,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Agreement between every gate of ``model`` and the importance of what it gates, on ``images``/``labels``.

    Args:
        model: any model with attention (its weights and mode are left untouched; the analysis runs on a copy).
        images: N normalised input images; labels: their classes.
        methods: importance measures among ``"ablation"``, ``"grad_x_act"``, ``"captum"`` (skipped, and said so in
            the result, if captum is not installed).
        grid: cells per side for position units (`attnlab.analysis.sites`).
        topk: top-k overlap with k = ⌈topk·U⌉ units (a fraction), or k itself if ≥ 1.
        aw_reduce: AW attention to channels: ``"mean"`` or ``"effective"`` (`attnlab.analysis.sites`).
        null: add the shuffled-importance control.
        random_gate: add the shuffled-attention-parameters control.
        control_images: samples the random-gate control runs on.
        captum_images, captum_steps: samples and integration steps of captum's integrated gradients.
        max_rows: expanded rows per ablation forward pass.
        fast: run on a BN-folded channels-last copy (`inference_copy`; same function up to float rounding).
        seed: seed of the controls' permutations.
        keep_values: also return the gates and ablation importances per layer under ``"values"`` (for plots).
        progress: called as ``progress(part, finished)`` after each part (a layer's ablation, a method, the
            control): ``finished`` holds ``{method: {layer: Spearman ρ mean and interval}}`` of what is done.

    Returns:
        ``{"layers": [per-layer statistics], "summary": {statistic: {mean, ci_low, ci_high, n}}, ...}``; a summary
        statistic is the per-sample mean over layers, then its mean and interval over samples.
    """
    methods, notes = _checked_methods(methods, images, labels)
    opts = dict(grid=grid, aw_reduce=aw_reduce, max_rows=max_rows, fast=fast, control_images=control_images)
    opts.update(captum_images=captum_images, captum_steps=captum_steps)
    work = inference_copy(model, fold_bn=fast, channels_last=fast)
    x = images.contiguous(memory_format=torch.channels_last) if fast else images
    sites = gate_sites(work)
    if not sites:
        raise AttnlabError(f"consistency: the model has no {READS}")
    generator = torch.Generator().manual_seed(seed)
    gates, base_loss = gates_and_losses(work, x, labels, sites, grid=grid, aw_reduce=aw_reduce)
    finished: dict[str, Any] = {"images": len(x), "spearman": {}}

    def done(part: str, method: str, by_site: dict[str, torch.Tensor]) -> None:
        for path, importance in by_site.items():
            rho = mean_ci(spearman_rows(gates[path][: len(importance)], importance))
            finished["spearman"].setdefault(method, {})[path] = rho
        if progress is not None:
            progress(part, finished)

    importances = _importances(model, work, sites, images, x, labels, base_loss, methods, notes, opts, done)
    controls = _random_gate_spearman(work, x, labels, generator, opts) if random_gate else {}
    if random_gate:
        finished["random_gate_spearman"] = {path: mean_ci(values) for path, values in controls.items()}
        if progress is not None:
            progress("random_gate", finished)
    if random_gate:
        n = min(control_images, len(x))
        notes["random_gate"] = f"attention parameters shuffled (seed {seed}), first {n} images, ablation importance"
    layers, per_sample = [], {}
    reference = "ablation" if "ablation" in methods else methods[0]
    for site in sites:
        layer = _layer_statistics(site, gates[site.path], importances, per_sample, topk)
        null_reference = importances[reference][site.path] if null else None
        _controls_of_layer(layer, gates[site.path], null_reference, controls.get(site.path), per_sample, generator)
        layers.append(layer)
    result: dict[str, Any] = {
        "images": len(x),
        "methods": methods,
        "reference": reference,
        "layers": layers,
        "summary": {stat: mean_ci(_layer_mean(values)) for stat, values in per_sample.items()},
        "notes": notes,
        "settings": {"grid": grid, "topk": topk, "aw_reduce": aw_reduce, "fast": fast, "seed": seed},
    }
    if keep_values:
        result["values"] = {
            s.path: {"gate": gates[s.path].cpu().numpy(), **{m: importances[m][s.path].cpu().numpy() for m in methods}}
            for s in sites
        }
    return result


SPEARMAN_ABLATION = "spearman_ablation"
"""Headline: Spearman ρ between gate and ablation importance, mean over layers then samples."""
NULL_SPEARMAN = "null_spearman"
"""Headline: the same ρ against importances permuted within each sample (chance level)."""
RANDOM_GATE_SPEARMAN = "random_gate_spearman"
"""Headline: ρ of a model whose attention parameters were randomly permuted (a gate that knows nothing)."""

METRICS = (SPEARMAN_ABLATION, NULL_SPEARMAN, RANDOM_GATE_SPEARMAN)

METRIC_MEANINGS = {
    "spearman_{method}": "Spearman ρ between each gate and the {method} importance of what it gates (1 = same order, "
    "0 = unrelated), mean over layers, then samples",
    "kendall_{method}": "Kendall τ-b between gate and {method} importance (like ρ, counted over pairs of units)",
    "topk_{method}": "share of the top-k gated units that are also among the k most important by {method} "
    "(chance ≈ k/U)",
    "spearman_{method}_ci_low": "lower end of the 95% Student-t interval of spearman_{method} over samples",
    "spearman_{method}_ci_high": "upper end of the 95% Student-t interval of spearman_{method} over samples",
    NULL_SPEARMAN: "the same ρ against importances shuffled within each sample: what chance gives (≈ 0)",
    RANDOM_GATE_SPEARMAN: "ρ of the same network with its attention parameters shuffled: what the architecture "
    "alone gives",
}
"""One line per headline metric (``{method}`` stands for an importance method): the legend of ``attnlab analyze``
and of the docs."""


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The few numbers a report quotes from a `consistency` result (means over layers, then over samples)."""
    summary, out = result["summary"], {}
    for method in result["methods"]:
        for stat in ("spearman", "kendall", "topk"):
            out[f"{stat}_{method}"] = summary[f"{stat}_{method}"]["mean"]
        out[f"spearman_{method}_ci_low"] = summary[f"spearman_{method}"]["ci_low"]
        out[f"spearman_{method}_ci_high"] = summary[f"spearman_{method}"]["ci_high"]
    for control in ("null_spearman", "random_gate_spearman"):
        if control in summary:
            out[control] = summary[control]["mean"]
    return out


__all__ = ["METRIC_MEANINGS", "METHODS", "consistency", "gates_and_losses", "headline", "shuffle_attention"]
