"""``attnlab detect train|eval``: a detector with an attnlab backbone, trained and evaluated."""

from __future__ import annotations

import argparse
import json

from .common import add_config_flags, add_eval_flags, add_run_flags, run_from_args


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
    add_eval_flags(p, batch_size="default 32")
    p.set_defaults(func=cmd_detect_eval, batch_size=32)


def cmd_detect_train(args: argparse.Namespace) -> int:
    from ..detection.config import DetectConfig
    from ..detection.task import train_detector

    return run_from_args(args, DetectConfig, "attnlab detect train", train_detector)


def cmd_detect_eval(args: argparse.Namespace) -> int:
    from ..detection.load import evaluate_run

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
