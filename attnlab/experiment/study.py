"""A study: what a comparison trains, analyses and decides (`Preset`, with its named `Budget`s), written in Python
(the library's presets, `attnlab.experiment.presets`) or as a YAML file of the same fields (`read_study`), so that a
user's own study needs no code:

.. code-block:: yaml

    name: my-aw                       # default: the file's name without .yaml
    description: AW-convolution on top of SE.
    models: [se_resnet20, aw_se_resnet20]
    datasets: [fashion-mnist]
    seeds: 5
    recipe: {epochs: 15}
    analyses: [{name: consistency, entries: [se_resnet20], options: {images: 500}}]
    claims:
      - {claim: weight_attention_adds, pairs: [[aw_se_resnet20, se_resnet20]]}
    budgets:
      cpu: {seeds: 3, recipe: {epochs: 5, subset: 10000}}

Every value is checked against the annotation of the field it sets (`attnlab.schema`); a claim names one of
`attnlab.experiment.claims.CLAIMS` and gives its constructor's arguments, checked the same way (a ``metric`` is a
results.csv column: ``test_acc``, ``test_ap``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import AttnlabError, lookup, unknown_name
from ..io import read_yaml
from ..schema import annotations, check, check_keys, show
from .claims import CLAIMS
from .plan import AnalysisSpec
from .verdicts import RESULT_METRICS, Claim, Metric


@dataclass(frozen=True)
class Budget:
    """One named budget of a preset: how much it trains and analyses, over the preset's own ``recipe``.

    Attributes:
        seeds: number of seeds (0, 1, ...).
        recipe: `TrainConfig` settings shared by every run.
        dataset_recipe: `TrainConfig` settings per dataset (over ``recipe``).
        dataset_options: dataset options per dataset (e.g. the cluttered canvas).
        analysis_images: images per analysis name (missing: the preset's own).
    """

    seeds: int
    recipe: dict[str, Any] = field(default_factory=dict)
    dataset_recipe: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    analysis_images: dict[str, int] = field(default_factory=dict)


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
        budgets: other named budgets (``--budget NAME``) beside the preset's own, ``"full"``.
        task: what each run trains: ``classify`` or ``detect`` (`attnlab.experiment.tasks`).
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
    budgets: dict[str, Budget] = field(default_factory=dict)
    task: str = "classify"

    def budget(self, name: str) -> Budget:
        """Budget ``name``: ``"full"`` (the preset's own settings) or one of ``budgets``."""
        if name == "full":
            return Budget(self.seeds, dict(self.recipe), dataset_options=dict(self.dataset_options))
        if name not in self.budgets:
            raise unknown_name(f"budget of preset {self.name}", name, ["full", *self.budgets])
        return self.budgets[name]


def _checked(cls: type, values: Any, what: str, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``values`` (a mapping) as keyword arguments of dataclass ``cls``: known keys, values of the annotated types,
    the required ones present; ``given`` are set already (built from their own mappings)."""
    if not isinstance(values, dict):
        raise AttnlabError(f"{what} must be a mapping of fields, got {type(values).__name__}")
    try:
        check_keys(values, [f.name for f in fields(cls)], "field")
    except AttnlabError as e:
        raise AttnlabError(f"{what}: {e}") from None
    hints = annotations(cls)
    out = {key: check(f"{what}: {key}", value, hints[key]) for key, value in values.items() if key not in (given or {})}
    out.update(given or {})
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    absent = [name for name in required if name not in out]
    if absent:
        raise AttnlabError(f"{what}: missing {absent[0]}")
    return out


def _analysis(values: Any, what: str) -> AnalysisSpec:
    return AnalysisSpec(**_checked(AnalysisSpec, values, what))


def _claim(values: Any, what: str) -> Claim:
    """A claim of `CLAIMS` built from ``{claim: NAME, ARGUMENT: VALUE, ...}``."""
    if not isinstance(values, dict) or not isinstance(values.get("claim"), str):
        raise AttnlabError(f"{what} must be a mapping naming its constructor (claim: NAME), got {show(values)}")
    options = dict(values)
    name = options.pop("claim")
    try:
        constructor = lookup(CLAIMS, name, "claim")
        params = inspect.signature(constructor).parameters
        check_keys(options, list(params), "argument")
        hints = annotations(constructor)
        if isinstance(options.get("metric"), str) and hints.get("metric") is Metric:
            options["metric"] = lookup(RESULT_METRICS, options["metric"], "metric")
    except AttnlabError as e:
        raise AttnlabError(f"{what} ({name}): {e}") from None
    checked = {key: check(f"{what} ({name}): {key}", value, hints[key]) for key, value in options.items()}
    absent = [n for n, p in params.items() if p.default is p.empty and n not in checked]
    if absent:
        raise AttnlabError(f"{what} ({name}): missing {absent[0]}")
    return constructor(**checked)


def _list(values: Any, what: str) -> list:
    if not isinstance(values, list):
        raise AttnlabError(f"{what} must be a list, got {type(values).__name__}")
    return values


def study_from_dict(values: Any, name: str, source: str) -> Preset:
    """The `Preset` of a study file's mapping ``values`` (``name``: its name where the file gives none); every
    error is one line starting with ``source``."""
    if not isinstance(values, dict):
        raise AttnlabError(f"{source}: a study must be a mapping of fields, got {type(values).__name__}")
    what = source  # every message starts with the file
    given: dict[str, Any] = {"name": check(f"{what}: name", values.get("name", name), str)}
    if "analyses" in values:
        items = _list(values["analyses"], f"{what}: analyses")
        given["analyses"] = tuple(_analysis(a, f"{what}: analyses[{i}]") for i, a in enumerate(items))
    if "claims" in values:
        items = _list(values["claims"], f"{what}: claims")
        given["claims"] = tuple(_claim(c, f"{what}: claims[{i}]") for i, c in enumerate(items))
    if "budgets" in values:
        budgets = values["budgets"]
        if not isinstance(budgets, dict):
            raise AttnlabError(f"{what}: budgets must be a mapping of budget names, got {type(budgets).__name__}")
        if "full" in budgets:
            raise AttnlabError(f"{what}: budgets: 'full' is the study's own settings; name the budget otherwise")
        given["budgets"] = {str(k): Budget(**_checked(Budget, b, f"{what}: budgets.{k}")) for k, b in budgets.items()}
    return Preset(**_checked(Preset, values, what, given))


def read_study(path: str | Path) -> Preset:
    """The study of YAML file ``path`` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise AttnlabError(f"study file {path}: not found")
    return study_from_dict(read_yaml(path), path.stem, str(path))
