"""``attnlab detect train|eval``: a detector with an attnlab backbone, trained and evaluated."""

from __future__ import annotations

import argparse
import json
import shlex

from ..errors import AttnlabError
from .common import add_config_flags, add_key_values, continuable
from .run import add_run_flags


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``detect`` with its ``train`` and ``eval`` subcommands."""
    from ..detection.config import DetectConfig

    detect = sub.add_parser("detect", help="object detection: Faster R-CNN / RetinaNet with an attnlab backbone")
    actions = detect.add_subparsers(dest="action", required=True, parser_class=type(detect))
    p = actions.add_parser("train", help="train a detector; writes config, metrics, checkpoints, weights, summary")
    add_run_flags(p)
    add_config_flags(p, DetectConfig)
    p.set_defaults(func=cmd_detect_train)

    p = actions.add_parser("eval", help="COCO metrics of a trained detector on a split")
    p.add_argument("--checkpoint", required=True, help="detect run folder or its model.safetensors")
    p.add_argument("--dataset", help="default: the run's own dataset")
    p.add_argument("--data-dir")
    add_key_values(p, "--data-arg")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_detect_eval)


def config_from_args(args: argparse.Namespace):
    """`DetectConfig` from defaults ← --config file (or, resuming, the run's own) ← flags given here."""
    from ..detection.config import DetectConfig
    from ..train.entry import unfold_model_entry
    from ..train.rundir import RunDir

    unfold_model_entry(args, DetectConfig)
    return DetectConfig.from_flags(args, saved=RunDir(args.out or DetectConfig.out).config if args.resume else None)


def cmd_detect_train(args: argparse.Namespace) -> int:
    from ..detection.task import train_detector

    cfg = config_from_args(args)
    with continuable(f"attnlab detect train --out {shlex.quote(cfg.out)}", cfg.out):
        train_detector(cfg, resume=args.resume, progress=args.progress)
    return 0


def cmd_detect_eval(args: argparse.Namespace) -> int:
    from ..detection.load import evaluate_run

    if args.batch_size < 1:
        raise AttnlabError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    result = evaluate_run(
        args.checkpoint,
        dataset=args.dataset,
        split=args.split,
        data_dir=args.data_dir,
        data_options=dict(args.data_arg),
        batch_size=args.batch_size,
        device=args.device,
    )
    print(json.dumps(result))
    return 0
