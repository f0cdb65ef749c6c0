"""``attnlab`` command line: wires data, models, training, analyses and reports. Bad input → one line, exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import AttnlabError
from .io import key_value

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), matching the rest of attnlab."""

    def error(self, message: str):
        raise AttnlabError(f"{self.prog}: {message} (see --help)")


def _key_value(text: str) -> tuple[str, Any]:
    try:
        return key_value(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---------------------------------------------------------------------------------------------------------------- train


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """Flags of `TrainConfig`. Every default is None: only flags given on the command line override --config."""
    from .train.config import NONFINITE, SCHEDULES

    g = p.add_argument_group("run")
    g.add_argument(
        "--model",
        help="model name (see `attnlab models`) or an entry as compare writes it, NAME[key=value,...]; "
        "default resnet20",
    )
    g.add_argument(
        "--dataset",
        help="fashion-mnist, mnist, cifar10, cifar100, imagefolder:PATH, "
        "cluttered-fashion-mnist, synthetic; default fashion-mnist",
    )
    g.add_argument("--data-dir", help="folder holding the dataset files (else $ATTNLAB_DATA, then system paths)")
    g.add_argument("--out", help="run folder (default runs/latest); an existing run is never overwritten")
    g.add_argument("--config", help="YAML file of settings; flags given here override it")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--seed", type=int)
    g.add_argument("--subset", type=int, help="train on the first N images of a seeded shuffle (quick runs)")
    g.add_argument("--val-size", type=float, help="validation images carved from train (count, or fraction if < 1)")
    g.add_argument("--device", help="cpu or cuda[:N]")
    _add_speed_flags(g)
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--momentum", type=float)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--weight-decay", type=float, help="on conv/linear weights; never on BN or biases")
    g.add_argument("--schedule", choices=SCHEDULES)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--equivariance", type=float, help="weight λ of CRAM's equivariance loss")
    g.add_argument(
        "--equivariance-transforms",
        type=lambda text: [t.strip() for t in text.split(",") if t.strip()],
        help="transforms the equivariance loss draws from, among hflip, rot90, shift (default hflip,shift)",
    )
    g.add_argument("--grad-clip", type=float, help="clip the global gradient norm")
    g.add_argument("--nonfinite", choices=NONFINITE, help="on NaN/Inf loss or gradients: stop (default) or skip")
    g.add_argument("--detect-anomaly", action="store_true", default=None, help="autograd anomaly mode (slow)")
    g = p.add_argument_group("model and data options")
    g.add_argument("--in-chans", type=int, help="input channels the model expects (must match the data)")
    _key_values(g, "--model-arg", "model option, e.g. merge=gate, attn_where=last, attn_layer=se")
    _key_values(g, "--data-arg", "dataset option, e.g. canvas=64 for cluttered-fashion-mnist")


def _legacy_amp(text: str) -> str:
    """``--amp X``, the old name of ``--precision``: off → fp32."""
    from .train.config import LEGACY_AMP

    if text not in LEGACY_AMP:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(LEGACY_AMP)})")
    return LEGACY_AMP[text]


def _add_precision_flags(g) -> None:
    """--precision, with --amp, its old name (also `attnlab detect train`'s)."""
    from .train.config import PRECISIONS

    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp32, or bf16/fp16 autocast (fp16: CUDA only); default auto: bf16 where the CPU (AVX512_BF16, AMX) or "
        "GPU has native bf16, else fp32",
    )
    g.add_argument(
        "--amp",
        dest="precision",
        nargs="?",
        const="auto",
        type=_legacy_amp,
        metavar="{off,auto,bf16,fp16}",
        help="old name of --precision (off = fp32; bare --amp = auto)",
    )


def _add_speed_flags(g) -> None:
    """--precision (with --amp, its old name) and --compile: how fast a model runs, not what it computes."""
    _add_precision_flags(g)
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model (inductor); falls back to eager, with one warning, where it cannot compile",
    )


def config_from_args(args: argparse.Namespace):
    """`TrainConfig` from defaults ← --config file (or, with --resume, the run's own) ← flags on the command line."""
    from .experiment.plan import unfold_model_entry
    from .train.config import TrainConfig
    from .train.rundir import RunDir

    unfold_model_entry(args, "classify", "model_arg")
    return TrainConfig.from_flags(args, saved=RunDir(args.out or TrainConfig.out).config if args.resume else None)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    train(config_from_args(args), resume=args.resume, progress=args.progress)
    return 0


# ----------------------------------------------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .train import check_fits, evaluate, load_trained, run_data
    from .train.config import autocast_dtype

    model, cfg = load_trained(args.checkpoint, device=args.device)
    dataset = args.dataset or (cfg.dataset if cfg else None)
    if dataset is None:
        raise AttnlabError(f"{args.checkpoint}: no config.yaml beside the weights; pass --dataset")
    if cfg is None:
        bundle = load_dataset(dataset, args.data_dir, **dict(args.data_arg))
    else:
        bundle = run_data(cfg, dataset, args.data_dir, **dict(args.data_arg))
    check_fits(model, bundle, dataset)
    split = getattr(bundle, args.split)
    precision = cfg.precision if cfg and (cfg.precision != "fp16" or args.device.startswith("cuda")) else "fp32"
    result = evaluate(
        model, split, bundle, batch_size=args.batch_size, device=args.device, autocast_dtype=autocast_dtype(precision)
    )
    print(
        json.dumps(
            {
                "checkpoint": str(args.checkpoint),
                "dataset": dataset,
                "split": args.split,
                "images": len(split),
                **result,
            }
        )
    )
    return 0


# --------------------------------------------------------------------------------------------------------------- models


def cmd_models(args: argparse.Namespace) -> int:
    import torch

    from .models import create_model, list_models
    from .train import count_flops

    names = list_models(args.pattern)
    if not names:
        raise AttnlabError(f"no model matches {args.pattern!r}")
    chans, h, w = args.input_size
    print(
        f"{'model':<22} {'params':>12} {'MFLOPs':>10}   (input {chans}×{h}×{w}, {args.num_classes} classes)", flush=True
    )
    for name in names:
        model = create_model(name, num_classes=args.num_classes, in_chans=chans)
        params = sum(p.numel() for p in model.parameters())
        flops = count_flops(model, chans, (h, w), torch.device("cpu"))
        print(f"{name:<22} {params:>12,} {flops / 1e6:>10.1f}", flush=True)  # each row as soon as it is measured
    return 0


def _input_size(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        c = h = w = 0
    if min(c, h, w) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W of positive integers such as 3,32,32, got {text!r}")
    return c, h, w


# ---------------------------------------------------------------------------------------------------------- bench, data


def cmd_bench(args: argparse.Namespace) -> int:

    from .io import check_writable, write_csv
    from .models import list_models
    from .train.cost import benchmark_models, format_table
    from .train.engine import resolve_device

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if not names:
        raise AttnlabError("bench: --models names no model")
    resolve_device(args.device)
    if args.csv:
        check_writable(args.csv, "--csv", folder=False)
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        from .errors import unknown_name

        raise unknown_name("model", unknown[0], list_models())
    rows = benchmark_models(
        names,
        input_size=args.input_size,
        batch_size=args.batch_size,
        precision=args.precision or "auto",
        compile=bool(args.compile),
        repeats=args.repeats,
        device=args.device,
        channels_last=args.channels_last,
    )
    print(format_table(rows))
    if args.csv:
        print(f"wrote {write_csv(args.csv, rows)}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data import load_dataset

    bundle = load_dataset(args.name, args.data_dir, download=args.download, **dict(args.data_arg))
    c, (h, w) = bundle.in_chans, bundle.image_size
    print(
        f"{bundle.name}: train {len(bundle.train)}, val {len(bundle.val)}, test {len(bundle.test)} images of "
        f"{c}×{h}×{w}, {bundle.num_classes} classes; mean {[round(m, 4) for m in bundle.mean]}, "
        f"std {[round(s, 4) for s in bundle.std]}; from {bundle.origin}"
    )
    return 0


# -------------------------------------------------------------------------------------------------------------- analyze


def _shown(numbers: dict[str, Any]) -> str:
    """``metric value, ...`` of a headline."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items())


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import group_means, headlines, run_analysis

    report = run_analysis(
        args.name,
        args.checkpoint,
        args.out,
        images=args.images,
        seed=args.seed,
        device=args.device,
        labels=args.label or None,
        compile=bool(args.compile),
        **dict(args.option),
    )
    for label, numbers in headlines(report).items():
        print(f"{label}: {_shown(numbers)}")
    for group, means in group_means(report).items():
        seeds = ", ".join(map(str, report["groups"][group]["seeds"]))
        print(f"{group}, mean over seeds {seeds}: {_shown({k: v['mean'] for k, v in means.items()})}")
    print(f"wrote {args.out}/{args.name}.json and {len(report['plots'])} plot(s)")
    return 0


# ------------------------------------------------------------------------------------------------------ compare, report


def _compare_recipe(args: argparse.Namespace) -> tuple[dict[str, Any], list[str] | None, dict[str, Any]]:
    """(shared recipe, datasets, dataset options) from --config and the training flags given on the command line."""
    from .experiment.plan import PER_RUN_FIELDS
    from .io import read_yaml
    from .schema import check
    from .train.config import given_flags

    for flag, given, instead in (
        ("--model", args.model, "--models"),
        ("--seed", args.seed, "--seeds"),
        ("--model-arg", args.model_arg, "model[key=value] in --models"),
        ("--in-chans", args.in_chans, "model[in_chans=N] in --models"),
    ):
        if given not in (None, []):
            raise AttnlabError(f"compare: {flag} is set per run; use {instead}")
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
    recipe.update(given_flags(args, exclude=PER_RUN_FIELDS))
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
        if getattr(args, key, None) is not None:
            flag = key.replace("_", "-")
            words += [f"--{'' if value else 'no-'}{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    for key, value in args.data_arg:
        words += ["--data-arg", f"{key}={value}"]
    words += ["--out", args.out] + (["--jobs", str(args.jobs)] if args.jobs is not None else [])
    words += ["--resume"] if args.resume else []
    return shlex.join(words)


def cmd_compare(args: argparse.Namespace) -> int:
    from .experiment import make_plan, run_compare
    from .io import check_writable
    from .report import build_report

    if not args.out:
        raise AttnlabError("compare: --out DIR is required")
    check_writable(args.out, "--out")
    launcher = _launcher(args)
    recipe, datasets, options = _compare_recipe(args)
    analyses = None
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
        command=_compare_command(args, recipe),
        jobs=1 if args.jobs is None else args.jobs,
        task=args.task,
    )
    jobs, progress = 1 if args.jobs is None else args.jobs, args.progress
    outcome = run_compare(plan, args.out, resume=args.resume, jobs=jobs, progress=progress, launcher=launcher)
    files = build_report(plan, args.out)
    print(f"compare: report written to {files.markdown} and {files.html}")
    print(f"report: {files.markdown}  (self-contained: {files.html})")
    return 1 if outcome.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .experiment import Plan
    from .io import check_writable
    from .report import build_report
    from .report.digest import digest, write_into_readme

    if args.digest:
        if args.readme:
            check_writable(args.readme, "--readme", folder=False)
        shown_as = Path(args.digest).as_posix()
        section = digest(Path(args.digest), shown_as)
        if args.readme:
            write_into_readme(Path(args.readme), section, shown_as)
            print(f"report: the claim section of {args.readme} rebuilt from {args.digest}")
        else:
            print(section, end="")
        return 0
    if not args.dir:
        raise AttnlabError("report: give a comparison folder, or --digest ROOT")
    check_writable(args.dir, "report")
    files = build_report(Plan.load(Path(args.dir)), Path(args.dir))
    print(f"report: {files.markdown}  (self-contained: {files.html})")
    return 0


# ----------------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="attnlab", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"attnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model; writes config, metrics, checkpoints, weights, summary")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)
    _add_tool_commands(sub)
    _add_study_commands(sub)
    from .detection.cli import add_parser as add_detect_parser

    add_detect_parser(sub, _key_value, _add_precision_flags)  # `attnlab detect train|eval`
    return parser


def _key_values(p: argparse.ArgumentParser, flag: str, help: str | None = None) -> None:
    """A repeatable ``FLAG KEY=VALUE`` option, collected as a list of (key, YAML value) pairs."""
    p.add_argument(flag, type=_key_value, action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_tool_commands(sub) -> None:
    """eval, models, bench, data."""
    p = sub.add_parser("eval", help="evaluate a trained run (or a model.safetensors) on a dataset split")
    p.add_argument("--checkpoint", required=True, help="run folder or model.safetensors")
    p.add_argument("--dataset", help="default: the run's own dataset")
    p.add_argument("--data-dir")
    _key_values(p, "--data-arg")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("models", help="list models with parameters and FLOPs")
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'cram_*'")
    p.add_argument("--input-size", type=_input_size, default=(3, 32, 32), metavar="C,H,W")
    p.add_argument("--num-classes", type=int, default=10)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bench", help="params, FLOPs, latency and train-step throughput of models, side by side")
    p.add_argument(
        "--models",
        default="resnet20,se_resnet20,eca_resnet20,cbam_resnet20,spatial_resnet20,"
        "cram_resnet20,aw_resnet20,fmm_resnet20",
        help="comma-separated; the first is the baseline",
    )
    p.add_argument("--input-size", type=_input_size, default=(3, 32, 32), metavar="C,H,W")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    _add_speed_flags(p)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--csv", help="also write the table to this CSV file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("data", help="find (or --download) a dataset and describe it")
    p.add_argument("name", help="dataset name, e.g. fashion-mnist")
    p.add_argument("--data-dir")
    p.add_argument("--download", action="store_true", help="fetch it from its official source if it is not found")
    _key_values(p, "--data-arg")
    p.set_defaults(func=cmd_data)


def _add_study_commands(sub) -> None:
    """analyze, compare, report."""
    p = sub.add_parser("analyze", help="test the papers' claims on trained runs; writes OUT/NAME.json and PNG plots")
    p.add_argument("name", help="consistency, smoothness, landscape or localization")
    p.add_argument("--checkpoint", action="append", required=True, help="run folder; repeat to compare several")
    p.add_argument("--out", required=True, help="folder for the JSON and PNG files")
    p.add_argument("--images", type=int, default=1000, help="test images per checkpoint (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--label", action="append", default=[], help="name of each checkpoint in tables and plots")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the models (inductor); an analysis that cannot run compiled runs eagerly, with one warning",
    )
    _key_values(
        p, "--option", "analysis option, e.g. methods=ablation,grad_x_act  grid=4  hessian_iters=10  per_block=true"
    )
    p.set_defaults(func=cmd_analyze)

    from .experiment.presets import list_presets

    p = sub.add_parser(
        "compare",
        help="train models × seeds, test the differences, write results.csv, summary.csv and a report",
        conflict_handler="resolve",
    )
    _add_train_flags(p)  # the shared recipe; --model and --seed are per run, so compare refuses them
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
    g.add_argument(
        "--jobs",
        type=int,
        help="runs trained at once: local processes (default 1), or submitit jobs queued at once (default all)",
    )
    g.add_argument("--preset", help=f"a claim experiment (models, data, budget, analyses): {', '.join(list_presets())}")
    g.add_argument(
        "--budget",
        help="a preset's budget: full (its own, the default) or cpu (converges on a 2-core CPU); flags override it",
    )
    g.add_argument("--baseline", help="entry the others are compared with (default: the first)")
    g.add_argument("--analyses", help="analyses run on every entry, comma-separated, or 'none' (replaces a preset's)")
    g.add_argument("--analysis-images", type=int, help="images per analysis (overrides the preset's)")
    _add_launcher_flags(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="rebuild a comparison's CSV files and report from its folder, without training")
    p.add_argument("dir", nargs="?", help="a folder written by `attnlab compare`")
    p.add_argument("--digest", metavar="ROOT", help="instead: the claim verdicts of every comparison under ROOT")
    p.add_argument("--readme", metavar="FILE", help="with --digest: write it between FILE's claim markers")
    p.set_defaults(func=cmd_report)


def _add_launcher_flags(p: argparse.ArgumentParser) -> None:
    """Where compare's runs train: here (local), or one scheduler job each through submitit (SLURM)."""
    g = p.add_argument_group("launcher (see README: sweeps on a cluster)")
    g.add_argument("--launcher", choices=("local", "submitit"), default="local", help="where runs train")
    g.add_argument("--cluster", help="submitit executor: slurm or local (default: slurm where srun exists, else local)")
    g.add_argument("--gpus-per-run", type=int, help="GPUs of each run's job (one task per GPU; default 0)")
    g.add_argument("--cpus-per-run", type=int, help="CPUs of each run's job (and its torch threads)")
    g.add_argument("--partition", help="SLURM partition of the jobs")
    g.add_argument("--timeout-min", type=int, help="time limit of each job; a job past it is requeued (default 60)")
    g.add_argument("--mem-gb", type=float, help="memory of each run's job")
    _key_values(g, "--slurm-arg", "any other parameter of submitit's SlurmExecutor, e.g. qos=high, account=lab")


def _launcher(args: argparse.Namespace):
    """The launcher --launcher asks for, checked before anything is written (None: compare's own LocalPool)."""
    from pathlib import Path

    from .experiment.launchers import SUBMITIT_DIR, Resources, SubmititLauncher, check_launcher_options

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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args)
        sys.stdout.flush()  # a reader that left shows here, inside the handlers below, not at exit
        return code
    except AttnlabError as e:
        print(f"attnlab: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("attnlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`attnlab models | head`): stop quietly, like any filter
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 0
    except OSError as e:  # the machine refused a read or write the checks above could not foresee (disk full, ...)
        print(f"attnlab: error: {e.filename or 'I/O'}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
