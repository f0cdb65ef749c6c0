"""``attnlab compare``: train every entry × dataset × seed, run the analyses, write the report.

Runs are trained by `attnlab.train.train`, one folder each (`attnlab.report.plan.run_dir`), one after another or in
``jobs`` worker processes that split the CPU threads between them. A run is finished iff its ``summary.json``
exists. With ``resume``, finished runs are skipped (after checking they were trained with the same settings) and
unfinished ones continue from their last checkpoint; without it, a folder holding an earlier comparison is refused.
A run that fails (its loss diverged, or a bug) is recorded in ``failure.txt`` beside it and the others go on; the
report lists it as not finished and the command exits with status 1. ``results.csv`` and the report are rebuilt
from the run folders at the end, so they never duplicate or miss a finished run, whatever was killed before.
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import multiprocessing
import os
import platform
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import AttnlabError, unknown_name
from ..train.checkpoint import write_text_atomic
from ..train.config import RESUMABLE_CHANGES, TrainConfig, first_difference, read_yaml
from ..train.rundir import RunDir
from .document import ReportFiles, build_report
from .plan import (
    FAILURE_FILE,
    PLAN_FILE,
    AnalysisSpec,
    Entry,
    Plan,
    analysis_dir,
    check_buildable,
    parse_entries,
    parse_seeds,
    run_dir,
)
from .presets import get_preset

SETTINGS_THAT_MAY_DIFFER = RESUMABLE_CHANGES - {"epochs"}
"""A finished run is reused only if its config.yaml matches the plan except for these (where it ran, not what)."""


@dataclass
class CompareOutcome:
    """What `run_compare` did: the report's files and the runs it trained, skipped and saw fail."""

    files: ReportFiles | None = None
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    analysed: list[str] = field(default_factory=list)


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
) -> Plan:
    """A `Plan` from a preset and/or explicit choices; explicit budget settings override the preset's.

    Args:
        models: entries (``"a,b[k=v]"`` or a list); required without a preset, refused with one.
        datasets: dataset names; required without a preset; with one, a choice among the preset's datasets (to give
            each its own budget, e.g. fewer images on the larger cluttered canvas).
        seeds: a count or a list (default: the preset's, else 3).
        recipe: `TrainConfig` settings shared by every run (override the preset's budget).
        dataset_options: options given to every dataset.
        preset: a name from `attnlab.report.presets.PRESETS`.
        budget: the preset's budget (``"full"``: its own; e.g. ``"cpu"``), which explicit settings override.
        analyses: analysis names run on every entry (replace the preset's; ``[]`` runs none).
        analysis_images: images per analysis (overrides every analysis's ``images``).
        baseline: the entry others are compared with (default: the first).
        command: the command line, recorded for the report.
        jobs: worker processes, recorded with the machine.
    """
    chosen = get_preset(preset) if preset else None
    if chosen is not None:
        if models:
            raise AttnlabError(f"--preset {preset} fixes the models; drop --models (or drop --preset)")
        dataset_list = list(chosen.datasets)
        if datasets:
            foreign = [d for d in datasets if d not in dataset_list]
            if foreign:
                raise AttnlabError(
                    f"--preset {preset} runs on {', '.join(dataset_list)}; --dataset {foreign[0]} is not one of them"
                )
            dataset_list = [d for d in dataset_list if d in datasets]
        entries = parse_entries(list(chosen.models))
        plan_budget = chosen.budget(budget)
        seed_list = parse_seeds(plan_budget.seeds if seeds is None else seeds)
        merged_recipe = {**chosen.recipe, **plan_budget.recipe, **(recipe or {})}
        dataset_recipe = {  # a setting given explicitly wins over the budget's per-dataset one
            d: {k: v for k, v in plan_budget.dataset_recipe.get(d, {}).items() if k not in (recipe or {})}
            for d in dataset_list
        }
        options = {d: {**plan_budget.dataset_options.get(d, {}), **(dataset_options or {})} for d in dataset_list}
        specs = [
            replace(s, options={**s.options, "images": plan_budget.analysis_images[s.name]})
            if s.name in plan_budget.analysis_images
            else s
            for s in chosen.analyses
        ]
    else:
        if budget != "full":
            raise AttnlabError(f"--budget {budget} needs a --preset (budgets belong to presets)")
        dataset_recipe = {}
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
        dataset_recipe={d: r for d, r in dataset_recipe.items() if r},
        budget=budget,
        baseline=baseline or "",
        analyses=specs,
        preset=preset,
        command=command,
        machine={"cpus": os.cpu_count(), "platform": platform.platform(terse=True), "jobs": jobs},
        date=datetime.now().astimezone().isoformat(timespec="seconds"),
    )


def check_analyses(specs: Sequence[AnalysisSpec]) -> None:
    """Refuse unknown analyses and options now, not after hours of training."""
    from ..analysis import ANALYSES, analysis_options

    for spec in specs:
        if spec.name not in ANALYSES:
            raise unknown_name("analysis", spec.name, ANALYSES)
        known = {"images", *analysis_options(spec.name)}
        for key in spec.options:
            if key not in known:
                raise AttnlabError(f"analysis {spec.name}: {unknown_name('option', key, known)}")


def _prepare(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise AttnlabError(f"--out {out}: exists and is not a directory")
    if not resume and ((out / PLAN_FILE).exists() or (out / "runs").exists()):
        raise AttnlabError(f"--out {out}: holds an earlier comparison; pass --resume to continue it, or pick another")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AttnlabError(f"--out {out}: cannot create it ({e.strerror})") from None


def check_finished(run: Path, cfg: TrainConfig) -> None:
    """Refuse to reuse a finished run trained with other settings than the plan now asks for."""
    differs = first_difference(read_yaml(run / "config.yaml"), cfg.to_dict(), SETTINGS_THAT_MAY_DIFFER)
    if differs:
        key, saved, wanted = differs
        raise AttnlabError(
            f"{run}: finished with {key}={saved!r} but this comparison asks for {wanted!r}; use another --out"
        )


def _train_one(cfg_values: dict[str, Any], resume: bool, progress: bool | None, prefix: str) -> dict[str, Any]:
    """Train one run (in this process or a worker). If it fails, the error (with its traceback, unless it is a
    one-line user-facing `AttnlabError`) is written beside it and returned: one broken run does not stop the others.
    """
    from ..train import train

    cfg = TrainConfig.from_dict(cfg_values)
    try:
        summary = train(cfg, resume=resume, progress=progress, log=lambda line: print(f"{prefix} {line}", flush=True))
    except Exception as e:
        message = str(e) if isinstance(e, AttnlabError) else f"{type(e).__name__}: {e}"
        failure = Path(cfg.out) / FAILURE_FILE
        if failure.parent.is_dir():
            detail = "" if isinstance(e, AttnlabError) else "\n" + traceback.format_exc()
            write_text_atomic(failure, f"{message}\n{detail}")
        return {"failed": message.splitlines()[0] if message else type(e).__name__}
    (Path(cfg.out) / FAILURE_FILE).unlink(missing_ok=True)
    return summary


def _init_worker(threads: int, parent: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _die_with(parent)


PR_SET_PDEATHSIG = 1  # prctl option: the signal this process gets when its parent dies


def _die_with(parent: int) -> None:
    """On Linux, have the kernel kill this worker when the comparison that started it dies (even by SIGKILL), so no
    orphan keeps training, and holding a run's lock, for a comparison nobody waits for. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _relative(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix()


def run_compare(
    plan: Plan,
    out: str | Path,
    *,
    resume: bool = False,
    jobs: int = 1,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> CompareOutcome:
    """Train what ``plan`` asks for under ``out``, run its analyses, and write the report (see the module docstring).

    Args:
        plan: what to run.
        out: the comparison's folder.
        resume: skip finished runs, continue unfinished ones; without it an earlier comparison in ``out`` is refused.
        jobs: runs trained at once, each in its own process with ``cpu_count // jobs`` threads (1: in this process).
        progress: per-epoch progress bars (only with ``jobs=1``; default: when stderr is a terminal).
        log: where progress lines go.
    """
    out = Path(out)
    if jobs < 1:
        raise AttnlabError(f"--jobs must be ≥ 1, got {jobs}")
    _prepare(out, resume)
    outcome = CompareOutcome()
    with RunDir(out).locked():
        plan.save(out)
        todo: list[tuple[str, TrainConfig]] = []
        for dataset, entry, seed, folder in plan.runs(out):
            cfg = plan.run_config(dataset, entry, seed, out)
            name = _relative(folder, out)
            if (folder / "summary.json").is_file():
                check_finished(folder, cfg)
                outcome.skipped.append(name)
            else:
                todo.append((name, cfg))
        if outcome.skipped:
            total = len(outcome.skipped) + len(todo)
            log(f"compare: {len(outcome.skipped)} of {total} runs already finished, skipping them")
        _train_all(todo, resume, jobs, progress, log, outcome)
        _analyse_all(plan, out, log, outcome)
        outcome.files = build_report(plan, out)
    log(f"compare: report written to {outcome.files.markdown} and {outcome.files.html}")
    if outcome.failed:
        log(f"compare: {len(outcome.failed)} run(s) failed: {', '.join(outcome.failed)} (see {FAILURE_FILE} in each)")
    return outcome


def _train_all(todo, resume: bool, jobs: int, progress, log, outcome: CompareOutcome) -> None:
    def record(name: str, summary: dict[str, Any], index: int) -> None:
        if "failed" in summary:
            outcome.failed.append(name)
            log(f"compare: [{index}/{len(todo)}] {name} FAILED: {summary['failed']}")
        else:
            outcome.trained.append(name)
            log(f"compare: [{index}/{len(todo)}] {name} done: test acc {summary['test_acc']:.2%}")

    if jobs == 1 or len(todo) <= 1:
        for i, (name, cfg) in enumerate(todo, 1):
            log(f"compare: [{i}/{len(todo)}] training {name}")
            record(name, _train_one(cfg.to_dict(), resume, progress, f"[{name}]"), i)
        return
    workers = min(jobs, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    log(f"compare: training {len(todo)} runs in {workers} processes of {threads} thread(s) each")
    context = multiprocessing.get_context("spawn")
    pool = futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(threads, os.getpid())
    )
    with pool:
        pending = {pool.submit(_train_one, cfg.to_dict(), resume, False, f"[{name}]"): name for name, cfg in todo}
        try:
            for i, done in enumerate(futures.as_completed(pending), 1):
                record(pending[done], done.result(), i)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _analysis_targets(plan: Plan, spec: AnalysisSpec) -> list[Entry]:
    return [e for e in plan.entries if not spec.entries or e.name in spec.entries]


def _analyse_all(plan: Plan, out: Path, log, outcome: CompareOutcome) -> None:
    if not plan.analyses:
        return
    from ..analysis import run_analysis

    device = plan.recipe.get("device", "cpu")
    for spec in plan.analyses:
        entries = _analysis_targets(plan, spec)
        for dataset in plan.analysis_datasets(spec):
            for seed in plan.analysis_seeds(spec):
                folder = analysis_dir(out, dataset, seed)
                where = f"{spec.name} on {dataset} seed {seed}"
                finished = [e for e in entries if (run_dir(out, dataset, e, seed) / "summary.json").is_file()]
                if not finished:
                    log(f"compare: skipping {where}: none of its runs has finished")
                    continue
                if len(finished) < len(entries):  # a failed run does not cost the others their analysis
                    absent = ", ".join(e.name for e in entries if e not in finished)
                    log(f"compare: {where}: {absent} not finished; analysing the others")
                runs = [run_dir(out, dataset, e, seed) for e in finished]
                record = {
                    "analysis": spec.name,
                    "labels": [e.name for e in finished],
                    "runs": [_relative(r, out) for r in runs],
                    "options": spec.options,
                }
                stamp = folder / f"{spec.name}.spec.json"
                if (folder / f"{spec.name}.json").is_file() and stamp.is_file():
                    try:
                        if json.loads(stamp.read_text()) == record:
                            continue
                    except (OSError, ValueError):
                        pass
                log(f"compare: analysing {where} ({', '.join(record['labels'])})")
                folder.mkdir(parents=True, exist_ok=True)
                stamp.unlink(missing_ok=True)
                run_analysis(
                    spec.name,
                    runs,
                    folder,
                    seed=0,
                    device=device,
                    labels=record["labels"],
                    **spec.options,
                )
                write_text_atomic(stamp, json.dumps(record, indent=2) + "\n")
                outcome.analysed.append(f"{spec.name}/{dataset}/seed{seed}")
