"""The one exception type users see: a problem with their input, reported as a single line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")


class AttnlabError(ValueError):
    """Bad input (a name, a file, a flag). The CLI prints its message on one line and exits with code 2."""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> AttnlabError:
    """An `AttnlabError` for an unknown name, suggesting the closest known ones."""
    choices = sorted(set(choices))  # a name two registries know is suggested once
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(choices[:20]) or 'none'}"
    if not close and len(choices) > 20:
        hint += ", ..."
    return AttnlabError(f"unknown {kind} '{name}'{hint}")


def lookup(table: Mapping[str, T], name: str, kind: str) -> T:
    """``table[name]``: the registries' one lookup, an `unknown_name` error when ``name`` is not there."""
    try:
        return table[name]
    except KeyError:
        raise unknown_name(kind, name, table) from None
