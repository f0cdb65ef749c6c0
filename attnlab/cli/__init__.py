"""``attnlab`` command line: wires data, models, training, analyses and reports. Bad input → one line, exit code 2.

One module per group of subcommands, each with ``add_parsers(sub)``; `common` holds what they share. Nothing below
the command line imports this package. A command builds only its own group's parser (a group may import torch to
build it); the others appear by name and summary (`COMMANDS`), so ``attnlab --help`` imports neither torch nor timm.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from ..errors import AttnlabError
from .common import Parser

EXIT_USAGE = 2
GROUPS = ("run", "tools", "analyze", "compare", "detect")
COMMANDS = {  # name: (group module, summary); test_cli_startup checks each summary against the group's own parser
    "train": ("run", "train a model; writes config, metrics, checkpoints, weights, summary"),
    "eval": ("run", "evaluate a trained run (or a model.safetensors) on a dataset split"),
    "models": ("tools", "list model names (--flops: with parameters and FLOPs)"),
    "bench": ("tools", "params, FLOPs, latency and train-step throughput of models, side by side"),
    "data": ("tools", "find (or --download) a dataset and describe it"),
    "analyze": ("analyze", "test the papers' claims on trained runs; writes OUT/NAME.json and PNG plots"),
    "compare": ("compare", "train models × seeds, test the differences, write results.csv, summary.csv and a report"),
    "report": ("compare", "rebuild a comparison's CSV files and report from its folder, without training"),
    "detect": ("detect", "object detection: Faster R-CNN / RetinaNet with an attnlab backbone"),
}


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The ``attnlab`` parser: every group in full (``"*"``, the docs' CLI reference is generated from it), only the
    group of subcommand ``command``, or (None) none: each subcommand then by name and summary only."""
    from .. import __version__

    parser = Parser(prog="attnlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"attnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    full = set(GROUPS) if command == "*" else {COMMANDS[command][0]} if command in COMMANDS else set()
    built: set[str] = set()
    for name, (group, summary) in COMMANDS.items():
        if group not in full:
            sub.add_parser(name, help=summary)
        elif group not in built:  # the group adds all of its subcommands at once
            importlib.import_module(f".{group}", __name__).add_parsers(sub)
            built.add(group)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (its first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(_command(argv)).parse_args(argv)
        code = args.func(args)
        sys.stdout.flush()  # a reader that left shows here, inside the handlers below, not at exit
        return code
    except AttnlabError as e:
        print(f"attnlab: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_USAGE)  # a run stopped by a signal: 128 + its number, as a shell says
    except KeyboardInterrupt:
        print("attnlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`attnlab models | head`): stop quietly, like any filter
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 0
    except OSError as e:  # the machine refused a read or write the checks above could not foresee (disk full, ...)
        print(f"attnlab: error: {e.filename or 'I/O'}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE


__all__ = ["COMMANDS", "build_parser", "main"]
