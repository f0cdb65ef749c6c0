"""``attnlab compare`` and ``attnlab report``: models × seeds trained, tested against a baseline, reported."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import AttnlabError
from .common import add_config_flags, add_key_values, continuable

PRESET_NAMES = ("fmm", "consistency", "smoothness", "aw", "aw-detection", "cram", "families", "quick")
"""`attnlab.experiment.presets.PRESETS`'s names, for --help without importing the presets (their claims import the
analyses, and torch with them); tests/test_cli_startup.py keeps the two equal."""


def add_parsers(sub) -> None:
    from ..train.config import TrainConfig
    from ..train.entry import PER_RUN_FIELDS

    p = sub.add_parser(
        "compare",
        help="train models × seeds, test the differences, write results.csv, summary.csv and a report",
        allow_abbrev=False,  # --model is not --models
    )
    add_config_flags(p, TrainConfig, exclude=PER_RUN_FIELDS)  # the shared recipe; models and seeds are compare's own
    g = p.add_argument_group("comparison")
    g.add_argument("--models", help="comma-separated entries, e.g. resnet20,fmm_resnet20[merge=gate]; first = baseline")
    g.add_argument("--dataset", help="dataset name(s), comma-separated (with --preset: some of its datasets)")
    g.add_argument(
        "--task",
        choices=("classify", "detect"),
        help="what each run trains: classifiers (default), or Faster R-CNN/RetinaNet detectors with the entries as "
        "backbones (the recipe is then `attnlab detect train`'s; default: the preset's)",
    )
    g.add_argument("--seeds", help="number of seeds (0..N-1) or a list such as 0,3,7 (default 3, or the preset's)")
    g.add_argument("--out", help="the comparison's folder (required); runs go to OUT/runs/<dataset>/<model>/seed<k>")
    g.add_argument("--resume", action="store_true", help="skip finished runs and continue unfinished ones")
    g.add_argument("--config", help="YAML file of the shared recipe (and dataset); flags given here override it")
    add_key_values(g, "--data-arg", "dataset option, e.g. canvas=64 for cluttered-fashion-mnist")
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: when stderr is a terminal)",
    )
    g.add_argument(
        "--jobs",
        type=int,
        help="runs trained at once: local processes (default 1), or submitit jobs queued at once (default all)",
    )
    g.add_argument(
        "--preset",
        help=f"a claim experiment (models, data, budget, analyses): {', '.join(PRESET_NAMES)}, or a study file (YAML)",
    )
    g.add_argument(
        "--budget",
        help="a preset's budget: full (its own, the default) or cpu (converges on a 2-core CPU); flags override it",
    )
    g.add_argument("--baseline", help="entry the others are compared with (default: the first)")
    g.add_argument("--analyses", help="analyses run on every entry, comma-separated, or 'none' (replaces a preset's)")
    g.add_argument("--analysis-images", type=int, help="images per analysis (overrides the preset's)")
    add_launcher_flags(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="rebuild a comparison's CSV files and report from its folder, without training")
    p.add_argument("dir", help="a folder written by `attnlab compare`")
    p.set_defaults(func=cmd_report)


def add_launcher_flags(p: argparse.ArgumentParser) -> None:
    """Where compare's runs train: here (local), or one scheduler job each through submitit (SLURM)."""
    g = p.add_argument_group("launcher (see README: sweeps on a cluster)")
    g.add_argument("--launcher", choices=("local", "submitit"), default="local", help="where runs train")
    g.add_argument("--cluster", help="submitit executor: slurm or local (default: slurm where srun exists, else local)")
    g.add_argument("--gpus-per-run", type=int, help="GPUs of each run's job (one task per GPU; default 0)")
    g.add_argument("--cpus-per-run", type=int, help="CPUs of each run's job (and its torch threads)")
    g.add_argument("--partition", help="SLURM partition of the jobs")
    g.add_argument("--timeout-min", type=int, help="time limit of each job; a job past it is requeued (default 60)")
    g.add_argument("--mem-gb", type=float, help="memory of each run's job")
    add_key_values(g, "--slurm-arg", "any other parameter of submitit's SlurmExecutor, e.g. qos=high, account=lab")


def _launcher(args: argparse.Namespace):
    """The launcher --launcher asks for, checked before anything is written (None: compare's own LocalPool)."""
    from pathlib import Path

    from ..experiment.launchers import SUBMITIT_DIR, Resources, SubmititLauncher, check_launcher_options

    flags = ("cluster", "gpus_per_run", "cpus_per_run", "partition", "timeout_min", "mem_gb", "slurm_arg")
    check_launcher_options(args.launcher, {"--" + f.replace("_", "-"): getattr(args, f) for f in flags})
    if args.launcher == "local":
        return None
    resources = Resources(
        gpus=args.gpus_per_run or 0,
        cpus=args.cpus_per_run,
        partition=args.partition,
        timeout_min=60 if args.timeout_min is None else args.timeout_min,
        mem_gb=args.mem_gb,
        slurm=dict(args.slurm_arg),
    )
    return SubmititLauncher(Path(args.out) / SUBMITIT_DIR, resources, cluster=args.cluster, jobs=args.jobs)


def _compare_recipe(args: argparse.Namespace) -> tuple[dict[str, Any], list[str] | None, dict[str, Any]]:
    """(shared recipe, datasets, dataset options) from --config and the training flags given on the command line."""
    from ..io import read_yaml
    from ..schema import check
    from ..train.config import given_flags, merged
    from ..train.entry import PER_RUN_FIELDS

    recipe: dict[str, Any] = {}
    datasets, options = None, {}
    if args.config:
        recipe = read_yaml(args.config)
        try:
            datasets = [check("dataset", recipe.pop("dataset"), str)] if "dataset" in recipe else None
            options = check("dataset_options", recipe.pop("dataset_options", {}), dict[str, Any])
        except AttnlabError as e:
            raise AttnlabError(f"{args.config}: {e}") from None
        bad = sorted(set(recipe) & set(PER_RUN_FIELDS), key=str)
        if bad:
            raise AttnlabError(f"{args.config}: '{bad[0]}' is set per run by compare; remove it")
    for key, given in given_flags(args, exclude=PER_RUN_FIELDS).items():
        recipe[key] = merged(recipe.get(key), given)  # --mechanism pairs over the file's mechanisms
    if args.dataset:
        datasets = [d.strip() for d in args.dataset.split(",") if d.strip()]
    options.update(dict(args.data_arg))
    return recipe, datasets, options


def _compare_command(args: argparse.Namespace, recipe: dict[str, Any]) -> str:
    """The command line, in canonical form, as the report records it."""
    import shlex

    words = ["attnlab", "compare"]
    for flag, value in (
        ("--task", args.task),
        ("--preset", args.preset),
        ("--budget", args.budget),
        ("--models", args.models),
        ("--dataset", args.dataset),
        ("--seeds", args.seeds),
        ("--baseline", args.baseline),
        ("--analyses", args.analyses),
        ("--analysis-images", args.analysis_images),
        ("--config", args.config),
    ):
        if value is not None:
            words += [flag, str(value)]
    for key, value in recipe.items():
        if key == "mechanisms":
            words += [w for k, v in args.mechanisms for w in ("--mechanism", f"{k}={v}")]
        elif getattr(args, key, None) is not None:
            flag = key.replace("_", "-")
            words += [f"--{'' if value else 'no-'}{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    for key, value in args.data_arg:
        words += ["--data-arg", f"{key}={value}"]
    words += ["--out", args.out] + (["--jobs", str(args.jobs)] if args.jobs is not None else [])
    words += ["--resume"] if args.resume else []
    return shlex.join(words)


def cmd_compare(args: argparse.Namespace) -> int:
    from ..experiment import make_plan, run_compare
    from ..io import check_writable
    from ..report import build_report

    if not args.out:
        raise AttnlabError("compare: --out DIR is required")
    check_writable(args.out, "--out")
    launcher = _launcher(args)
    recipe, datasets, options = _compare_recipe(args)
    command = _compare_command(args, recipe)
    analyses, plan_jobs = None, 1 if args.jobs is None else args.jobs
    if args.analyses is not None:
        analyses = [] if args.analyses == "none" else [a.strip() for a in args.analyses.split(",") if a.strip()]
    plan = make_plan(
        models=args.models,
        datasets=datasets,
        seeds=args.seeds,
        recipe=recipe,
        dataset_options=options,
        preset=args.preset,
        budget=args.budget or "full",
        analyses=analyses,
        analysis_images=args.analysis_images,
        baseline=args.baseline,
        command=command,
        jobs=plan_jobs,
        task=args.task,
    )
    with continuable(command, args.out):
        outcome = run_compare(
            plan, args.out, resume=args.resume, jobs=plan_jobs, progress=args.progress, launcher=launcher
        )
    files = build_report(plan, args.out)
    print(f"report: {files.markdown}  (self-contained: {files.html})")
    return 1 if outcome.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..experiment import Plan
    from ..io import check_writable
    from ..report import build_report

    check_writable(args.dir, "report")
    files = build_report(Plan.load(Path(args.dir)), Path(args.dir))
    print(f"report: {files.markdown}  (self-contained: {files.html})")
    return 0
