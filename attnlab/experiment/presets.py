"""Claim experiments: each preset names its models, data, budget and analyses, and the claims it decides.

Every claim is stated in one sentence, as the paper (or the issue) makes it, and decided by the rules of
`attnlab.experiment.claims` (paired t-test over at least 3 shared seeds, p < 0.05 in the claimed direction; Holm for
families; one-sample t-test against a threshold for claims about a level). Budgets are defaults: any training flag
given to ``attnlab compare --preset NAME`` (``--epochs``, ``--subset``, ``--seeds``, ``--device``, ...) overrides
them, so the same preset is a quick look on a laptop and the full experiment on a GPU.

Presets: ``fmm``, ``consistency``, ``smoothness``, ``aw``, ``cram``, and ``quick`` (a small version of all of them,
for ``make demo``: a smoke test whose numbers are not evidence). `make_plan` turns a preset, or explicit choices, into
the `Plan` a comparison runs (it lives here, above `plan`, because it resolves presets).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from ..analysis import get_analysis
from ..errors import AttnlabError, unknown_name
from .claims import (
    Claim,
    attention_weakly_consistent,
    cram_beats_spatial,
    multiplication_beats_addition,
    smoother_than_plain,
    weight_attention_adds,
)
from .plan import AnalysisSpec, Plan, check_buildable, parse_entries, parse_seeds


@dataclass(frozen=True)
class Preset:
    """A claim experiment.

    Attributes:
        name: the ``--preset`` name.
        description: what it tests, one sentence.
        models: entries (``model[key=value]``), the baseline first.
        datasets: datasets it trains on.
        seeds: number of seeds (0, 1, ...).
        recipe: `TrainConfig` settings (budget: epochs, subset, ...), overridable by flags.
        dataset_options: options per dataset.
        analyses: analyses run after training.
        claims: the claims it decides.
        small_budget: say in the report's first lines that its numbers are not evidence.
    """

    name: str
    description: str
    models: tuple[str, ...]
    datasets: tuple[str, ...]
    seeds: int
    recipe: dict[str, Any]
    dataset_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    analyses: tuple[AnalysisSpec, ...] = ()
    claims: tuple[Claim, ...] = ()
    small_budget: bool = False


# ------------------------------------------------------------------------------------------------------------ presets

FMM_FORMS = ("gate", "gate_shortcut", "mul", "mul_bn", "mul_residual")
FULL_RECIPE: dict[str, Any] = {"epochs": 15, "subset": None}
CLUTTERED = "cluttered-fashion-mnist"
CRAM_EQ = "cram_resnet20[equivariance=0.1]"
GATED = ("se_resnet20", "cbam_resnet20", "cram_resnet20")

PRESETS: dict[str, Preset] = {}


def _add(preset: Preset) -> None:
    PRESETS[preset.name] = preset


_add(
    Preset(
        name="fmm",
        description="ResNet-20 against FMMNet-20 in every product form, on Fashion-MNIST and its cluttered version.",
        models=("resnet20", *(f"fmm_resnet20[merge={m}]" for m in FMM_FORMS)),
        datasets=("fashion-mnist", CLUTTERED),
        seeds=5,
        recipe={**FULL_RECIPE, "nonfinite": "skip"},  # a product that blows up still finishes, with its accuracy
        claims=(multiplication_beats_addition("resnet20", [f"fmm_resnet20[merge={m}]" for m in FMM_FORMS]),),
    )
)
_add(
    Preset(
        name="consistency",
        description="How well SE, CBAM and CRAM gates rank the units they gate, against ablation importance.",
        models=("resnet20", "se_resnet20", "cbam_resnet20", "cram_resnet20"),
        datasets=("fashion-mnist",),
        seeds=5,
        recipe=dict(FULL_RECIPE),
        analyses=(AnalysisSpec("consistency", GATED, options={"images": 1000}),),
        claims=(attention_weakly_consistent(GATED),),
    )
)
_add(
    Preset(
        name="smoothness",
        description="Smoothness between real samples and loss-landscape sharpness of plain, FMM and attention nets.",
        models=("resnet20", "fmm_resnet20", "se_resnet20", "cbam_resnet20", "cram_resnet20"),
        datasets=("fashion-mnist",),
        seeds=5,
        recipe=dict(FULL_RECIPE),
        analyses=(
            AnalysisSpec("smoothness", options={"images": 1000}),
            AnalysisSpec("landscape", options={"images": 1000}),
        ),
        claims=(smoother_than_plain("resnet20", ("fmm_resnet20", "se_resnet20", "cbam_resnet20", "cram_resnet20")),),
    )
)
_add(
    Preset(
        name="aw",
        description="AW-convolution alone and on top of SE.",
        models=("resnet20", "aw_resnet20", "se_resnet20", "aw_se_resnet20"),
        datasets=("fashion-mnist",),
        seeds=5,
        recipe=dict(FULL_RECIPE),
        claims=(weight_attention_adds((("aw_resnet20", "resnet20"), ("aw_se_resnet20", "se_resnet20"))),),
    )
)
_add(
    Preset(
        name="cram",
        description="Position-wise spatial attention against CRAM, with and without the equivariance term.",
        models=("spatial_resnet20", "cram_resnet20", CRAM_EQ),
        datasets=(CLUTTERED,),
        seeds=5,
        recipe=dict(FULL_RECIPE),
        analyses=(AnalysisSpec("localization", options={"images": 1000}),),
        claims=(cram_beats_spatial("spatial_resnet20", ("cram_resnet20", CRAM_EQ), CRAM_EQ, localize=True),),
    )
)
_add(
    Preset(
        name="quick",
        description="A small version of every claim experiment on Fashion-MNIST: a smoke test, not evidence.",
        models=("resnet20", "se_resnet20", "fmm_resnet20", "aw_resnet20", "spatial_resnet20", "cram_resnet20"),
        datasets=("fashion-mnist",),
        seeds=2,
        recipe={"epochs": 2, "subset": 5000, "val_size": 2000, "batch_size": 64, "warmup_epochs": 0.25},
        analyses=(
            AnalysisSpec(
                "consistency",
                ("se_resnet20", "cram_resnet20"),
                max_seeds=1,
                options={"images": 100, "methods": ["ablation", "grad_x_act"], "random_gate": False},
            ),
            AnalysisSpec("smoothness", ("resnet20", "fmm_resnet20", "se_resnet20"), options={"images": 200}),
            AnalysisSpec(
                "landscape",
                ("resnet20", "fmm_resnet20"),
                max_seeds=1,
                options={"images": 100, "points": 11, "grid": 5, "hessian_iters": 8, "trace_samples": 3},
            ),
        ),
        claims=(
            multiplication_beats_addition("resnet20", ("fmm_resnet20",)),
            attention_weakly_consistent(("se_resnet20", "cram_resnet20")),
            smoother_than_plain("resnet20", ("fmm_resnet20", "se_resnet20")),
            weight_attention_adds((("aw_resnet20", "resnet20"),)),
            cram_beats_spatial("spatial_resnet20", ("cram_resnet20",), None, localize=False),
        ),
        small_budget=True,
    )
)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise unknown_name("preset", name, PRESETS) from None


def list_presets() -> list[str]:
    return list(PRESETS)


# ---------------------------------------------------------------------------------------------------------- make_plan


def make_plan(
    *,
    models: str | Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    seeds: str | int | None = None,
    recipe: dict[str, Any] | None = None,
    dataset_options: dict[str, Any] | None = None,
    preset: str | None = None,
    analyses: Sequence[str] | None = None,
    analysis_images: int | None = None,
    baseline: str | None = None,
    command: str = "",
    jobs: int = 1,
) -> Plan:
    """A `Plan` from a preset and/or explicit choices; explicit budget settings override the preset's.

    Args:
        models: entries (``"a,b[k=v]"`` or a list); required without a preset, refused with one.
        datasets: dataset names; required without a preset; with one, a choice among the preset's datasets (to give
            each its own budget, e.g. fewer images on the larger cluttered canvas).
        seeds: a count or a list (default: the preset's, else 3).
        recipe: `TrainConfig` settings shared by every run (override the preset's budget).
        dataset_options: options given to every dataset.
        preset: a name from `PRESETS`.
        analyses: analysis names run on every entry (replace the preset's; ``[]`` runs none).
        analysis_images: images per analysis (overrides every analysis's ``images``).
        baseline: the entry others are compared with (default: the first).
        command: the command line, recorded for the report.
        jobs: worker processes, recorded with the machine.
    """
    if preset:
        entries, dataset_list, seed_list, merged_recipe, options, specs = _from_preset(
            get_preset(preset), models, datasets, seeds, recipe, dataset_options
        )
    else:
        if not models:
            raise AttnlabError("compare needs --models (or a --preset)")
        if not datasets:
            raise AttnlabError("compare needs --dataset (or a --preset)")
        entries = parse_entries(models if isinstance(models, str) else list(models))
        dataset_list = list(datasets)
        seed_list = parse_seeds(3 if seeds is None else seeds)
        merged_recipe = dict(recipe or {})
        options = {d: dict(dataset_options or {}) for d in dataset_list}
        specs = []
    if analyses is not None:
        specs = [AnalysisSpec(name) for name in analyses]
    if analysis_images is not None:
        if analysis_images < 1:
            raise AttnlabError(f"--analysis-images must be ≥ 1, got {analysis_images}")
        specs = [replace(s, options={**s.options, "images": analysis_images}) for s in specs]
    check_analyses(specs)
    check_buildable(entries)
    return Plan(
        entries=entries,
        datasets=dataset_list,
        seeds=seed_list,
        recipe=merged_recipe,
        dataset_options={d: o for d, o in options.items() if o},
        baseline=baseline or "",
        analyses=specs,
        preset=preset,
        command=command,
        machine={"cpus": os.cpu_count(), "platform": platform.platform(terse=True), "jobs": jobs},
        date=datetime.now().astimezone().isoformat(timespec="seconds"),
    )


def _from_preset(chosen: Preset, models, datasets, seeds, recipe, dataset_options) -> tuple:
    """(entries, datasets, seeds, recipe, dataset options, analyses) of a preset, with the explicit choices applied."""
    if models:
        raise AttnlabError(f"--preset {chosen.name} fixes the models; drop --models (or drop --preset)")
    dataset_list = list(chosen.datasets)
    if datasets:
        foreign = [d for d in datasets if d not in dataset_list]
        if foreign:
            raise AttnlabError(
                f"--preset {chosen.name} runs on {', '.join(dataset_list)}; --dataset {foreign[0]} is not one of them"
            )
        dataset_list = [d for d in dataset_list if d in datasets]
    options = {d: {**chosen.dataset_options.get(d, {}), **(dataset_options or {})} for d in dataset_list}
    return (
        parse_entries(list(chosen.models)),
        dataset_list,
        parse_seeds(chosen.seeds if seeds is None else seeds),
        {**chosen.recipe, **(recipe or {})},
        options,
        list(chosen.analyses),
    )


def check_analyses(specs: Sequence[AnalysisSpec]) -> None:
    """Refuse unknown analyses and options now, not after hours of training."""
    for spec in specs:
        known = {"images", *get_analysis(spec.name).options()}
        for key in spec.options:
            if key not in known:
                raise AttnlabError(f"analysis {spec.name}: {unknown_name('option', key, known)}")
