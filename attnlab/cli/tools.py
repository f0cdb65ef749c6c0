"""``attnlab models``, ``attnlab bench`` and ``attnlab data``: what there is, what it costs, what a dataset holds."""

from __future__ import annotations

import argparse

from ..errors import AttnlabError
from .common import add_key_values, add_speed_flags, input_size


def add_parsers(sub) -> None:
    p = sub.add_parser("models", help="list model names (--flops: with parameters and FLOPs)")
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'cram_*'")
    p.add_argument(
        "--flops",
        action="store_true",
        help="also build each model and count its parameters and FLOPs (seconds per model on a CPU)",
    )
    p.add_argument(
        "--input-size", type=input_size, default=(3, 32, 32), metavar="C,H,W", help="with --flops (default 3,32,32)"
    )
    p.add_argument("--num-classes", type=int, default=10, help="with --flops (default 10)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bench", help="params, FLOPs, latency and train-step throughput of models, side by side")
    p.add_argument(
        "--models",
        default="resnet20,se_resnet20,eca_resnet20,cbam_resnet20,spatial_resnet20,"
        "cram_resnet20,aw_resnet20,fmm_resnet20",
        help="comma-separated model names or entries (efficientnet_b0[attention=eca]); the first is the baseline",
    )
    p.add_argument("--input-size", type=input_size, default=(3, 32, 32), metavar="C,H,W")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    add_speed_flags(p)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--csv", help="also write the table to this CSV file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("data", help="find (or --download) a dataset and describe it")
    p.add_argument("name", help="dataset name, e.g. fashion-mnist")
    p.add_argument("--data-dir")
    p.add_argument("--download", action="store_true", help="fetch it from its official source if it is not found")
    add_key_values(p, "--data-arg")
    p.set_defaults(func=cmd_data)


def cmd_models(args: argparse.Namespace) -> int:
    from ..models import create_model, list_models

    names = list_models(args.pattern)
    if not names:
        raise AttnlabError(f"no model matches {args.pattern!r}")
    if not args.flops:
        print("\n".join(names))
        return 0
    import torch

    from ..train import count_flops

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


def cmd_bench(args: argparse.Namespace) -> int:

    from ..io import check_writable, write_csv
    from ..train.cost import benchmark_models, format_table
    from ..train.engine import resolve_device
    from ..train.entry import parse_entry, split_top

    names = split_top(args.models)
    if not names:
        raise AttnlabError("bench: --models names no model")
    resolve_device(args.device)
    if args.csv:
        check_writable(args.csv, "--csv", folder=False)
    for name in names:
        parse_entry(name)  # an unknown name (attnlab's, timm's, torchvision:NAME) fails before any work
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
    from ..data import load_dataset

    bundle = load_dataset(args.name, args.data_dir, download=args.download, **dict(args.data_arg))
    c, (h, w) = bundle.in_chans, bundle.image_size
    print(
        f"{bundle.name}: train {len(bundle.train)}, val {len(bundle.val)}, test {len(bundle.test)} images of "
        f"{c}×{h}×{w}, {bundle.num_classes} classes; mean {[round(m, 4) for m in bundle.mean]}, "
        f"std {[round(s, 4) for s in bundle.std]}; from {bundle.origin}"
    )
    for note in bundle.notes:
        print(f"note: {note}")
    return 0
