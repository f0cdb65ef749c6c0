"""The numbers of a comparison, read back from disk: one row per finished run, per-entry summaries with paired tests,
learning curves, and analysis headlines.

A run counts as finished iff its ``summary.json`` exists (the engine writes it last, atomically), so rebuilding
``results.csv`` from the run folders after any kill gives each finished run exactly once and nothing else. Accuracy
is the LAST-epoch test accuracy of each run (``summary.json``'s ``test_acc``); validation accuracy is shown beside it;
nothing is ever selected on the test set.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import AttnlabError
from ..io import read_json
from ..stats import describe, paired_test
from ..train.rundir import RunDir
from .plan import Plan, analysis_dir

RESULT_FIELDS = (
    "dataset",
    "model",
    "arch",
    "seed",
    "val_acc",
    "test_acc",
    "test_loss",
    "params",
    "flops",
    "train_img_per_s",
    "latency_ms",
    "wall_time_s",
    "epochs",
    "skipped_steps",
    "device",
    "run",
)
"""Columns of ``results.csv``: ``model`` is the entry's display name, ``arch`` the registered model it builds,
``skipped_steps`` the optimiser steps skipped for non-finite values (``nonfinite: skip``) over the whole run."""

SUMMARY_FIELDS = (
    "dataset",
    "model",
    "baseline",
    "n",
    "test_acc_mean",
    "test_acc_std",
    "test_acc_ci_low",
    "test_acc_ci_high",
    "val_acc_mean",
    "val_acc_std",
    "test_loss_mean",
    "delta_vs_baseline",
    "shared_seeds",
    "t_stat",
    "t_p",
    "wilcoxon_stat",
    "wilcoxon_p",
    "params",
    "flops",
    "latency_ms",
    "train_img_per_s",
    "wall_time_s",
)
"""Columns of ``summary.csv``, one row per (dataset, entry). ``delta_vs_baseline`` is the mean over the seeds both
share of (entry − baseline) test accuracy; ``t_p`` and ``wilcoxon_p`` are two-sided paired tests over those seeds;
cost columns are means over seeds (params and FLOPs do not vary)."""


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run's ``metrics.jsonl`` (none if the file is missing)."""
    path = RunDir(folder).metrics
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise AttnlabError(f"{path}: unreadable ({e})") from None


def collect_results(plan: Plan, out: Path) -> list[dict[str, Any]]:
    """One row per finished run, in plan order (dataset, entry, seed)."""
    rows = []
    for dataset, entry, _seed, folder in plan.runs(out):
        if not RunDir(folder).finished:
            continue
        s = read_json(RunDir(folder).summary)
        rows.append(
            {
                "dataset": dataset,
                "model": entry.name,
                "arch": s["model"],
                "seed": s["seed"],
                "val_acc": s["val_acc"],
                "test_acc": s["test_acc"],
                "test_loss": s["test_loss"],
                "params": s["params"],
                "flops": s["flops"],
                "train_img_per_s": s["train_img_per_s"],
                "latency_ms": s["latency_ms"],
                "wall_time_s": s["wall_time_s"],
                "epochs": s["epochs"],
                "skipped_steps": sum(int(m.get("skipped_steps", 0)) for m in read_metrics(folder)),
                "device": s.get("device", ""),
                "run": folder.relative_to(out).as_posix(),
            }
        )
    return rows


def missing_runs(plan: Plan, out: Path) -> list[str]:
    """Run folders (relative to ``out``) the plan asks for that have no ``summary.json``."""
    return [f.relative_to(out).as_posix() for *_, f in plan.runs(out) if not RunDir(f).finished]


def per_seed(rows: Iterable[dict[str, Any]], dataset: str, model: str, metric: str) -> dict[int, float]:
    """``{seed: value}`` of one entry's ``metric`` on ``dataset``."""
    return {r["seed"]: float(r[metric]) for r in rows if r["dataset"] == dataset and r["model"] == model}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(plan: Plan, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary row per (dataset, entry) with at least one finished run (see `SUMMARY_FIELDS`)."""
    table = []
    for dataset in plan.datasets:
        base = per_seed(rows, dataset, plan.baseline, "test_acc")
        for entry in plan.entries:
            mine = [r for r in rows if r["dataset"] == dataset and r["model"] == entry.name]
            if not mine:
                continue
            acc = per_seed(mine, dataset, entry.name, "test_acc")
            val = describe([r["val_acc"] for r in mine])
            test = describe(list(acc.values()))
            shared = sorted(set(acc) & set(base))
            test_vs_base = paired_test([acc[s] for s in shared], [base[s] for s in shared])
            is_base = entry.name == plan.baseline
            table.append(
                {
                    "dataset": dataset,
                    "model": entry.name,
                    "baseline": plan.baseline,
                    "n": test.n,
                    "test_acc_mean": test.mean,
                    "test_acc_std": test.std,
                    "test_acc_ci_low": test.ci_low,
                    "test_acc_ci_high": test.ci_high,
                    "val_acc_mean": val.mean,
                    "val_acc_std": val.std,
                    "test_loss_mean": _mean([r["test_loss"] for r in mine]),
                    "delta_vs_baseline": 0.0 if is_base else test_vs_base.mean_diff,
                    "shared_seeds": len(shared),
                    "t_stat": math.nan if is_base else test_vs_base.t_stat,
                    "t_p": math.nan if is_base else test_vs_base.t_p,
                    "wilcoxon_stat": math.nan if is_base else test_vs_base.wilcoxon_stat,
                    "wilcoxon_p": math.nan if is_base else test_vs_base.wilcoxon_p,
                    "params": _mean([r["params"] for r in mine]),
                    "flops": _mean([r["flops"] for r in mine]),
                    "latency_ms": _mean([r["latency_ms"] for r in mine]),
                    "train_img_per_s": _mean([r["train_img_per_s"] for r in mine]),
                    "wall_time_s": _mean([r["wall_time_s"] for r in mine]),
                }
            )
    return table


def learning_curves(plan: Plan, out: Path) -> dict[tuple[str, str], dict[int, list[float]]]:
    """``{(dataset, entry): {seed: [val_acc of epoch 1, 2, ...]}}`` from each run's ``metrics.jsonl``."""
    curves: dict[tuple[str, str], dict[int, list[float]]] = {}
    for dataset, entry, seed, folder in plan.runs(out):
        if RunDir(folder).finished:
            curves.setdefault((dataset, entry.name), {})[seed] = [float(r["val_acc"]) for r in read_metrics(folder)]
    return curves


def load_analyses(plan: Plan, out: Path) -> dict[tuple[str, str], dict[int, dict[str, Any]]]:
    """``{(dataset, analysis): {seed: the analysis's JSON}}`` for every analysis of the plan that has finished."""
    found: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for spec in plan.analyses:
        for dataset in plan.analysis_datasets(spec):
            for seed in plan.analysis_seeds(spec):
                path = analysis_dir(out, dataset, seed) / f"{spec.name}.json"
                if path.is_file():
                    found.setdefault((dataset, spec.name), {})[seed] = read_json(path)
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
