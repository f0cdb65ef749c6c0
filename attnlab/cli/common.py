"""What every subcommand shares: one-line argparse errors, ``KEY=VALUE`` options, precision and compile flags."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import AttnlabError
from ..io import key_value


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
    p.add_argument(flag, type=key_value_arg, action="append", default=[], metavar="KEY=VALUE", help=help, **kwargs)


def _legacy_amp(text: str) -> str:
    """``--amp X``, the old name of ``--precision``: off → fp32."""
    from ..train.config import LEGACY_AMP

    if text not in LEGACY_AMP:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(LEGACY_AMP)})")
    return LEGACY_AMP[text]


def add_precision_flags(g) -> None:
    """--precision, with --amp, its old name (also `attnlab detect train`'s)."""
    from ..train.config import PRECISIONS

    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp32, or bf16/fp16 autocast (fp16: CUDA only); default auto: bf16 where the CPU (AVX512_BF16, AMX) or "
        "GPU has native bf16, else fp32",
    )
    g.add_argument(
        "--amp",
        dest="precision",
        nargs="?",
        const="auto",
        type=_legacy_amp,
        metavar="{off,auto,bf16,fp16}",
        help="old name of --precision (off = fp32; bare --amp = auto)",
    )


def add_speed_flags(g) -> None:
    """--precision (with --amp, its old name) and --compile: how fast a model runs, not what it computes."""
    add_precision_flags(g)
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
