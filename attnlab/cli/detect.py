"""``attnlab detect train|eval``: a detector with an attnlab backbone, trained and evaluated."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import AttnlabError
from .common import add_key_values, add_precision_flags

DATASETS_HELP = (
    "detection-fashion-mnist (1-5 garments per canvas, with clutter) or coco:PATH (PATH holding train.json + "
    "test.json [+ val.json] with images relative to PATH or PATH/images, or COCO's annotations/instances_*.json "
    "layout); default detection-fashion-mnist"
)
DICT_FIELDS = ("model_kwargs", "detector_kwargs", "dataset_options")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``detect`` with its ``train`` and ``eval`` subcommands."""
    from ..detection.detector import DETECTORS
    from ..train.config import SCHEDULES

    detect = sub.add_parser("detect", help="object detection: Faster R-CNN / RetinaNet with an attnlab backbone")
    actions = detect.add_subparsers(dest="action", required=True, parser_class=type(detect))
    p = actions.add_parser("train", help="train a detector; writes config, metrics, checkpoints, weights, summary")
    g = p.add_argument_group("run")
    g.add_argument(
        "--model",
        help="backbone: any attnlab model name (see `attnlab models`) or an entry NAME[key=value,...]; "
        "default resnet20",
    )
    g.add_argument("--detector", choices=DETECTORS, help="default fasterrcnn")
    g.add_argument("--dataset", help=DATASETS_HELP)
    g.add_argument("--data-dir", help="folder holding the Fashion-MNIST files (else $ATTNLAB_DATA, system paths)")
    g.add_argument("--out", help="run folder (default runs/detect); an existing run is never overwritten")
    g.add_argument("--config", help="YAML file of settings; flags given here override it")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--seed", type=int)
    g.add_argument("--subset", type=int, help="train on N images of a seeded shuffle (quick runs)")
    g.add_argument("--val-size", type=float, help="validation images carved from train (count, or fraction if < 1)")
    g.add_argument("--device", help="cpu or cuda[:N]")
    add_precision_flags(g)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="default: on a terminal")
    g = p.add_argument_group("recipe")
    for flag, kind in (("--epochs", int), ("--batch-size", int), ("--lr", float), ("--momentum", float)):
        g.add_argument(flag, type=kind)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", choices=SCHEDULES)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flips")
    g.add_argument("--grad-clip", type=float)
    g.add_argument("--eval-batch-size", type=int)
    g = p.add_argument_group("detector")
    g.add_argument("--fpn-channels", type=int, help="channels of the feature pyramid (default 64)")
    g.add_argument("--out-indices", type=_int_list, help="backbone levels under the pyramid, e.g. 2,3 (0 = stem)")
    g.add_argument("--anchor-scale", type=float, help="anchor side / level stride (default 8)")
    g.add_argument("--min-size", type=int, help="resize the shorter image side to this (default: data's size or 800)")
    g.add_argument("--max-size", type=int, help="longest image side after resizing")
    g.add_argument("--trainable-layers", type=int, help="backbone stages kept trainable, from the last (default all)")
    g.add_argument("--frozen-bn", action=argparse.BooleanOptionalAction, default=None, help="freeze backbone BN")
    g.add_argument("--backbone-weights", help="start the backbone from a trained classifier run of the same model")
    for flag, dest, example in (
        ("--model-arg", "model_kwargs", "attn_layer=se"),
        ("--detector-arg", "detector_kwargs", "box_batch_size_per_image=128"),
        ("--data-arg", "dataset_options", "canvas=64"),
    ):
        add_key_values(g, flag, example, dest=dest)
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


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def config_from_args(args: argparse.Namespace):
    """`DetectConfig` from defaults ← --config file (or, resuming, the run's own) ← flags given here."""
    from ..detection.config import DetectConfig
    from ..experiment.plan import unfold_model_entry
    from ..io import read_yaml
    from ..train.rundir import RunDir

    unfold_model_entry(args, "detect", "model_kwargs")
    values: dict[str, Any] = {}
    run = RunDir(args.out or DetectConfig.out)
    if args.config:
        values = read_yaml(args.config)
    elif args.resume and run.config.exists():
        values = read_yaml(run.config)
    for field in DetectConfig.__dataclass_fields__:
        given = getattr(args, field, None)
        if field in DICT_FIELDS:
            saved = values.get(field, {})  # not a mapping: left for DetectConfig's check to name
            values[field] = {**saved, **dict(given or [])} if isinstance(saved, dict) else saved
        elif given is not None:
            values[field] = given
    if args.val_size is not None and args.val_size >= 1 and args.val_size.is_integer():
        values["val_size"] = int(args.val_size)
    return DetectConfig.from_dict(values, source=args.config or "command line")


def cmd_detect_train(args: argparse.Namespace) -> int:
    from ..detection.engine import train_detector

    train_detector(config_from_args(args), resume=args.resume, progress=args.progress)
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
