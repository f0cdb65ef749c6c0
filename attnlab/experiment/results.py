"""The numbers of a comparison, read back from disk: one row per finished run, per-entry summaries with paired tests,
learning curves, and analysis headlines. The compared score is the plan's task's (`attnlab.experiment.tasks`): test
accuracy for classifiers, COCO AP for detectors.

A run counts as finished iff its ``summary.json`` exists (the engine writes it last, atomically), so rebuilding
``results.csv`` from the run folders after any kill gives each finished run exactly once and nothing else. Accuracy
is the LAST-epoch test accuracy of each run (``summary.json``'s ``test_acc``); validation accuracy is shown beside it;
nothing is ever selected on the test set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..analysis.runner import headlines
from ..errors import AttnlabError
from ..io import read_json
from ..stats import describe, paired_test
from ..train.rundir import RunDir
from .plan import Plan, analysis_dir
from .tasks import TASKS, Task

COST_FIELDS = ("params", "flops", "backbone_flops", "latency_ms", "train_img_per_s", "wall_time_s")
"""Cost columns of ``summary.csv`` (means over the seeds that recorded them), those a task's runs record."""


def result_fields(task: Task) -> tuple[str, ...]:
    """Columns of ``results.csv``: ``model`` is the entry's display name, ``arch`` the registered model it builds, then
    the task's summary columns; ``skipped_steps`` (classifiers) counts the optimiser steps skipped for non-finite
    values (``nonfinite: skip``) over the whole run."""
    skipped = ("skipped_steps",) if task.name == "classify" else ()
    return ("dataset", "model", "arch", "seed", *task.columns, *skipped, "device", "run")


def summary_fields(task: Task) -> tuple[str, ...]:
    """Columns of ``summary.csv``, one row per (dataset, entry), for score S (acc, ap): ``test_S_*`` over seeds,
    ``delta_vs_baseline`` the mean over the seeds both share of (entry − baseline) test score, ``t_p`` and
    ``wilcoxon_p`` two-sided paired tests over those seeds, cost columns means over seeds."""
    score = task.score
    loss = ("test_loss_mean",) if "test_loss" in task.columns else ()
    return (
        "dataset",
        "model",
        "baseline",
        "n",
        *(f"test_{score}_{k}" for k in ("mean", "std", "ci_low", "ci_high")),
        f"val_{score}_mean",
        f"val_{score}_std",
        *loss,
        "delta_vs_baseline",
        "shared_seeds",
        "t_stat",
        "t_p",
        "wilcoxon_stat",
        "wilcoxon_p",
        *(c for c in COST_FIELDS if c in task.columns),
    )


RESULT_FIELDS = tuple(dict.fromkeys(f for task in TASKS.values() for f in result_fields(task)))
"""Every column a ``results.csv`` may have, whatever its task (what a claim's `Metric` may name)."""


def collect_results(plan: Plan, out: Path) -> list[dict[str, Any]]:
    """One row per finished run, in plan order (dataset, entry, seed), with the columns of `result_fields`."""
    rows = []
    for dataset, entry, _seed, folder in plan.runs(out):
        if not RunDir(folder).finished:
            continue
        s = _read_summary(RunDir(folder).summary, plan.kind)
        row = {"dataset": dataset, "model": entry.name, "arch": s["model"], "seed": s["seed"]}
        row.update({key: s.get(key) for key in plan.kind.columns})
        if plan.task == "classify":
            row["skipped_steps"] = sum(int(m.get("skipped_steps", 0)) for m in RunDir(folder).history())
        row.update(device=s.get("device", ""), run=folder.relative_to(out).as_posix())
        rows.append(row)
    return rows


def _read_summary(path: Path, task: Task) -> dict[str, Any]:
    """A run's ``summary.json``, refused in one line when it lacks what every row needs."""
    s = read_json(path)
    needed = ("model", "seed", f"test_{task.score}")
    absent = [key for key in needed if not isinstance(s, dict) or key not in s]
    if absent:
        raise AttnlabError(f"{path}: not a finished {task.name} run's summary (no {', '.join(absent)})")
    return s


def missing_runs(plan: Plan, out: Path) -> list[str]:
    """Run folders (relative to ``out``) the plan asks for that have no ``summary.json``."""
    return [f.relative_to(out).as_posix() for *_, f in plan.runs(out) if not RunDir(f).finished]


def per_seed(rows: Iterable[dict[str, Any]], dataset: str, model: str, metric: str) -> dict[int, float]:
    """``{seed: value}`` of one entry's ``metric`` on ``dataset``."""
    return {r["seed"]: float(r[metric]) for r in rows if r["dataset"] == dataset and r["model"] == model}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(plan: Plan, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary row per (dataset, entry) with at least one finished run (see `summary_fields`)."""
    table = []
    score = plan.kind.score
    for dataset in plan.datasets:
        base = per_seed(rows, dataset, plan.baseline, f"test_{score}")
        for entry in plan.entries:
            mine = [r for r in rows if r["dataset"] == dataset and r["model"] == entry.name]
            if mine:
                table.append(_summary_row(plan, dataset, entry.name, mine, base))
    return table


def _summary_row(plan: Plan, dataset: str, model: str, mine: Sequence[dict[str, Any]], base: dict[int, float]) -> dict:
    score = plan.kind.score
    found = per_seed(mine, dataset, model, f"test_{score}")
    val = describe([r[f"val_{score}"] for r in mine], within=plan.kind.score_range)
    test = describe(list(found.values()), within=plan.kind.score_range)
    shared = sorted(set(found) & set(base))
    test_vs_base = paired_test([found[s] for s in shared], [base[s] for s in shared])
    is_base = model == plan.baseline
    row = {
        "dataset": dataset,
        "model": model,
        "baseline": plan.baseline,
        "n": test.n,
        f"test_{score}_mean": test.mean,
        f"test_{score}_std": test.std,
        f"test_{score}_ci_low": test.ci_low,
        f"test_{score}_ci_high": test.ci_high,
        f"val_{score}_mean": val.mean,
        f"val_{score}_std": val.std,
    }
    if "test_loss" in plan.kind.columns:
        row["test_loss_mean"] = _mean([r["test_loss"] for r in mine])
    row.update(
        delta_vs_baseline=0.0 if is_base else test_vs_base.mean_diff,
        shared_seeds=len(shared),
        t_stat=math.nan if is_base else test_vs_base.t_stat,
        t_p=math.nan if is_base else test_vs_base.t_p,
        wilcoxon_stat=math.nan if is_base else test_vs_base.wilcoxon_stat,
        wilcoxon_p=math.nan if is_base else test_vs_base.wilcoxon_p,
    )
    costs = [c for c in COST_FIELDS if c in plan.kind.columns]  # runs from before a cost was recorded lack it
    row.update({c: _mean([r[c] for r in mine if r[c] is not None]) for c in costs})
    return row


def learning_curves(plan: Plan, out: Path) -> dict[tuple[str, str], dict[int, list[float]]]:
    """``{(dataset, entry): {seed: [validation score of epoch 1, 2, ...]}}`` from each run's ``metrics.jsonl``."""
    curves: dict[tuple[str, str], dict[int, list[float]]] = {}
    key = f"val_{plan.kind.score}"
    for dataset, entry, seed, folder in plan.runs(out):
        if RunDir(folder).finished:
            curves.setdefault((dataset, entry.name), {})[seed] = [float(r[key]) for r in RunDir(folder).history()]
    return curves


def load_analyses(plan: Plan, out: Path) -> dict[tuple[str, str], dict[int, dict[str, Any]]]:
    """``{(dataset, analysis): {seed: the analysis's JSON}}`` for every analysis of the plan that has finished.

    Each gets its ``"headline"`` (`attnlab.analysis.headlines`: derived from the saved results by today's code; a
    ``"headline"`` saved by older versions is replaced, so a mended measure reaches analyses saved before it)."""
    found: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for spec in plan.analyses:
        for dataset in plan.analysis_datasets(spec):
            for seed in plan.analysis_seeds(spec):
                path = analysis_dir(out, dataset, seed) / f"{spec.name}.json"
                if path.is_file():
                    saved = read_json(path)
                    saved["headline"] = headlines(saved)
                    found.setdefault((dataset, spec.name), {})[seed] = saved
    return found


def headline_per_seed(
    analyses: dict[tuple[str, str], dict[int, dict[str, Any]]], dataset: str, analysis: str, model: str, metric: str
) -> dict[int, float]:
    """``{seed: value}`` of one analysis headline metric of one entry (seeds where it is missing are left out)."""
    out = {}
    for seed, result in analyses.get((dataset, analysis), {}).items():
        value = (result.get("headline") or {}).get(model, {}).get(metric)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[seed] = float(value)
    return out
