"""``attnlab compare``'s work: train every entry × dataset × seed, then run the plan's analyses.

Runs are trained by their task's trainer (`attnlab.train.train`, or `attnlab.detection.train_detector` in a
detection comparison: `attnlab.experiment.tasks`), one folder each (`attnlab.experiment.plan.run_dir`). A launcher
decides where they run: `LocalPool` trains them one after another in this process, or in ``jobs`` worker processes that
split the CPU threads between them (a launcher for a cluster goes beside it: anything with the `Launcher` method).
A run is finished iff its ``summary.json`` exists. With ``resume``, finished runs are skipped (after checking they
were trained with the same settings) and unfinished ones continue from their last checkpoint; without it, a folder
holding an earlier comparison is refused. A run that fails (its loss diverged, or a bug) is recorded in
``failure.txt`` beside it and the others go on. The report (`attnlab.report.build_report`) is rebuilt from the run
folders afterwards, so it never duplicates or misses a finished run, whatever was killed before.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import AttnlabError
from ..io import read_json, read_yaml, write_json_atomic, write_text_atomic
from ..train.config import first_difference
from ..train.rundir import RunDir
from .plan import FAILURE_FILE, PLAN_FILE, AnalysisSpec, Plan, analysis_dir, run_dir
from .tasks import get_task, task_of


@dataclass
class CompareOutcome:
    """What `run_compare` did: the runs it trained, skipped and saw fail, and the analyses it ran."""

    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    analysed: list[str] = field(default_factory=list)


Job = tuple[str, Any]
"""One run to train: its name (its folder relative to the comparison) and its config (`TrainConfig`,
`DetectConfig`)."""


class Launcher(Protocol):
    def results(self, jobs: Sequence[Job], resume: bool) -> Iterator[tuple[str, dict[str, Any]]]:
        """Train ``jobs``; yield ``(name, summary)`` as each ends (a failed run's summary is ``{"failed": why}``)."""
        ...


def train_one(
    task: str, cfg_values: dict[str, Any], resume: bool, progress: bool | None, prefix: str
) -> dict[str, Any]:
    """Train one run of ``task`` (in this process or a worker). If it fails, the error (with its traceback, unless it
    is a one-line user-facing `AttnlabError`) is written beside it and returned: one broken run does not stop the
    others."""
    kind = get_task(task)
    cfg = kind.make_config(cfg_values)
    try:
        summary = kind.train(
            cfg, resume=resume, progress=progress, log=lambda line: print(f"{prefix} {line}", flush=True)
        )
    except Exception as e:
        message = str(e) if isinstance(e, AttnlabError) else f"{type(e).__name__}: {e}"
        detail = "" if isinstance(e, AttnlabError) else traceback.format_exc()
        return record_failure(Path(cfg.out), message, detail)
    (Path(cfg.out) / FAILURE_FILE).unlink(missing_ok=True)
    return summary


def record_failure(run: Path, message: str, detail: str = "") -> dict[str, str]:
    """Write why a run failed to its ``failure.txt`` (when its folder exists); the summary a launcher yields for it."""
    if run.is_dir():
        write_text_atomic(run / FAILURE_FILE, f"{message}\n" + (f"\n{detail}" if detail else ""))
    return {"failed": message.splitlines()[0] if message else "failed"}


@dataclass
class LocalPool:
    """Runs on this machine: in this process (``jobs`` 1), or in ``jobs`` spawned worker processes of
    ``cpu_count // jobs`` threads each that die with the comparison."""

    jobs: int = 1
    progress: bool | None = None
    log: Callable[[str], None] = print

    def results(self, jobs: Sequence[Job], resume: bool) -> Iterator[tuple[str, dict[str, Any]]]:
        if self.jobs == 1 or len(jobs) <= 1:
            for i, (name, cfg) in enumerate(jobs, 1):
                self.log(f"compare: [{i}/{len(jobs)}] training {name}")
                yield name, train_one(task_of(cfg).name, cfg.to_dict(), resume, self.progress, f"[{name}]")
            return
        workers = min(self.jobs, len(jobs))
        threads = max(1, (os.cpu_count() or 1) // workers)
        self.log(f"compare: training {len(jobs)} runs in {workers} processes of {threads} thread(s) each")
        context = multiprocessing.get_context("spawn")
        pool = futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=(threads, os.getpid())
        )
        with pool:
            pending = {
                pool.submit(train_one, task_of(cfg).name, cfg.to_dict(), resume, False, f"[{name}]"): name
                for name, cfg in jobs
            }
            try:
                for done in futures.as_completed(pending):
                    yield pending[done], done.result()
            except BaseException:
                _stop_workers(pool)
                raise


def _stop_workers(pool: futures.ProcessPoolExecutor) -> None:
    """End a pool at once (Ctrl-C, an error): cancelling its futures is not enough, since a worker takes the next
    queued run as soon as its current one stops, and the pool's exit then waits for that whole training. SIGKILL, not
    SIGTERM: a training worker answers SIGTERM as a scheduler's stop (a checkpoint, then `Preempted`), which the pool
    would catch and go on to the next run; the runs' checkpoints are atomic, so `--resume` continues them."""
    for process in list((pool._processes or {}).values()):  # no public handle before Python 3.14's kill_workers
        process.kill()
    pool.shutdown(wait=True, cancel_futures=True)  # returns at once: the pool sees its workers gone


def _init_worker(threads: int, parent: int) -> None:
    import threading

    import torch
    from tqdm import tqdm

    torch.set_num_threads(threads)
    # tqdm's default lock is a multiprocessing semaphore, which a worker ended by `_stop_workers` would leave behind
    # (a warning at exit); a worker draws no bars to share a lock with anyway
    tqdm.set_lock(threading.RLock())
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


def _prepare(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise AttnlabError(f"--out {out}: exists and is not a directory")
    if not resume and ((out / PLAN_FILE).exists() or (out / "runs").exists()):
        raise AttnlabError(f"--out {out}: holds an earlier comparison; pass --resume to continue it, or pick another")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AttnlabError(f"--out {out}: cannot create it ({e.strerror})") from None


def check_finished(run: Path, cfg: Any) -> None:
    """Refuse to reuse a finished run trained with other settings than the plan now asks for."""
    differs = first_difference(read_yaml(RunDir(run).config), cfg.to_dict(), task_of(cfg).reuse_despite(run), type(cfg))
    if differs:
        key, saved, wanted = differs
        raise AttnlabError(
            f"{run}: finished with {key}={saved!r} but this comparison asks for {wanted!r}; use another --out"
        )


def run_compare(
    plan: Plan,
    out: str | Path,
    *,
    resume: bool = False,
    jobs: int = 1,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    launcher: Launcher | None = None,
) -> CompareOutcome:
    """Train what ``plan`` asks for under ``out`` and run its analyses (see the module docstring).

    Args:
        plan: what to run.
        out: the comparison's folder.
        resume: skip finished runs, continue unfinished ones; without it an earlier comparison in ``out`` is refused.
        jobs: runs trained at once by the default `LocalPool`.
        progress: per-epoch progress bars (only with ``jobs=1``; default: when stderr is a terminal).
        log: where progress lines go.
        launcher: where the runs are trained (default: ``LocalPool(jobs, progress, log)``).
    """
    out = Path(out)
    if jobs < 1:
        raise AttnlabError(f"--jobs must be ≥ 1, got {jobs}")
    _prepare(out, resume)
    outcome = CompareOutcome()
    with RunDir(out).locked():
        plan.save(out)
        todo: list[Job] = []
        for dataset, entry, seed, folder in plan.runs(out):
            cfg = plan.run_config(dataset, entry, seed, out)
            name = folder.relative_to(out).as_posix()
            if RunDir(folder).finished:
                check_finished(folder, cfg)
                outcome.skipped.append(name)
            else:
                todo.append((name, cfg))
        if outcome.skipped:
            total = len(outcome.skipped) + len(todo)
            log(f"compare: {len(outcome.skipped)} of {total} runs already finished, skipping them")
        launcher = launcher or LocalPool(jobs, progress, log)
        for i, (name, summary) in enumerate(launcher.results(todo, resume), 1):
            _record(outcome, name, summary, f"[{i}/{len(todo)}]", log, plan.kind.score)
        _analyse_all(plan, out, log, outcome)
    if outcome.failed:
        log(f"compare: {len(outcome.failed)} run(s) failed: {', '.join(outcome.failed)} (see {FAILURE_FILE} in each)")
    return outcome


def _record(outcome: CompareOutcome, name: str, summary: dict[str, Any], counter: str, log, score: str) -> None:
    if "failed" in summary:
        outcome.failed.append(name)
        log(f"compare: {counter} {name} FAILED: {summary['failed']}")
    else:
        outcome.trained.append(name)
        log(f"compare: {counter} {name} done: test {score} {summary[f'test_{score}']:.2%}")


def _analyse_all(plan: Plan, out: Path, log, outcome: CompareOutcome) -> None:
    for spec in plan.analyses:
        for dataset in plan.analysis_datasets(spec):
            for seed in plan.analysis_seeds(spec):
                if _analyse(plan, spec, out, dataset, seed, log):
                    outcome.analysed.append(f"{spec.name}/{dataset}/seed{seed}")


def _analyse(plan: Plan, spec: AnalysisSpec, out: Path, dataset: str, seed: int, log) -> bool:
    """Run one analysis on the finished runs of one seed, unless it already ran on the same runs with the same
    options (its ``NAME.spec.json`` stamp says so); whether it ran."""
    from ..analysis import run_analysis

    entries = [e for e in plan.entries if not spec.entries or e.name in spec.entries]
    folder = analysis_dir(out, dataset, seed)
    where = f"{spec.name} on {dataset} seed {seed}"
    finished = [e for e in entries if RunDir(run_dir(out, dataset, e, seed)).finished]
    if not finished:
        log(f"compare: skipping {where}: none of its runs has finished")
        return False
    if len(finished) < len(entries):  # a failed run does not cost the others their analysis
        absent = ", ".join(e.name for e in entries if e not in finished)
        log(f"compare: {where}: {absent} not finished; analysing the others")
    runs = [run_dir(out, dataset, e, seed) for e in finished]
    record = {
        "analysis": spec.name,
        "labels": [e.name for e in finished],
        "runs": [r.relative_to(out).as_posix() for r in runs],
        "options": spec.options,
    }
    stamp = folder / f"{spec.name}.spec.json"
    if (folder / f"{spec.name}.json").is_file() and stamp.is_file():
        try:
            if read_json(stamp) == record:
                return False
        except AttnlabError:
            pass
    log(f"compare: analysing {where} ({', '.join(record['labels'])})")
    folder.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    device = plan.recipe.get("device", "cpu")
    compiled = bool(plan.recipe.get("compile"))
    run_analysis(
        spec.name, runs, folder, seed=0, device=device, labels=record["labels"], compile=compiled, **spec.options
    )
    write_json_atomic(stamp, record)
    return True
