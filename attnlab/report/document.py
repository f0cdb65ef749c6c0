"""The comparison report, rebuilt from disk: ``results.csv``, ``summary.csv``, figures, ``report.md``, ``report.html``.

Everything comes from the files a comparison leaves (``compare.json``, each run's ``summary.json`` and
``metrics.jsonl``, each analysis's JSON and PNGs), so ``attnlab report DIR`` rebuilds the same report without
retraining, and the report is deterministic: the only date in it is the one stored in ``compare.json``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..experiment.plan import FAILURE_FILE, Plan, analysis_dir, dataset_slug
from ..experiment.presets import preset_of
from ..experiment.results import (
    collect_results,
    learning_curves,
    load_analyses,
    missing_runs,
    result_fields,
    summarize,
    summary_fields,
)
from ..experiment.study import Preset
from ..experiment.verdicts import Evidence, decide_claims, rules
from ..io import write_csv, write_text_atomic
from ..stats import ALPHA
from . import plots
from .render import Block, Bullets, Callout, Heading, Image, Paragraph, Table, to_html, to_markdown

FIGURES = "figures"
MIN_SEEDS = 3
"""Fewer seeds than this and the report says its numbers are not evidence."""
RECIPE_SHOWN = (
    "epochs",
    "subset",
    "val_size",
    "batch_size",
    "lr",
    "schedule",
    "warmup_epochs",
    "weight_decay",
    "label_smoothing",
    "augment",
    "precision",
    "nonfinite",
    "device",
)


@dataclass(frozen=True)
class ReportFiles:
    """Paths of what `build_report` wrote."""

    results: Path
    summary: Path
    markdown: Path
    html: Path


def pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.2f}"


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def num(x: float, digits: int = 4) -> str:
    return "n/a" if _missing(x) else f"{x:.{digits}g}"


def _measured(fmt: Callable[[float], str]) -> Callable[[float | None], str]:
    """``fmt`` for a cost a run may lack (None where the run predates the cost, NaN as a mean over no run): shown as
    n/a. A column that no row has a number for is left out of its table."""
    return lambda x: "n/a" if _missing(x) else fmt(x)


def pvalue(p: float) -> str:
    return "–" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


NONE_MEANS = {"subset": "all", "val_size": "the dataset's own", "device": "auto", "precision": "auto"}
"""What an unset setting means, in the report's words (else "none")."""


def human(key: str, value: Any) -> str:
    """A setting's value in words, never a Python repr: None → what unset means, booleans on/off, lists a, b."""
    if value is None:
        return NONE_MEANS.get(key, "none")
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return ", ".join(human(key, v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {human(k, v)}" for k, v in value.items()) or "none"
    return str(value)


def _settings(values: dict[str, Any], sep: str = " ") -> str:
    return ", ".join(f"{k}{sep}{human(k, v)}" for k, v in values.items())


def wilcoxon_floor(n: int) -> float:
    """The smallest two-sided p the exact Wilcoxon signed-rank test can give with ``n`` paired seeds: 2^(1−n)."""
    return 2.0 ** (1 - n) if n >= 1 else math.nan


def _recipe_text(plan: Plan) -> str:
    recipe = plan.recipe
    cfg = plan.kind.make_config(dict(recipe), source="the comparison's recipe").to_dict()
    keys = [*(k for k in RECIPE_SHOWN if k in cfg), *(k for k in recipe if k not in RECIPE_SHOWN)]
    return _settings({k: cfg[k] for k in keys})


def changes_from_preset(plan: Plan, preset: Preset) -> list[str]:
    """How ``plan`` departs from the budget of ``preset`` it names, as ``"epochs 15 → 5"`` items (empty if it does
    not)."""
    budget = preset.budget(plan.budget)
    changes = []
    if len(plan.seeds) != budget.seeds:
        changes.append(f"seeds {budget.seeds} → {len(plan.seeds)}")
    if list(plan.datasets) != list(preset.datasets):
        changes.append(f"datasets {', '.join(preset.datasets)} → {', '.join(plan.datasets)}")
    defaults = plan.kind.config().to_dict()
    for dataset in plan.datasets:
        own = {**preset.recipe, **budget.recipe, **budget.dataset_recipe.get(dataset, {})}
        used = {**plan.recipe, **plan.dataset_recipe.get(dataset, {})}
        where = f" ({dataset})" if len(plan.datasets) > 1 else ""
        for key in sorted((set(own) | set(used)) - plan.kind.neutral):  # where it ran, not how much it trained
            before, after = own.get(key, defaults.get(key)), used.get(key, defaults.get(key))
            if before != after:
                shown = [human(key, v) for v in (before, after)]
                changes.append(f"{key}{where} {shown[0]} → {shown[1]}")
        own_options, used_options = budget.dataset_options.get(dataset, {}), plan.dataset_options.get(dataset, {})
        for key in sorted(set(own_options) | set(used_options)):
            if own_options.get(key) != used_options.get(key):
                before, after = (human(key, o[key]) if key in o else "default" for o in (own_options, used_options))
                changes.append(f"{key}{where} {before} → {after}")
    own_images = {s.name: budget.analysis_images.get(s.name, s.options.get("images")) for s in preset.analyses}
    for spec in plan.analyses:
        if spec.name in own_images and spec.options.get("images") != own_images[spec.name]:
            changes.append(f"{spec.name} images {own_images[spec.name]} → {spec.options.get('images')}")
    return changes


def budget_text(plan: Plan) -> str:
    """The budget line: a preset's budget only where it ran as that preset defines it, else "custom" and the recipe."""
    preset = preset_of(plan)
    if preset is None:
        return f"custom (no preset): {_recipe_short(plan)}"
    changes = changes_from_preset(plan, preset)
    if changes:
        return f"custom: preset `{plan.preset}`'s `{plan.budget}` budget with {', '.join(changes)}"
    return f"`{plan.budget}`"


def _failure(out: Path, run: str) -> str | None:
    """The first line of a run's ``failure.txt``, if it failed."""
    path = out / run / FAILURE_FILE
    try:
        return path.read_text().splitlines()[0] if path.is_file() else None
    except (OSError, IndexError):
        return "failed (unreadable failure.txt)"


def _budget(plan: Plan, out: Path, rows: Sequence[dict[str, Any]], missing: Sequence[str]) -> list[Block]:
    devices = sorted({r["device"] for r in rows if r.get("device")})
    machine = plan.machine
    where = f"{', '.join(devices) or 'no finished run yet'}; {machine.get('cpus', '?')} CPU(s)"
    if machine.get("platform"):
        where += f", {machine['platform']}"
    datasets = [
        d + (f" ({_settings(plan.dataset_options[d], '=')})" if plan.dataset_options.get(d) else "")
        for d in plan.datasets
    ]
    total = len(plan.datasets) * len(plan.entries) * len(plan.seeds)
    items = [
        f"**Datasets**: {', '.join(datasets)}",
        f"**Models**: {', '.join(e.name for e in plan.entries)} (baseline: {plan.baseline})",
        f"**Seeds**: {', '.join(map(str, plan.seeds))} ({len(plan.seeds)})",
        f"**Budget**: {budget_text(plan)}",
        f"**Recipe**: {_recipe_text(plan)}",
        *(f"**Recipe on {d}**: {_settings(r)}" for d, r in plan.dataset_recipe.items()),
        f"**Machine**: {where}",
        f"**Date**: {plan.date or 'unknown'}",
        f"**Command**: `{plan.command}`" if plan.command else "**Command**: unknown",
        f"**Runs finished**: {total - len(missing)} of {total}",
    ]
    if missing:
        shown = ", ".join(f"`{m}`" for m in missing[:8]) + (", ..." if len(missing) > 8 else "")
        items.append(f"**Not finished** (left out of every number below): {shown}")
    failed = [(run, reason) for run in missing if (reason := _failure(out, run)) is not None]
    items += [f"**Failed**: `{run}`: {reason}" for run, reason in failed]
    return [Heading(2, "Budget"), Bullets(tuple(items))]


def _verdict_blocks(plan: Plan, evidence: Evidence) -> list[Block]:
    preset = preset_of(plan)
    if preset is None or not preset.claims:
        return []
    blocks: list[Block] = [Heading(2, "Verdicts"), Paragraph(rules(plan.kind.score_name))]
    for claim, found in decide_claims(preset.claims, evidence, plan.datasets):
        blocks.append(Heading(3, claim.statement))
        rows = tuple((v.claim, f"**{v.verdict}**", v.numbers, v.reason) for v in found)
        blocks.append(Table(("case", "verdict", "numbers", "reason"), rows))
    return blocks


COSTS = (  # summary column, header, format
    ("params", "params", lambda v: f"{v:,.0f}"),
    ("flops", "MFLOPs", _measured(lambda v: f"{v / 1e6:.1f}")),
    ("backbone_flops", "backbone MFLOPs", _measured(lambda v: f"{v / 1e6:.1f}")),
    ("latency_ms", "latency ms", _measured(lambda v: f"{v:.2f}")),
    ("train_img_per_s", "train img/s", lambda v: f"{v:.0f}"),
)


def latency_across_runs(rows: Sequence[dict[str, Any]], dataset: str) -> dict[str, tuple[float, float, float]]:
    """``{model: (median, lowest, highest)}`` of the runs' latencies on ``dataset``: runs measured under different
    load are not averaged (one slow measurement would move a mean anywhere), their median is shown with the range."""
    found: dict[str, list[float]] = {}
    for r in rows:
        if r["dataset"] == dataset and not _missing(r.get("latency_ms")):
            found.setdefault(r["model"], []).append(float(r["latency_ms"]))
    return {m: (statistics.median(v), min(v), max(v)) for m, v in found.items()}


def _latency_cell(measured: tuple[float, float, float] | None) -> str:
    if measured is None:
        return "n/a"
    median, low, high = measured
    return f"{median:.2f}" + (f" ({low:.2f}–{high:.2f})" if high > low else "")


def _wilcoxon_cell(p: float, n: int) -> str:
    """The p-value, marked † where ``n`` paired seeds cannot give p < ALPHA whatever the numbers."""
    return pvalue(p) + ("†" if wilcoxon_floor(n) >= ALPHA else "")


def _dataset_blocks(
    plan: Plan,
    out: Path,
    dataset: str,
    table: Sequence[dict[str, Any]],
    curves: dict,
    rows: Sequence[dict[str, Any]] = (),
) -> list[Block]:
    mine = [r for r in table if r["dataset"] == dataset]
    latency = latency_across_runs(rows, dataset)
    if latency:  # the table and the figure show the median over runs, not the mean
        mine = [{**r, "latency_ms": latency.get(r["model"], (math.nan,) * 3)[0]} for r in mine]
    blocks: list[Block] = [Heading(2, f"Results on {dataset}")]
    if not mine:
        return [*blocks, Paragraph("No run has finished on this dataset yet.")]
    task, score = plan.kind, plan.kind.score
    costs = [c for c in COSTS if c[0] in task.columns and not all(_missing(r[c[0]]) for r in mine)]
    header = (
        "model",
        "seeds",
        f"test {task.short} {task.unit} (mean ± std)",
        "95% CI",
        f"Δ vs {plan.baseline} ({'pp' if task.unit == '%' else task.unit})",
        "paired t p",
        "Wilcoxon p",
        f"val {task.short} {task.unit}",
        *(title for _, title, _ in costs),
    )
    body = []
    for r in mine:
        is_base = r["model"] == plan.baseline
        body.append(
            (
                f"**{r['model']}**" if is_base else r["model"],
                str(r["n"]),
                f"{pct(r[f'test_{score}_mean'])} ± {pct(r[f'test_{score}_std'])}",
                f"{pct(r[f'test_{score}_ci_low'])}–{pct(r[f'test_{score}_ci_high'])}",
                "baseline" if is_base else f"{100 * r['delta_vs_baseline']:+.2f} (n={r['shared_seeds']})",
                "–" if is_base else pvalue(r["t_p"]),
                "–" if is_base else _wilcoxon_cell(r["wilcoxon_p"], r["shared_seeds"]),
                f"{pct(r[f'val_{score}_mean'])} ± {pct(r[f'val_{score}_std'])}",
                *(
                    _latency_cell(latency.get(r["model"])) if key == "latency_ms" and latency else shown(r[key])
                    for key, _, shown in costs
                ),
            )
        )
    notes = [
        f"{task.score_text} Δ and the paired tests use the seeds both models share; the 95% CI is Student-t over seeds."
    ]
    if any(r["model"] != plan.baseline and wilcoxon_floor(r["shared_seeds"]) >= ALPHA for r in mine):
        notes.append(
            f"† cannot be significant: with n paired seeds the Wilcoxon signed-rank p is at least 2^(1−n) "
            f"(0.5 at n = 2, 0.0625 at n = 5), so it cannot fall below {ALPHA} with fewer than 6 seeds."
        )
    if latency:
        notes.append(
            "Latency: one image, eval mode, median of repeated timings after warm-up in each run; the table shows the "
            "median over runs and (in brackets) the lowest and highest run, measured under whatever load each run met."
        )
    blocks.append(Paragraph(" ".join(notes)))
    blocks.append(Table(header, tuple(body)))
    slug = dataset_slug(dataset)
    by_model = {name: runs for (d, name), runs in curves.items() if d == dataset}
    label = f"validation {task.score_name} ({task.unit})"
    curve_png = plots.learning_curves(
        by_model,
        [e.name for e in plan.entries],
        f"{dataset}: validation {task.score_name} per epoch",
        out / FIGURES / f"curves_{slug}.png",
        ylabel=label,
    )
    blocks.append(
        Image(
            curve_png.relative_to(out).as_posix(),
            f"Validation {task.score_name} per epoch: mean over seeds, band from the lowest to the highest seed.",
        )
    )
    cost_png = out / FIGURES / f"cost_{slug}.png"
    plots.accuracy_vs_cost(
        mine,
        [e.name for e in plan.entries],
        f"{dataset}: test {task.score_name} against cost",
        cost_png,
        score=score,
        ylabel=f"test {task.score_name} ({task.unit})",
    )
    against = "parameters and single-image latency" if "latency_ms" in plots.measured_costs(mine) else "parameters"
    blocks.append(
        Image(
            cost_png.relative_to(out).as_posix(),
            f"Test {task.score_name} (mean ± std over seeds) against {against}.",
        )
    )
    return blocks


def _headline_cell(by_seed: dict[int, dict[str, Any]], label: str, metric: str) -> str:
    """Mean of one headline metric over the seeds that have it, with half its range across seeds (and how many seeds
    those were, where some seed lacks it)."""
    values = [
        float(result["headline"][label][metric])
        for result in by_seed.values()
        if isinstance((result.get("headline") or {}).get(label, {}).get(metric), int | float)
    ]
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    spread = f" (±{num((max(values) - min(values)) / 2, 2)})" if len(values) > 1 else ""
    fewer = f", {len(values)} of {len(by_seed)} seeds" if len(values) < len(by_seed) else ""
    return num(sum(values) / len(values)) + spread + fewer


def _analysis_blocks(plan: Plan, out: Path, analyses: dict) -> list[Block]:
    blocks: list[Block] = []
    for (dataset, name), by_seed in analyses.items():
        blocks.append(Heading(3, f"{name} on {dataset}"))
        seeds = sorted(by_seed)
        labels: list[str] = []
        metrics: list[str] = []
        for seed in seeds:
            for label, values in (by_seed[seed].get("headline") or {}).items():
                if label not in labels:
                    labels.append(label)
                for metric in values:
                    if metric not in metrics:
                        metrics.append(metric)
        blocks.append(
            Paragraph(
                f"Headline numbers of `{name}.json`: mean over seed(s) {', '.join(map(str, seeds))}; (±x) is half "
                f"the range across seeds. Plots from seed {seeds[0]}."
            )
        )
        if labels:
            rows = tuple((metric, *(_headline_cell(by_seed, label, metric) for label in labels)) for metric in metrics)
            blocks.append(Table(("metric", *labels), rows))
        folder = analysis_dir(out, dataset, seeds[0])
        for png in by_seed[seeds[0]].get("plots") or []:
            if (folder / png).is_file():
                blocks.append(Image((folder / png).relative_to(out).as_posix(), f"{name}: {png}"))
    return [Heading(2, "Analyses"), *blocks] if blocks else []


RUN_COLUMNS = (  # results column, header, format
    ("dataset", "dataset", str),
    ("model", "model", str),
    ("seed", "seed", str),
    ("val_acc", "val acc %", pct),
    ("test_acc", "test acc %", pct),
    ("test_loss", "test loss", lambda v: f"{v:.4f}"),
    ("val_ap", "val AP ×100", pct),
    ("test_ap", "test AP ×100", pct),
    ("test_ap50", "test AP50 ×100", pct),
    ("test_ap75", "test AP75 ×100", pct),
    ("test_ar100", "test AR100 ×100", pct),
    ("params", "params", lambda v: f"{v:,}"),
    ("flops", "MFLOPs", _measured(lambda v: f"{v / 1e6:.1f}")),
    ("backbone_flops", "backbone MFLOPs", _measured(lambda v: f"{v / 1e6:.1f}")),
    ("train_img_per_s", "train img/s", lambda v: f"{v:.0f}"),
    ("latency_ms", "latency ms", _measured(lambda v: f"{v:.2f}")),
    ("wall_time_s", "wall s", lambda v: f"{v:.1f}"),
    ("skipped_steps", "skipped steps", str),
)


def _runs_table(plan: Plan, rows: Sequence[dict[str, Any]]) -> list[Block]:
    fields = result_fields(plan.kind)
    columns = [c for c in RUN_COLUMNS if c[0] in fields and not all(_missing(r[c[0]]) for r in rows)]
    body = tuple(tuple(shown(r[key]) for key, _, shown in columns) for r in rows)
    skipped = (
        "; skipped steps are optimiser steps dropped for non-finite loss or gradients (`--nonfinite skip`)"
        if "skipped_steps" in result_fields(plan.kind)
        else ""
    )
    return [
        Heading(2, "All runs"),
        Paragraph(f"From each run's `summary.json` (also in `results.csv`){skipped}."),
        Table(tuple(title for _, title, _ in columns), body),
    ]


def build_report(plan: Plan, out: Path) -> ReportFiles:
    """Rebuild ``results.csv``, ``summary.csv``, the figures, ``report.md`` and ``report.html`` in ``out``."""
    out = Path(out)
    rows = collect_results(plan, out)
    table = summarize(plan, rows)
    files = ReportFiles(out / "results.csv", out / "summary.csv", out / "report.md", out / "report.html")
    write_csv(files.results, rows, result_fields(plan.kind))
    write_csv(files.summary, table, summary_fields(plan.kind))
    missing = missing_runs(plan, out)
    analyses = load_analyses(plan, out)
    preset = preset_of(plan)

    title = f"attnlab compare: preset {plan.preset}" if plan.preset else "attnlab compare"
    blocks: list[Block] = [Heading(1, title)]
    if preset is not None and preset.small_budget:
        blocks.append(
            Callout(
                f"**Small budget: these numbers are not evidence.** This is the `{plan.preset}` preset, a smoke test "
                f"({_recipe_short(plan)}) that checks the whole pipeline end to end in minutes. Its verdicts can only "
                'be "inconclusive at this budget" or chance; run the claim presets (`fmm`, `consistency`, '
                "`smoothness`, `aw`, `cram`) at their full budget for evidence."
            )
        )
    elif preset is not None and (changes := changes_from_preset(plan, preset)):
        blocks.append(
            Callout(
                f"**Not the preset's `{plan.budget}` budget**: {', '.join(changes)}. Every number and verdict below "
                'is for this budget; "inconclusive at this budget" says nothing about the preset\'s own one.'
            )
        )
    if len(plan.seeds) < MIN_SEEDS and not (preset is not None and preset.small_budget):
        blocks.append(
            Callout(
                f"**{len(plan.seeds)} seed(s): not evidence.** Fewer than {MIN_SEEDS} seeds cannot tell a difference "
                "between models from the spread between seeds: the 95% intervals are very wide (Student-t with "
                f"{max(len(plan.seeds) - 1, 0)} degree(s) of freedom) and the Wilcoxon test cannot reach p < {ALPHA} "
                f"(its smallest p with {len(plan.seeds)} paired seed(s) is {wilcoxon_floor(len(plan.seeds)):.3g}). "
                "Read these numbers as a smoke test; use --seeds 5 or more for evidence."
            )
        )
    if preset is not None:
        blocks.append(Paragraph(preset.description))
    blocks += _budget(plan, out, rows, missing)
    blocks += _verdict_blocks(plan, Evidence(rows, analyses))
    curves = learning_curves(plan, out)
    for dataset in plan.datasets:
        blocks += _dataset_blocks(plan, out, dataset, table, curves, rows)
    blocks += _analysis_blocks(plan, out, analyses)
    blocks += _runs_table(plan, rows)
    write_text_atomic(files.markdown, to_markdown(blocks))
    write_text_atomic(files.html, to_html(blocks, out, title))
    return files


def _recipe_short(plan: Plan) -> str:
    cfg = {**plan.kind.config().to_dict(), **plan.recipe}
    subset = f"{cfg['subset']} training images" if cfg.get("subset") else "the full training set"
    return f"{cfg['epochs']} epoch(s) on {subset}, {len(plan.seeds)} seed(s)"
