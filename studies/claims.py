"""Run every claim preset at one budget, resumably, and keep its small files under ``studies/results/claims/``
(what `studies/digest.py` turns into the documentation's claim tables).

    python studies/claims.py [--budget cpu] [--presets aw,fmm,...] [--jobs 2] [--compile] [--device cuda]
                             [-- more compare flags]                                        (``make claims``)
    python studies/claims.py --status       what is finished, half-trained and left, per preset (runs nothing)
    python studies/claims.py --export       copy what finished to --results now (runs nothing)

Each preset runs as ``attnlab compare --preset P --budget B --out runs/claims/P --resume``. Around it:

- before: runs another preset already finished with the very same settings (same dataset, entry, seed and every
  setting but the output folder) are copied in, so a run shared by presets trains once; and runs committed under
  ``studies/results/claims/`` (this preset's, or another's with the very same settings) are restored, so a new machine
  continues where the last one stopped. A committed run has no weights, so it is restored only where no analysis of
  this preset still needs its weights.
- during and after: the small files (the plan, results and summary CSVs, report.md, each run's config.yaml,
  metrics.jsonl and summary.json, the analyses' JSON, every PNG) are copied to ``studies/results/claims/P`` every few
  minutes and at the end; weights, checkpoints and the self-contained HTML (which embeds the PNGs again) stay under
  runs/.

Flags after ``--`` go to every ``attnlab compare`` (a tiny trial of the whole campaign: ``-- --epochs 1 --subset 64``);
their runs are then not the preset's, so nothing is restored or shared. ``studies/claims_gpu.sh`` drives this script
on a lent GPU.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attnlab.experiment import Plan, make_plan  # noqa: E402
from attnlab.experiment.plan import analysis_dir, run_dir  # noqa: E402
from attnlab.experiment.tasks import task_of  # noqa: E402
from attnlab.io import read_yaml  # noqa: E402
from attnlab.report import build_report  # noqa: E402
from attnlab.train.config import first_difference  # noqa: E402
from attnlab.train.rundir import RunDir  # noqa: E402

ORDER = ("aw", "aw-detection", "fmm", "consistency", "smoothness", "cram", "families")
"""Presets without analyses first: each of their finished runs is kept for good once committed."""
KEEP = {".csv", ".md", ".json", ".jsonl", ".yaml", ".png", ".txt"}
SKIP_PARTS = {"checkpoints"}
SKIP_NAMES = {"report.html", "model.safetensors", ".lock"}


def _unfinished_run(rel: Path, out: Path) -> bool:
    """A file of a run folder (``runs/<dataset>/<entry>/seed<k>/...``) whose run has not finished."""
    parts = rel.parts
    return len(parts) > 4 and parts[0] == "runs" and not (out / Path(*parts[:4]) / "summary.json").is_file()


def export(out: Path, keep: Path) -> int:
    """Copy the small files of comparison ``out`` to ``keep`` (finished runs only), then rebuild the report there
    from those files alone, so what is committed is what `attnlab report` makes of it; returns how many changed."""
    changed = 0
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if not path.is_file() or path.suffix not in KEEP or path.name in SKIP_NAMES or SKIP_PARTS & set(rel.parts):
            continue
        if path.name.startswith(".") or ".tmp" in path.name or _unfinished_run(rel, out):
            continue
        target = keep / rel
        data = path.read_bytes()
        if target.is_file() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(target)
        changed += 1
    if (keep / "compare.json").is_file() and (changed or not (keep / "report.md").is_file()):
        build_report(Plan.load(keep), keep)  # only when a file moved: the exporter runs every few minutes
        (keep / "report.html").unlink(missing_ok=True)  # embeds every PNG again; `attnlab report` rebuilds it
    return changed


def _same_settings(run: Path, cfg) -> bool:
    saved = run / "config.yaml"
    return (
        saved.is_file() and first_difference(read_yaml(saved), cfg.to_dict(), task_of(cfg).reuse_despite(run)) is None
    )


def _analysed_entries(plan, dataset: str, seed: int, keep: Path) -> set[str]:
    """Entries whose weights an analysis of this seed still needs (its JSON is not committed yet)."""
    needed = set()
    for spec in plan.analyses:
        if dataset in plan.analysis_datasets(spec) and seed in plan.analysis_seeds(spec):
            if not (analysis_dir(keep, dataset, seed) / f"{spec.name}.json").is_file():
                needed |= {e.name for e in plan.entries if not spec.entries or e.name in spec.entries}
    return needed


Others = list[tuple[Path, Path]]
"""Every other preset's (runs folder, committed folder)."""


def _others(preset: str, runs: Path, results: Path) -> Others:
    return [(runs / other, results / other) for other in ORDER if other != preset]


def _finished_copy(plan, dataset: str, entry, seed: int, cfg, keep: Path, others: Others) -> tuple | None:
    """A finished run this preset may take instead of training one: ``("restored", committed files)`` of this
    preset's or another's when no analysis of this preset still needs its weights, else ``("shared", another preset's
    run with weights)``."""
    if entry.name not in _analysed_entries(plan, dataset, seed, keep):
        for committed_root in (keep, *(committed for _, committed in others)):
            committed = run_dir(committed_root, dataset, entry, seed)
            if (committed / "summary.json").is_file() and _same_settings(committed, cfg):
                return "restored", committed
    for other, _ in others:
        candidate = run_dir(other, dataset, entry, seed)
        weights = (candidate / "summary.json").is_file() and (candidate / "model.safetensors").is_file()
        if weights and _same_settings(candidate, cfg):
            return "shared", candidate
    return None


def prepare(preset: str, budget: str, runs: Path, keep: Path, others: Others) -> None:
    """Restore committed runs and copy identical finished runs of other presets into ``runs/claims/<preset>``."""
    out = runs / preset
    plan = make_plan(preset=preset, budget=budget)
    taken = {"restored": 0, "shared": 0}
    for dataset, entry, seed, folder in plan.runs(out):
        if (folder / "summary.json").is_file():
            continue
        found = _finished_copy(plan, dataset, entry, seed, plan.run_config(dataset, entry, seed, out), keep, others)
        if found is not None:
            how, source = found
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(source, folder, ignore=shutil.ignore_patterns("checkpoints"))
            taken[how] += 1
    print(
        f"claims: {preset}: {taken['restored']} run(s) restored from committed results, {taken['shared']} shared from "
        "other presets",
        flush=True,
    )


def status(preset: str, budget: str, runs: Path, keep: Path, others: Others) -> str:
    """One line per preset: runs finished (here, or ready to be taken as `prepare` would), epochs left of the
    half-trained and untouched runs, analyses committed: what the campaign still costs."""
    plan = make_plan(preset=preset, budget=budget)
    out = runs / preset
    planned = plan.runs(out)
    finished = started = epochs_left = 0
    for dataset, entry, seed, folder in planned:
        cfg = plan.run_config(dataset, entry, seed, out)
        if (folder / "summary.json").is_file() or _finished_copy(plan, dataset, entry, seed, cfg, keep, others):
            finished += 1
            continue
        done = len(RunDir(folder).history())
        started += done > 0
        epochs_left += cfg.epochs - done
    wanted = [
        analysis_dir(keep, d, s) / f"{spec.name}.json"
        for spec in plan.analyses
        for d in plan.analysis_datasets(spec)
        for s in plan.analysis_seeds(spec)
    ]
    analysed = f", analyses {sum(p.is_file() for p in wanted)}/{len(wanted)} committed" if wanted else ""
    return (
        f"{preset}: runs {finished}/{len(planned)} finished, {started} half-trained, {epochs_left} run-epochs left"
        + analysed
    )


def run(preset: str, budget: str, runs: Path, results: Path, jobs: int, every: float, flags: list, own: bool) -> int:
    """Train and analyse one preset with ``attnlab compare ... --resume`` plus ``flags``, exporting as it goes;
    ``own``: the flags leave the preset's settings alone, so finished runs are restored and shared first."""
    keep = results / preset
    if own:
        prepare(preset, budget, runs, keep, _others(preset, runs, results))
    command = [sys.executable, "-m", "attnlab", "compare", "--preset", preset, "--budget", budget]
    command += ["--out", str(runs / preset), "--resume", "--jobs", str(jobs), *flags]
    print("claims: " + " ".join(command[1:]), flush=True)
    process = subprocess.Popen(command, cwd=ROOT)
    last = time.monotonic()
    while process.poll() is None:
        time.sleep(5)
        if time.monotonic() - last > every and (runs / preset).is_dir():
            export(runs / preset, keep)
            last = time.monotonic()
    changed = export(runs / preset, keep)
    print(f"claims: {preset} finished with exit code {process.returncode}; {changed} file(s) updated in {keep}")
    return process.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="cpu")
    p.add_argument("--presets", default=",".join(ORDER))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "claims")
    p.add_argument("--results", type=Path, default=ROOT / "studies" / "results" / "claims")
    p.add_argument("--export-every", type=float, default=300.0, help="seconds between copies to --results")
    p.add_argument(
        "--compile",
        action="store_true",
        help="train compiled: a neutral setting (same numbers within float tolerance, finished runs still count); "
        "studies/results/benchmarks/prefix_cost.csv has AW's 1x28x28 step at 0.60x its eager time, cbam's at 0.56x",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where every run trains (neutral)")
    p.add_argument("--status", action="store_true", help="say what is finished and left per preset; train nothing")
    p.add_argument("--export", action="store_true", help="copy what finished to --results now; train nothing")
    p.add_argument("compare_flags", nargs="*", help="after --: more flags for every `attnlab compare`")
    args = p.parse_args(argv)
    names = [name.strip() for name in args.presets.split(",") if name.strip()]
    if args.status and args.compare_flags:
        p.error("--status counts the presets' own runs; flags after -- would change them, so it takes none")
    if args.status:
        for name in names:
            print(status(name, args.budget, args.runs, args.results / name, _others(name, args.runs, args.results)))
        return 0
    if args.export:
        for name in names:
            if (args.runs / name).is_dir():
                print(f"claims: {name}: {export(args.runs / name, args.results / name)} file(s) updated")
        return 0
    flags = ["--device", args.device] + (["--compile"] if args.compile else []) + args.compare_flags
    own = not args.compare_flags
    try:
        codes = [
            run(name, args.budget, args.runs, args.results, args.jobs, args.export_every, flags, own) for name in names
        ]
    except KeyboardInterrupt:  # compare, in the same process group, stops too; its finished runs are kept
        print("claims: interrupted; run the same command again to resume, --export to copy what finished", flush=True)
        return 130
    return max(codes, default=0)


if __name__ == "__main__":
    sys.exit(main())
