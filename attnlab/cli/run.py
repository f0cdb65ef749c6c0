"""``attnlab train`` and ``attnlab eval``: a classifier's run, and its numbers on a split."""

from __future__ import annotations

import argparse
import json

from .common import add_config_flags, add_eval_flags, add_run_flags, run_from_args


def add_parsers(sub) -> None:
    from ..train.config import TrainConfig

    p = sub.add_parser("train", help="train a model; writes config, metrics, checkpoints, weights, summary")
    add_run_flags(p)
    add_config_flags(p, TrainConfig)
    p.add_argument("--in-chans", type=int, help="input channels the model expects (must match the data)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run (or a model.safetensors) on a dataset split")
    add_eval_flags(p, batch_size="default: the run's eval_batch_size (512 for bare weights)")
    p.set_defaults(func=cmd_eval)


def cmd_train(args: argparse.Namespace) -> int:
    from ..train import train
    from ..train.config import TrainConfig

    if args.in_chans is not None:
        args.model_kwargs = [*args.model_kwargs, ("in_chans", args.in_chans)]
    return run_from_args(args, TrainConfig, "attnlab train", train)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..train.load import evaluate_trained

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
