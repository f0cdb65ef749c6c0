"""What a comparison runs: entries (a model with options, under a display name), datasets, seeds, the shared recipe,
and the analyses to run afterwards. The plan is stored as ``OUT/compare.json``; results and reports are rebuilt
from it and the run folders, never from memory.

Entries are written in the entry grammar of `attnlab.train.entry` (``model[key=value,...]``); a key that is a field
of the task's run configuration changes the recipe of that entry only.

Run folders: ``OUT/runs/<dataset>/<entry>/seed<k>/``, folder names made shell-safe (``fmm_resnet20[merge=gate]`` →
``fmm_resnet20-merge=gate``). Analyses of seed k: ``OUT/analyses/<dataset>/seed<k>/``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AttnlabError, unknown_name
from ..io import write_json_atomic
from ..train.config import merged
from ..train.entry import PER_RUN_FIELDS, Entry, split_top
from ..train.entry import parse_entry as parse_any_entry
from .tasks import Task, get_task

PLAN_FILE = "compare.json"
FAILURE_FILE = "failure.txt"
"""Written into a run folder whose training failed (the error's first line is what the report shows)."""


def parse_entry(text: str, task: str = "classify") -> Entry:
    """``"name[key=value,...]"`` → `Entry`, with the settings of ``task``'s run configuration as training settings
    (`attnlab.train.entry.parse_entry`)."""
    return parse_any_entry(text, get_task(task).config)


def check_buildable(entries: list[Entry]) -> dict[str, Any]:
    """Build each entry's model once, so a bad option fails now, in one line, not hours later when its run starts;
    the networks built, by entry name."""
    from ..layers import check_mechanisms
    from ..models.options import check_buildable as check_model

    built = {}
    for e in entries:
        try:
            built[e.name] = check_model(e.model, e.model_kwargs)
            check_mechanisms(e.train.get("mechanisms", {}))
        except AttnlabError as err:
            raise AttnlabError(f"model entry {e.name!r}: {err}") from None
    return built


def parse_entries(text: str | list[str], task: str = "classify") -> list[Entry]:
    """A comma-separated list (or a list) of entries; display names and folder names must be unique."""
    items = split_top(text) if isinstance(text, str) else [t.strip() for t in text if t.strip()]
    if not items:
        raise AttnlabError("--models: no model given")
    entries = [parse_entry(t, task) for t in items]
    for attr in ("name", "slug"):
        seen: set[str] = set()
        for e in entries:
            key = getattr(e, attr)
            if key in seen:
                raise AttnlabError(f"--models: {e.name!r} is given twice")
            seen.add(key)
    return entries


def parse_seeds(text: str | int | list[int]) -> list[int]:
    """``3`` → seeds 0, 1, 2; ``"0,4,7"`` → those seeds."""
    if isinstance(text, int) and not isinstance(text, bool):
        values = list(range(text)) if text >= 1 else []
    elif isinstance(text, list):
        values = text
    else:
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            raise AttnlabError(f"--seeds: expected a count or a list of integers, got {text!r}") from None
        values = list(range(numbers[0])) if len(numbers) == 1 else numbers
    if not values or any(not isinstance(s, int) or s < 0 for s in values):
        raise AttnlabError(f"--seeds: expected a count ≥ 1 or non-negative integers, got {text!r}")
    if len(set(values)) != len(values):
        raise AttnlabError(f"--seeds: seed given twice in {text!r}")
    return list(values)


def dataset_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", name)


@dataclass(frozen=True)
class AnalysisSpec:
    """An analysis to run on trained entries: ``attnlab.analysis.run_analysis(name, ...)``.

    Attributes:
        name: the analysis (consistency, smoothness, landscape, localization).
        entries: display names of the entries it runs on (empty: all).
        datasets: datasets it runs on (empty: all).
        max_seeds: run it on the first this many seeds only (None: every seed).
        options: keyword options passed on (``images``, analysis-specific ones).
    """

    name: str
    entries: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    max_seeds: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "entries": list(self.entries), "datasets": list(self.datasets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnalysisSpec:
        return cls(
            name=d["name"],
            entries=tuple(d.get("entries") or ()),
            datasets=tuple(d.get("datasets") or ()),
            max_seeds=d.get("max_seeds"),
            options=dict(d.get("options") or {}),
        )


@dataclass
class Plan:
    """A comparison: every entry × dataset × seed trained with ``recipe``, then ``analyses``.

    Attributes:
        entries: the compared networks, baseline first unless ``baseline`` names another.
        datasets: dataset names.
        seeds: training seeds.
        recipe: the shared run settings (`TrainConfig`'s, or `DetectConfig`'s for ``task`` detect), without the
            per-run fields.
        dataset_options: options per dataset name.
        dataset_recipe: run settings per dataset name, over the shared ``recipe`` (a budget may train the
            larger cluttered canvas on fewer images, say).
        budget: the name of the preset budget the plan was made from (``"full"``: the preset's own).
        baseline: display name of the entry every other one is compared with.
        analyses: what to run after training.
        preset: the preset's name, if one was used.
        command: the command line, for the report.
        machine: where it ran (``cpus``, ``platform``), for the report.
        date: when the comparison was (last) started, ISO 8601.
        task: what each run trains (`attnlab.experiment.tasks`): ``classify`` or ``detect``.
    """

    entries: list[Entry]
    datasets: list[str]
    seeds: list[int]
    recipe: dict[str, Any]
    dataset_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset_recipe: dict[str, dict[str, Any]] = field(default_factory=dict)
    budget: str = "full"
    baseline: str = ""
    analyses: list[AnalysisSpec] = field(default_factory=list)
    preset: str | None = None
    command: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    date: str = ""
    task: str = "classify"

    @property
    def kind(self) -> Task:
        return get_task(self.task)

    def __post_init__(self) -> None:
        get_task(self.task)
        names = [e.name for e in self.entries]
        if not self.baseline:
            self.baseline = names[0]
        if self.baseline not in names:
            raise unknown_name("baseline entry", self.baseline, names)
        if not self.datasets:
            raise AttnlabError("a comparison needs at least one dataset")
        if len(set(self.datasets)) != len(self.datasets):
            raise AttnlabError("--dataset: a dataset is given twice")
        for recipe in (self.recipe, *self.dataset_recipe.values()):
            bad = sorted(set(recipe) & set(PER_RUN_FIELDS))
            if bad:
                raise AttnlabError(f"the shared recipe may not set '{bad[0]}'")
        for spec in self.analyses:
            for name in spec.entries:
                if name not in names:
                    raise unknown_name(f"entry of analysis {spec.name}", name, names)
        for dataset in self.datasets:
            for entry in self.entries:  # validates the recipe and every entry's own settings
                self.run_config(dataset, entry, self.seeds[0], Path("."))

    def entry(self, name: str) -> Entry:
        for e in self.entries:
            if e.name == name:
                return e
        raise unknown_name("entry", name, [e.name for e in self.entries])

    def run_config(self, dataset: str, entry: Entry, seed: int, out: Path) -> Any:
        """The run configuration of one run (the task's: `TrainConfig`, `DetectConfig`)."""
        values: dict[str, Any] = {}
        for layer in (self.recipe, self.dataset_recipe.get(dataset, {}), entry.train):
            values.update({key: merged(values.get(key), value) for key, value in layer.items()})
        values = {
            **values,
            "model": entry.model,
            "dataset": dataset,
            "seed": seed,
            "out": str(run_dir(out, dataset, entry, seed)),
            "model_kwargs": dict(entry.model_kwargs),
            "dataset_options": dict(self.dataset_options.get(dataset, {})),
        }
        return self.kind.make_config(values, source=f"entry {entry.name}")

    def analysis_datasets(self, spec: AnalysisSpec) -> list[str]:
        return [d for d in self.datasets if not spec.datasets or d in spec.datasets]

    def analysis_seeds(self, spec: AnalysisSpec) -> list[int]:
        return list(self.seeds[: spec.max_seeds] if spec.max_seeds else self.seeds)

    def runs(self, out: Path) -> list[tuple[str, Entry, int, Path]]:
        """Every (dataset, entry, seed, folder), in report order."""
        return [(d, e, s, run_dir(out, d, e, s)) for d in self.datasets for e in self.entries for s in self.seeds]

    def to_dict(self) -> dict[str, Any]:
        task = {"task": self.task} if self.task != "classify" else {}  # older plans and readers know no task
        return {
            **task,
            "preset": self.preset,
            "datasets": list(self.datasets),
            "entries": [e.name for e in self.entries],
            "seeds": list(self.seeds),
            "baseline": self.baseline,
            "recipe": self.recipe,
            "dataset_options": self.dataset_options,
            "dataset_recipe": self.dataset_recipe,
            "budget": self.budget,
            "analyses": [a.to_dict() for a in self.analyses],
            "command": self.command,
            "machine": self.machine,
            "date": self.date,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        task = d.get("task", "classify")
        return cls(
            task=task,
            entries=parse_entries(list(d["entries"]), task),
            datasets=list(d["datasets"]),
            seeds=list(d["seeds"]),
            recipe=dict(d["recipe"]),
            dataset_options={k: dict(v) for k, v in (d.get("dataset_options") or {}).items()},
            dataset_recipe={k: dict(v) for k, v in (d.get("dataset_recipe") or {}).items()},
            budget=d.get("budget", "full"),
            baseline=d.get("baseline", ""),
            analyses=[AnalysisSpec.from_dict(a) for a in d.get("analyses") or []],
            preset=d.get("preset"),
            command=d.get("command", ""),
            machine=dict(d.get("machine") or {}),
            date=d.get("date", ""),
        )

    def save(self, out: Path) -> None:
        write_json_atomic(Path(out) / PLAN_FILE, self.to_dict())

    @classmethod
    def load(cls, out: Path) -> Plan:
        path = Path(out) / PLAN_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise AttnlabError(f"{out}: no {PLAN_FILE} here (not a folder written by `attnlab compare`)") from None
        except (OSError, ValueError) as e:
            raise AttnlabError(f"{path}: unreadable ({e})") from None
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError) as e:
            raise AttnlabError(f"{path}: malformed plan ({e})") from None


def run_dir(out: Path, dataset: str, entry: Entry, seed: int) -> Path:
    return Path(out) / "runs" / dataset_slug(dataset) / entry.slug / f"seed{seed}"


def analysis_dir(out: Path, dataset: str, seed: int) -> Path:
    return Path(out) / "analyses" / dataset_slug(dataset) / f"seed{seed}"
