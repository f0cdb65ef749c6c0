"""Claim experiments: each preset names its models, data, budget and analyses, and the claims it decides.

Every claim is stated in one sentence, as the paper (or the issue) makes it, and decided by the rules of
`attnlab.experiment.verdicts` (paired t-test over at least 3 shared seeds, p < 0.05 in the claimed direction; Holm for
families; one-sample t-test against a threshold for claims about a level). Budgets are defaults: any training flag
given to ``attnlab compare --preset NAME`` (``--epochs``, ``--subset``, ``--seeds``, ``--device``, ...) overrides
them, so the same preset is a quick look on a laptop and the full experiment on a GPU.

Presets: ``fmm``, ``consistency``, ``smoothness``, ``aw``, ``aw-detection``, ``cram``, ``families`` (the attention of
MobileNetV3 and EfficientNet, beyond ResNets), and ``quick`` (a small version of all of them, for ``make demo``: a
smoke test whose numbers are not evidence). A study file (YAML, see
`attnlab.experiment.study`) is a preset too: `load_preset` takes a name or a path. `make_plan` turns a preset, or
explicit choices, into the `Plan` a comparison runs (it lives here, above `plan`, because it resolves presets).
"""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from ..analysis import get_analysis
from ..analysis.runner import check_analysis_options
from ..errors import AttnlabError, lookup, unknown_name
from ..schema import Range, check
from .claims import (
    attention_weakly_consistent,
    cram_beats_spatial,
    own_attention_helps,
    products_beat_addition,
    smoother_than_plain,
    swap_beats_own,
    weight_attention_adds,
)
from .plan import AnalysisSpec, Plan, check_buildable, parse_entries, parse_seeds
from .study import Budget, Preset, read_study
from .verdicts import TEST_AP

# ------------------------------------------------------------------------------------------------------------ presets

FULL_RECIPE: dict[str, Any] = {"epochs": 15, "subset": None}
CLUTTERED = "cluttered-fashion-mnist"
CRAM_EQ = "cram_resnet20[cram.equivariance=0.1]"
GATED = ("se_resnet20", "cbam_resnet20", "cram_resnet20")
FMM_PLAIN = (
    "fmm_resnet20[merge=mul_bn,merge_args.residual_bias=1,merge_args.shortcut_bias=1]",
    "fmm_resnet20[merge=mul_bn,merge_args.residual_bias=1,merge_args.shortcut_bias=1,post_act=false]",
    "fmm_resnet20[merge=mul]",
    "fmm_resnet20[merge=mul_bn]",
)
"""The paper's literal products, bare and with two fixes (BN biases fixed at 1, which also zeroes F's BN weight at init,
see `MulBNMerge`; no activation after the merge). The fixed forms come first, so a campaign that spans sessions trains
them first (docs/MEASUREMENTS.md says why)."""
FMM_GATED = (
    "fmm_resnet20[merge=gate]",
    "fmm_resnet20[merge=gate_shortcut]",
    "fmm_resnet20[merge=gate_shortcut,merge_args.residual_bias=1]",
    "fmm_resnet20[merge=mul_residual]",
)

FMM_SMOOTH = "fmm_resnet20[merge=gate_shortcut]"
"""The FMM network of the smoothness preset, named by its form (attnlab's default product, a gated one): the same
entry as in the ``fmm`` preset, so the two presets share its runs."""

CPU = Budget(
    seeds=3,
    recipe={"epochs": 15, "subset": None, "precision": "bf16"},
    dataset_recipe={CLUTTERED: {"epochs": 10, "subset": 12000, "val_size": 2000}},
    dataset_options={CLUTTERED: {"canvas": 64}},
    analysis_images={"consistency": 1000, "localization": 1000, "smoothness": 1000, "landscape": 500},
)
"""The ``cpu`` budget of every claim preset (``--budget cpu``): what converges on a 2-core CPU in bf16 autocast
(docs/MEASUREMENTS.md, "Claim preset budgets", says how it was sized)."""

DETECTION = "detection-fashion-mnist"
DETECTION_CPU = Budget(
    seeds=3,
    recipe={"epochs": 3, "precision": "bf16"},
    dataset_options={DETECTION: {"canvas": 64, "size": 4000, "test_size": 1000}},
)
"""The ``cpu`` budget of the detection preset (``--budget cpu``): 64×64 canvases, 3 epochs of batch 16 in bf16
(docs/MEASUREMENTS.md, "Claim preset budgets", says how it was sized)."""

PRESETS: dict[str, Preset] = {}
STUDY_SUFFIXES = (".yaml", ".yml")


def _add(preset: Preset) -> None:
    PRESETS[preset.name] = preset


_add(
    Preset(
        name="fmm",
        description="ResNet-20 against FMMNet-20 with plain and with gated products, on Fashion-MNIST and its "
        "cluttered version.",
        models=("resnet20", *FMM_PLAIN, *FMM_GATED),
        datasets=("fashion-mnist", CLUTTERED),
        seeds=5,
        recipe={**FULL_RECIPE, "nonfinite": "skip"},  # a product that blows up still finishes, with its accuracy
        claims=(
            products_beat_addition("plain", "resnet20", FMM_PLAIN),
            products_beat_addition("gated", "resnet20", FMM_GATED),
        ),
        budgets={"cpu": dataclasses.replace(CPU, recipe={**CPU.recipe, "nonfinite": "skip"})},
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
        analyses=(AnalysisSpec("consistency", GATED, options={"images": 1000, "control_images": 256}),),
        claims=(attention_weakly_consistent(GATED),),
        budgets={"cpu": CPU},
    )
)
_add(
    Preset(
        name="smoothness",
        description="Smoothness between real samples and loss-landscape sharpness of plain, FMM and attention nets.",
        models=("resnet20", FMM_SMOOTH, "se_resnet20", "cbam_resnet20", "cram_resnet20"),
        datasets=("fashion-mnist",),
        seeds=5,
        recipe=dict(FULL_RECIPE),
        analyses=(
            AnalysisSpec("smoothness", options={"images": 1000}),
            AnalysisSpec(  # the claim's settings, heavier than the analysis's quick defaults
                "landscape",
                options={"images": 1000, "grid": 11, "hessian_images": None, "hessian_iters": 20, "trace_samples": 10},
            ),
        ),
        claims=(smoother_than_plain("resnet20", (FMM_SMOOTH, "se_resnet20", "cbam_resnet20", "cram_resnet20")),),
        budgets={"cpu": CPU},
    )
)
_add(
    Preset(
        name="aw",
        description="AW-convolution alone and on top of SE and CBAM.",
        models=("resnet20", "aw_resnet20", "se_resnet20", "aw_se_resnet20", "cbam_resnet20", "aw_cbam_resnet20"),
        datasets=("fashion-mnist",),
        seeds=5,
        recipe=dict(FULL_RECIPE),
        claims=(
            weight_attention_adds(
                (("aw_resnet20", "resnet20"), ("aw_se_resnet20", "se_resnet20"), ("aw_cbam_resnet20", "cbam_resnet20"))
            ),
        ),
        budgets={"cpu": CPU},
    )
)
LIGHT_HEADS = {
    "rpn_pre_nms_top_n_train": 600,
    "rpn_post_nms_top_n_train": 300,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_test": 150,
    "box_batch_size_per_image": 128,
}
"""Faster R-CNN proposal and RoI-sample counts for canvases with at most five objects (torchvision's defaults,
2000/1000 proposals and 512 RoIs per image, are sized for COCO's crowded photographs)."""
DETECTION_RECIPE: dict[str, Any] = {
    "epochs": 12,
    "out_indices": [2, 3],
    "fpn_channels": 64,
    "detector_kwargs": LIGHT_HEADS,
}
"""Faster R-CNN + 64-channel FPN over the backbone's two deepest levels (strides 2 and 4 of ResNet-20), the
`attnlab detect train` recipe otherwise."""

_add(
    Preset(
        name="aw-detection",
        description="Faster R-CNN + FPN on detection-fashion-mnist with ResNet-20 backbones: plain, AW, SE, and AW on "
        "top of SE (the AW paper's detection claim, at the scale of this task).",
        models=("resnet20", "aw_resnet20", "se_resnet20", "aw_se_resnet20"),
        datasets=(DETECTION,),
        seeds=3,
        recipe=DETECTION_RECIPE,
        claims=(weight_attention_adds((("aw_resnet20", "resnet20"), ("aw_se_resnet20", "se_resnet20")), TEST_AP),),
        budgets={"cpu": DETECTION_CPU},
        task="detect",
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
        budgets={"cpu": CPU},
    )
)
FAMILIES = ("mobilenetv3_small_050", "tinynet_e")
"""The ``families`` preset's networks: the smallest MobileNetV3 (width 0.5) and TinyNet-E (EfficientNet-B0 scaled
down by the TinyNet rule), timm's own, each with its own squeeze-excite gates."""
SWAPS = ("eca", "cbam", "cram")
"""The attentions swapped for a family's own SE (`attnlab.convert`): channel (ECA), channel and spatial (CBAM),
rectangle (CRAM)."""


def swapped(network: str, attention: str) -> str:
    """The entry of ``network`` with every attention it has swapped for ``attention`` (``"none"``: removed)."""
    return f"{network}[attention={attention}]"


FAMILY_GATED = tuple(e for n in FAMILIES for e in (n, *(swapped(n, a) for a in SWAPS)))
FAMILIES_CPU = Budget(
    seeds=3,
    recipe={"epochs": 10, "subset": 20000, "precision": "fp32"},
    analysis_images={"consistency": 200},
)
"""The ``cpu`` budget of the ``families`` preset (``--budget cpu``): about 6 h of the 2-core CPU, in fp32 (this CPU
has no native bf16; docs/MEASUREMENTS.md, "Claim preset budgets", says how it was sized)."""

_add(
    Preset(
        name="families",
        description="Beyond ResNets: MobileNetV3 and EfficientNet (TinyNet-E) with their own SE, with it swapped for "
        "ECA, CBAM or CRAM, and without attention.",
        models=tuple(e for n in FAMILIES for e in (n, swapped(n, "none"), *(swapped(n, a) for a in SWAPS))),
        datasets=("fashion-mnist",),
        seeds=5,
        recipe={**FULL_RECIPE, "lr": 0.05},  # half the ResNets' peak: EfficientNet-B0 diverged at 0.1 at 28 px
        analyses=(
            AnalysisSpec(  # captum's integrated gradients left out: the claim reads ablation, at a fraction of the cost
                "consistency",
                FAMILY_GATED,
                options={"images": 1000, "control_images": 64, "methods": ["ablation", "grad_x_act"]},
            ),
        ),
        claims=(
            own_attention_helps(tuple((n, swapped(n, "none")) for n in FAMILIES)),
            swap_beats_own(tuple((swapped(n, a), n) for n in FAMILIES for a in SWAPS)),
            attention_weakly_consistent(FAMILY_GATED),
        ),
        budgets={"cpu": FAMILIES_CPU},
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
            products_beat_addition("gated", "resnet20", ("fmm_resnet20",)),
            attention_weakly_consistent(("se_resnet20", "cram_resnet20")),
            smoother_than_plain("resnet20", ("fmm_resnet20", "se_resnet20")),
            weight_attention_adds((("aw_resnet20", "resnet20"),)),
            cram_beats_spatial("spatial_resnet20", ("cram_resnet20",), None, localize=False),
        ),
        small_budget=True,
    )
)


def get_preset(name: str) -> Preset:
    return lookup(PRESETS, name, "preset")


def load_preset(path_or_name: str | Path) -> Preset:
    """The library's preset of that name, or the study of that YAML file (``.yaml``/``.yml``, `read_study`)."""
    text = str(path_or_name)
    if text in PRESETS:
        return PRESETS[text]
    if Path(text).suffix in STUDY_SUFFIXES:
        return read_study(text)
    error = unknown_name("preset", text, PRESETS)
    raise AttnlabError(f"{error} (or a study file ending .yaml)")


def preset_of(plan: Plan) -> Preset | None:
    """The preset a plan was made from (None: none, or a study file no longer where the plan says it was)."""
    if not plan.preset or (plan.preset not in PRESETS and not Path(plan.preset).is_file()):
        return None
    return load_preset(plan.preset)


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
    budget: str = "full",
    analyses: Sequence[str] | None = None,
    analysis_images: int | None = None,
    baseline: str | None = None,
    command: str = "",
    jobs: int = 1,
    task: str | None = None,
) -> Plan:
    """A `Plan` from a preset and/or explicit choices; explicit budget settings override the preset's.

    Args:
        models: entries (``"a,b[k=v]"`` or a list); required without a preset, refused with one.
        datasets: dataset names; required without a preset; with one, a choice among the preset's datasets (to give
            each its own budget, e.g. fewer images on the larger cluttered canvas).
        seeds: a count or a list (default: the preset's, else 3).
        recipe: `TrainConfig` settings shared by every run (override the preset's budget).
        dataset_options: options given to every dataset.
        preset: a name from `PRESETS`, or a study file (`load_preset`); the plan records it as given.
        budget: the preset's budget (``"full"``: its own; e.g. ``"cpu"``), which explicit settings override.
        analyses: analysis names run on every entry (replace the preset's; ``[]`` runs none).
        analysis_images: images per analysis (overrides every analysis's ``images``).
        baseline: the entry others are compared with (default: the first).
        command: the command line, recorded for the report.
        jobs: worker processes, recorded with the machine.
        task: what the runs train, ``classify`` or ``detect`` (default: the preset's, else ``classify``).
    """
    if preset:
        chosen = load_preset(preset)
        if task is not None and task != chosen.task:
            raise AttnlabError(f"--preset {preset} trains task {chosen.task}; drop --task {task}")
        task = chosen.task
        parts = _from_preset(chosen, budget, models, datasets, seeds, recipe, dataset_options)
    else:
        task = task or "classify"
        parts = _explicit(budget, models, datasets, seeds, recipe, dataset_options, task)
    entries, dataset_list, seed_list, merged_recipe, dataset_recipe, options, specs = parts
    if analyses is not None:
        specs = [AnalysisSpec(name) for name in analyses]
    if analysis_images is not None:
        if analysis_images < 1:
            raise AttnlabError(f"--analysis-images must be ≥ 1, got {analysis_images}")
        specs = [replace(s, options={**s.options, "images": analysis_images}) for s in specs]
    check_analyses(specs)
    built = check_buildable(entries)
    specs = [on_networks_it_reads(spec, built) for spec in specs]
    return Plan(
        entries=entries,
        datasets=dataset_list,
        seeds=seed_list,
        recipe=merged_recipe,
        dataset_options={d: o for d, o in options.items() if o},
        dataset_recipe={d: r for d, r in dataset_recipe.items() if r},
        budget=budget,
        baseline=baseline or "",
        analyses=specs,
        preset=preset,
        command=command,
        machine={"cpus": os.cpu_count(), "platform": platform.platform(terse=True), "jobs": jobs},
        date=datetime.now().astimezone().isoformat(timespec="seconds"),
        task=task,
    )


def _explicit(budget: str, models, datasets, seeds, recipe, dataset_options, task: str) -> tuple:
    """The parts of a plan given without a preset (see `_from_preset`)."""
    if budget != "full":
        raise AttnlabError(f"--budget {budget} needs a --preset (budgets belong to presets)")
    if not models:
        raise AttnlabError("compare needs --models (or a --preset)")
    if not datasets:
        raise AttnlabError("compare needs --dataset (or a --preset)")
    entries = parse_entries(models if isinstance(models, str) else list(models), task)
    seed_list = parse_seeds(3 if seeds is None else seeds)
    options = {d: dict(dataset_options or {}) for d in datasets}
    return entries, list(datasets), seed_list, dict(recipe or {}), {}, options, []


def _from_preset(chosen: Preset, budget: str, models, datasets, seeds, recipe, dataset_options) -> tuple:
    """(entries, datasets, seeds, recipe, recipe per dataset, dataset options, analyses) of a preset at ``budget``,
    with the explicit choices applied over it."""
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
    own = chosen.budget(budget)
    dataset_recipe = {  # a setting given explicitly wins over the budget's per-dataset one
        d: {k: v for k, v in own.dataset_recipe.get(d, {}).items() if k not in (recipe or {})} for d in dataset_list
    }
    options = {d: {**own.dataset_options.get(d, {}), **(dataset_options or {})} for d in dataset_list}
    specs = [
        replace(s, options={**s.options, "images": own.analysis_images[s.name]}) if s.name in own.analysis_images else s
        for s in chosen.analyses
    ]
    return (
        parse_entries(list(chosen.models), chosen.task),
        dataset_list,
        parse_seeds(own.seeds if seeds is None else seeds),
        {**chosen.recipe, **own.recipe, **(recipe or {})},
        dataset_recipe,
        options,
        specs,
    )


def on_networks_it_reads(spec: AnalysisSpec, built: dict[str, Any]) -> AnalysisSpec:
    """``spec`` on the entries (``built``: their networks, by name) that have the attention it reads (consistency:
    gates; localization: spatial attention): given no entries, it runs on those that have it; an entry it names
    without it, or no entry with it, is an error now, not after the training."""
    analysis = get_analysis(spec.name)
    if not analysis.reads:
        return spec
    chosen = [name for name in built if not spec.entries or name in spec.entries]
    lacking = [name for name in chosen if not analysis.can_analyse(built[name])]
    if lacking and (spec.entries or len(lacking) == len(chosen)):
        have = "has" if len(lacking) == 1 else "have"
        raise AttnlabError(f"analysis {spec.name}: {', '.join(lacking)} {have} no {analysis.reads}")
    return replace(spec, entries=tuple(name for name in chosen if name not in lacking)) if lacking else spec


def check_analyses(specs: Sequence[AnalysisSpec]) -> None:
    """Refuse unknown analyses, unknown options and values of the wrong type now, not after hours of training."""
    for spec in specs:
        options = dict(spec.options)
        try:
            check("images", options.pop("images", 1), Annotated[int, Range(1)])
        except AttnlabError as e:
            raise AttnlabError(f"analysis {spec.name}: {e}") from None
        get_analysis(spec.name)
        try:
            check_analysis_options(spec.name, options)  # its errors start with the analysis's name
        except AttnlabError as e:
            raise AttnlabError(f"analysis {e}") from None
