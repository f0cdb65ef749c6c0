"""``attnlab train`` and ``attnlab eval``: a classifier's run, and its numbers on a split."""

from __future__ import annotations

import argparse
import json
import shlex

from .common import add_config_flags, add_key_values, continuable


def add_parsers(sub) -> None:
    from ..train.config import TrainConfig

    p = sub.add_parser("train", help="train a model; writes config, metrics, checkpoints, weights, summary")
    add_run_flags(p)
    add_config_flags(p, TrainConfig)
    p.add_argument("--in-chans", type=int, help="input channels the model expects (must match the data)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run (or a model.safetensors) on a dataset split")
    p.add_argument("--checkpoint", required=True, help="run folder or model.safetensors")
    p.add_argument("--dataset", help="default: the run's own dataset")
    p.add_argument("--data-dir")
    add_key_values(p, "--data-arg")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--batch-size", type=int, help="default: the run's eval_batch_size (512 for bare weights)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_eval)


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """What a training command takes beside its config's fields: --config, --resume, --progress."""
    g = p.add_argument_group("command")
    g.add_argument("--config", help="YAML file of settings; flags given here override it")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )


def config_from_args(args: argparse.Namespace):
    """`TrainConfig` from defaults ← --config file (or, with --resume, the run's own) ← flags on the command line."""
    from ..train.config import TrainConfig
    from ..train.entry import unfold_model_entry
    from ..train.rundir import RunDir

    unfold_model_entry(args, TrainConfig)
    if args.in_chans is not None:
        args.model_kwargs = [*args.model_kwargs, ("in_chans", args.in_chans)]
    return TrainConfig.from_flags(args, saved=RunDir(args.out or TrainConfig.out).config if args.resume else None)


def cmd_train(args: argparse.Namespace) -> int:
    from ..train import train

    cfg = config_from_args(args)
    with continuable(f"attnlab train --out {shlex.quote(cfg.out)}", cfg.out):
        train(cfg, resume=args.resume, progress=args.progress)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..errors import AttnlabError
    from ..train.load import evaluate_trained

    if args.batch_size is not None and args.batch_size < 1:
        raise AttnlabError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    result = evaluate_trained(
        args.checkpoint,
        split=args.split,
        dataset=args.dataset,
        data_dir=args.data_dir,
        data_options=dict(args.data_arg),
        batch_size=args.batch_size,
        device=args.device,
    )
    print(json.dumps(result))
    return 0
