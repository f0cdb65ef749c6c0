"""``attnlab analyze NAME``: one analysis of the papers' claims on trained runs (``--checkpoint RUN``), or on any
network with its weights and no run folder (``--model M [--weights FILE | --pretrained] --dataset D``).

Each analysis is its own subcommand, its flags generated from the analysis function's keyword options: their types
from its annotations, their meanings from its docstring (``Args:``), their defaults from its signature.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from collections import abc
from typing import Any

from ..errors import unknown_name
from ..io import yaml_scalar
from .common import Parser, add_key_values

COMMON = (
    "checkpoint",
    "model",
    "weights",
    "pretrained",
    "dataset",
    "data_dir",
    "data_arg",
    "out",
    "images",
    "seed",
    "device",
    "label",
    "compile",
    "option",
)
"""Destinations of the flags every analysis has (an analysis option of one of these names would be shadowed)."""


class _AnalyzeParser(Parser):
    """``attnlab analyze``'s parser: an unknown analysis name is answered with the close matches."""

    def _check_value(self, action, value):
        if isinstance(action, argparse._SubParsersAction) and value not in action.choices:
            raise unknown_name("analysis", value, action.choices)
        super()._check_value(action, value)


def _plain(text: str) -> str:
    """Docstring markup (````code````, ```ref```) as plain text for --help."""
    return re.sub(r"`{1,2}([^`]+)`{1,2}", r"\1", text).replace("%", "%%")


def _is_sequence(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _is_sequence(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_is_sequence(a) for a in typing.get_args(tp))
    return origin in (list, tuple, abc.Sequence) or tp in (list, tuple)


def option_value(text: str, sequence: bool) -> Any:
    """A flag's or ``--option``'s text as a value: YAML, and a comma-separated list where the option takes a list."""
    value = yaml_scalar(text)
    if sequence and not isinstance(value, list):
        return [yaml_scalar(part) for part in str(text).split(",") if part.strip()]
    return value


def _shown_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", action="append", help="run folder; repeat to compare several")
    g = p.add_argument_group("a network with no run folder (instead of --checkpoint)")
    g.add_argument(
        "--model",
        help="any network create_model builds (attnlab's, timm's, torchvision:NAME), or an entry such as "
        "'efficientnet_b0[attention=eca]'; built for --dataset and analysed in eval mode",
    )
    start = g.add_mutually_exclusive_group()
    start.add_argument("--weights", metavar="FILE", help="its weights: safetensors or a state dict (.pth/.pt/.bin)")
    start.add_argument("--pretrained", action="store_true", default=None, help="its own downloaded weights")
    g.add_argument("--dataset", help="the data it is analysed on (its channels, classes and image size build it)")
    g.add_argument("--data-dir", help="where the dataset lives")
    add_key_values(g, "--data-arg", "dataset option, e.g. canvas=64 for cluttered-fashion-mnist")
    p.add_argument("--out", required=True, help="folder for the JSON and PNG files")
    p.add_argument("--images", type=int, default=1000, help="test images per checkpoint (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image choice and every random draw (default 0)")
    p.add_argument("--device", default="cpu", help="where the models run (default cpu)")
    p.add_argument("--label", action="append", default=[], help="name of each checkpoint in tables and plots")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the models (inductor); an analysis that cannot run compiled runs eagerly, with one warning",
    )
    add_key_values(p, "--option", "an analysis option as KEY=VALUE (the same as its flag below)")


def add_parsers(sub) -> None:
    from ..analysis import ANALYSES
    from ..schema import annotations, describe

    parser_class, sub._parser_class = sub._parser_class, _AnalyzeParser  # argparse's one way to pick this one's class
    try:
        p = sub.add_parser(
            "analyze", help="test the papers' claims on trained runs; writes OUT/NAME.json and PNG plots"
        )
    finally:
        sub._parser_class = parser_class
    analyses = p.add_subparsers(dest="name", required=True, metavar="NAME", parser_class=Parser)
    for name, analysis in ANALYSES.items():
        summary = _plain(inspect.getdoc(sys.modules[analysis.function.__module__]).splitlines()[0])
        a = analyses.add_parser(name, help=summary, description=summary)
        _add_common(a)
        g = a.add_argument_group(f"{name} options (each also settable as --option KEY=VALUE)")
        hints = annotations(analysis.function)
        meanings = analysis.option_meanings()
        for option, default in analysis.options().items():
            flag = "--" + option.replace("_", "-")
            meaning = _plain(meanings[option]) or describe(hints.get(option, Any))
            shown = f"{meaning} (default {_shown_default(default)})"
            if isinstance(default, bool):
                g.add_argument(flag, dest=f"opt_{option}", action=argparse.BooleanOptionalAction, help=shown)
            else:
                sequence = _is_sequence(hints.get(option, Any))
                g.add_argument(
                    flag,
                    dest=f"opt_{option}",
                    type=lambda text, sequence=sequence: option_value(text, sequence),
                    metavar="A,B,..." if sequence else option.upper(),
                    help=shown,
                )
        a.set_defaults(func=cmd_analyze)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs, then the options' own flags (a flag wins)."""
    from ..analysis import get_analysis
    from ..schema import annotations

    hints = annotations(get_analysis(args.name).function)
    options = {
        k: option_value(v, True) if isinstance(v, str) and _is_sequence(hints.get(k, Any)) else v
        for k, v in args.option
    }
    options.update({k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None})
    return options


def _shown(numbers: dict[str, Any]) -> str:
    """``metric value, ...`` of a headline."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items())


def legend(name: str, metrics: list[str]) -> list[str]:
    """``metric: meaning`` lines of the headline metrics shown (the analysis's ``METRIC_MEANINGS``)."""
    from ..analysis import get_analysis

    analysis = get_analysis(name)
    width = max(map(len, metrics), default=0)
    return [f"  {m:<{width}}  {analysis.meaning(m) or '(see the docs)'}" for m in metrics]


NETWORK_FLAGS = ("weights", "pretrained", "dataset", "data_dir", "data_arg")
"""Flags that describe the network of ``--model`` (meaningless beside ``--checkpoint``)."""


def _sources(args: argparse.Namespace) -> list[Any]:
    """The run folders of ``--checkpoint``, or the one network of ``--model`` as a `TrainConfig` (`run_analysis`)."""
    from ..errors import AttnlabError
    from ..train import TrainConfig
    from ..train.entry import parse_entry

    given = [f"--{k.replace('_', '-')}" for k in NETWORK_FLAGS if getattr(args, k)]
    if bool(args.checkpoint) == bool(args.model):
        raise AttnlabError(f"analyze {args.name}: give --checkpoint RUN or --model M (with --dataset D), not both")
    if args.checkpoint:
        if given:
            raise AttnlabError(f"analyze {args.name}: {given[0]} describes a --model; a run folder has its own")
        return args.checkpoint
    if not args.dataset:
        raise AttnlabError(f"analyze {args.name}: --model {args.model} needs --dataset D (the data it is analysed on)")
    entry = parse_entry(args.model)
    if entry.train:
        settings = ", ".join(entry.train)
        raise AttnlabError(f"analyze {args.name}: {settings} is a training setting; an analysis trains nothing")
    cfg = TrainConfig(
        model=entry.model,
        model_kwargs=entry.model_kwargs,
        weights=args.weights,
        pretrained=bool(args.pretrained),
        dataset=args.dataset,
        data_dir=args.data_dir,
        dataset_options=dict(args.data_arg),
        seed=args.seed,
        device=args.device,
    )
    return [cfg]


def cmd_analyze(args: argparse.Namespace) -> int:
    from ..analysis import get_analysis, group_means, headlines, run_analysis

    report = run_analysis(
        args.name,
        _sources(args),
        args.out,
        images=args.images,
        seed=args.seed,
        device=args.device,
        labels=args.label or ([args.model] if args.model else None),
        compile=bool(args.compile),
        **_options(args),
    )
    analysis = get_analysis(args.name)
    shown: dict[str, None] = {}
    for label, numbers in headlines(report).items():
        print(f"{label}: {_shown(numbers)}")
        for note in analysis.notes(report["results"][label]):
            print(f"  {note}")
        shown.update(dict.fromkeys(numbers))
    for group, means in group_means(report).items():
        seeds = ", ".join(map(str, report["groups"][group]["seeds"]))
        print(f"{group}, mean over seeds {seeds}: {_shown({k: v['mean'] for k, v in means.items()})}")
    print("where")
    print("\n".join(legend(args.name, list(shown))))
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")
    print(f"wrote {args.out}/{args.name}.json and {len(report['plots'])} plot(s)")
    return 0
