"""``attnlab`` command line: wires data, models, training, analyses and reports. Bad input → one line, exit code 2.

One module per group of subcommands, each with ``add_parsers(sub)``; `common` holds what they share. Nothing below
the command line imports this package.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import AttnlabError
from . import analyze, compare, detect, run, tools
from .common import Parser

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The whole ``attnlab`` parser (the docs' CLI reference is generated from it)."""
    from .. import __version__

    parser = Parser(prog="attnlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"attnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in (run, tools, analyze, compare, detect):
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args)
        sys.stdout.flush()  # a reader that left shows here, inside the handlers below, not at exit
        return code
    except AttnlabError as e:
        print(f"attnlab: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("attnlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`attnlab models | head`): stop quietly, like any filter
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 0
    except OSError as e:  # the machine refused a read or write the checks above could not foresee (disk full, ...)
        print(f"attnlab: error: {e.filename or 'I/O'}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE


__all__ = ["build_parser", "main"]
