"""What every subcommand shares: one-line argparse errors, ``KEY=VALUE`` options, the flags of a run configuration
generated from its dataclass, precision and compile flags, and the hint that continues an interrupted run."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shlex
import sys
import types
import typing
from collections.abc import Collection, Iterator
from typing import Any

from ..errors import AttnlabError
from ..io import key_value

GROUPS = {"run": "run", "recipe": "recipe", "options": "model, data and mechanism options", "detector": "detector"}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), matching the rest of attnlab."""

    def error(self, message: str):
        raise AttnlabError(f"{self.prog}: {message} (see --help)")


def key_value_arg(text: str) -> tuple[str, Any]:
    """argparse type of ``KEY=VALUE`` (the value read as YAML)."""
    try:
        return key_value(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_key_values(p, flag: str, help: str | None = None, **kwargs: Any) -> None:
    """A repeatable ``FLAG KEY=VALUE`` option, collected as a list of (key, YAML value) pairs."""
    kwargs.setdefault("metavar", "KEY=VALUE")
    p.add_argument(flag, type=key_value_arg, action="append", default=[], help=help, **kwargs)


def positive_int(text: str) -> int:
    """argparse type of a count ≥ 1 (a batch size)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type of ``1,2,3``."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def str_list(text: str) -> list[str]:
    """argparse type of ``a,b,c``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _flag_type(tp: Any) -> tuple[Any, str | None]:
    """(argparse type, kind) of a field annotation: kind ``bool``, ``pairs`` (a mapping) or None."""
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if set(args) == {int, float}:
            return float, None  # val_size: a count or a fraction (`given_flags` makes ≥ 1 a count)
        tp = args[0]
    origin = typing.get_origin(tp)
    if tp is bool:
        return None, "bool"
    if origin is dict:
        return key_value_arg, "pairs"
    if origin is list:
        return (int_list if typing.get_args(tp) == (int,) else str_list), None
    return tp, None


def add_config_flags(p: argparse.ArgumentParser, config: type, exclude: Collection[str] = ()) -> None:
    """One flag per field of run-config dataclass ``config`` (but ``exclude``), from its annotation and metadata
    (`attnlab.train.config.setting`): ``--batch-size`` for ``batch_size``, ``--x/--no-x`` for a bool, a repeatable
    ``--model-arg KEY=VALUE`` for a mapping, the help text with the class's default. Every default is None (or [] for
    the pairs): only flags given on the command line override --config (`attnlab.train.config.given_flags`)."""
    hints = typing.get_type_hints(config)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name in exclude:
            continue
        meta = f.metadata
        group_name = meta.get("group", "recipe")
        if group_name not in groups:
            groups[group_name] = p.add_argument_group(GROUPS.get(group_name, group_name))
        g = groups[group_name]
        kind, form = _flag_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = meta.get("help", "")
        if form != "pairs" and default is not None:
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            shown = ("on" if default else "off") if isinstance(default, bool) else shown
            help_text += f" (default {shown})"
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        if form == "bool":
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif form == "pairs":
            add_key_values(
                g, flag, help_text, dest=f.name, **({"metavar": meta["metavar"]} if "metavar" in meta else {})
            )
        else:
            g.add_argument(
                flag, dest=f.name, type=kind, choices=meta.get("choices"), metavar=meta.get("metavar"), help=help_text
            )


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """What a training command takes beside its config's fields: --config, --resume, --progress."""
    g = p.add_argument_group("command")
    g.add_argument("--config", help="YAML file of settings; flags given here override it")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )


def add_eval_flags(p: argparse.ArgumentParser, batch_size: str) -> None:
    """What an evaluation command takes: the run, the data and split, the batch size, the device."""
    p.add_argument("--checkpoint", required=True, help="run folder or its model.safetensors")
    p.add_argument("--dataset", help="default: the run's own dataset")
    p.add_argument("--data-dir")
    add_key_values(p, "--data-arg")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--batch-size", type=positive_int, help=batch_size)
    p.add_argument("--device", default="cpu")


def config_from_args(args: argparse.Namespace, config: type):
    """Run config ``config`` from its defaults ← --config file (or, with --resume, the run's own) ← the flags given."""
    from ..train.entry import unfold_model_entry
    from ..train.rundir import RunDir

    unfold_model_entry(args, config)
    return config.from_flags(args, saved=RunDir(args.out or config.out).config if args.resume else None)


def run_from_args(args: argparse.Namespace, config: type, command: str, run) -> int:
    """Build ``config`` from the flags and ``run(cfg, resume=, progress=)`` it; Ctrl-C says how to continue."""
    cfg = config_from_args(args, config)
    with continuable(f"{command} --out {shlex.quote(cfg.out)}", cfg.out):
        run(cfg, resume=args.resume, progress=args.progress)
    return 0


def add_speed_flags(g) -> None:
    """--precision and --compile: how fast a model runs, not what it computes."""
    from ..train.config import PRECISIONS

    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp32, or bf16/fp16 autocast (fp16: CUDA only); default auto: bf16 where the CPU (AVX512_BF16, AMX) or "
        "GPU has native bf16, else fp32",
    )
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model (inductor); falls back to eager, with one warning, where it cannot compile",
    )


def input_size(text: str) -> tuple[int, int, int]:
    """argparse type of ``C,H,W`` (or ``CxHxW``)."""
    try:
        c, h, w = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        c = h = w = 0
    if min(c, h, w) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W of positive integers such as 3,32,32, got {text!r}")
    return c, h, w


@contextlib.contextmanager
def continuable(command: str, out: str) -> Iterator[None]:
    """Around a run (or a comparison) writing into ``out``: on Ctrl-C, say how to continue it, ``command`` with
    ``--resume``, where it left anything to continue."""
    try:
        yield
    except KeyboardInterrupt:
        from pathlib import Path

        if Path(out).is_dir() and any(Path(out).iterdir()):
            resume = command if command.endswith(" --resume") else f"{command} --resume"
            print(f"attnlab: interrupted; to continue: {resume}", file=sys.stderr)
        raise
