"""``attnlab analyze NAME``: one analysis of the papers' claims on trained runs."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_key_values


def add_parsers(sub) -> None:
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
    add_key_values(
        p, "--option", "analysis option, e.g. methods=ablation,grad_x_act  grid=4  hessian_iters=10  per_block=true"
    )
    p.set_defaults(func=cmd_analyze)


def _shown(numbers: dict[str, Any]) -> str:
    """``metric value, ...`` of a headline."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items())


def cmd_analyze(args: argparse.Namespace) -> int:
    from ..analysis import group_means, headlines, run_analysis

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
