"""``attnlab train`` and ``attnlab eval``: a classifier's run, and its numbers on a split."""

from __future__ import annotations

import argparse
import json

from ..errors import AttnlabError
from .common import add_key_values, add_speed_flags


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a model; writes config, metrics, checkpoints, weights, summary")
    add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run (or a model.safetensors) on a dataset split")
    p.add_argument("--checkpoint", required=True, help="run folder or model.safetensors")
    p.add_argument("--dataset", help="default: the run's own dataset")
    p.add_argument("--data-dir")
    add_key_values(p, "--data-arg")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_eval)


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """Flags of `TrainConfig`. Every default is None: only flags given on the command line override --config."""
    from ..train.config import NONFINITE, SCHEDULES

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
    add_speed_flags(g)
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
    add_key_values(g, "--model-arg", "model option, e.g. merge=gate, attn_where=last, attn_layer=se")
    add_key_values(g, "--data-arg", "dataset option, e.g. canvas=64 for cluttered-fashion-mnist")


def config_from_args(args: argparse.Namespace):
    """`TrainConfig` from defaults ← --config file (or, with --resume, the run's own) ← flags on the command line."""
    from ..experiment.plan import unfold_model_entry
    from ..train.config import TrainConfig
    from ..train.rundir import RunDir

    unfold_model_entry(args, "classify", "model_arg")
    return TrainConfig.from_flags(args, saved=RunDir(args.out or TrainConfig.out).config if args.resume else None)


def cmd_train(args: argparse.Namespace) -> int:
    from ..train import train

    train(config_from_args(args), resume=args.resume, progress=args.progress)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..train import check_fits, evaluate, load_trained, run_data
    from ..train.config import autocast_dtype

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
