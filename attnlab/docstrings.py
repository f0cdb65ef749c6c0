"""The meaning of each argument of a function, read from its Google-style docstring (``Args:``), for generated help."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

_ENTRY = re.compile(r"^(\w+(?:,\s*\w+)*):\s*(.*)$")


def _section(doc: str) -> list[str]:
    """The lines of the ``Args:`` section, dedented by the section's own indent."""
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:") + 1
    except StopIteration:
        return []
    body = []
    for line in lines[start:]:
        if line.strip() and not line.startswith(" "):  # the next section (Returns:, ...)
            break
        body.append(line)
    indent = min((len(line) - len(line.lstrip()) for line in body if line.strip()), default=0)
    return [line[indent:] for line in body]


def argument_meanings(function: Callable) -> dict[str, str]:
    """``{argument: meaning}`` from ``function``'s ``Args:`` section. An entry may name several arguments
    (``a, b: text``: both get the text) or hold several entries separated by ``; name: `` (``a: x; b: y``)."""
    names = set(inspect.signature(function).parameters)
    entries: list[tuple[list[str], str]] = []
    for line in _section(function.__doc__ or ""):
        match = _ENTRY.match(line)
        keys = [k.strip() for k in match.group(1).split(",")] if match else []
        if keys and set(keys) <= names:
            entries.append((keys, match.group(2)))
        elif entries and line.strip():
            entries[-1] = (entries[-1][0], f"{entries[-1][1]} {line.strip()}")
    meanings: dict[str, str] = {}
    split = re.compile(r";\s+(\w+(?:,\s*\w+)*):\s+")
    for keys, text in entries:
        parts = split.split(text)  # text, names, text, names, text ...
        pending = [(keys, parts[0])]
        for i in range(1, len(parts) - 1, 2):
            inner = [k.strip() for k in parts[i].split(",")]
            if set(inner) <= names:
                pending.append((inner, parts[i + 1]))
            else:  # a "; word: " inside the text, not an entry
                pending[-1] = (pending[-1][0], f"{pending[-1][1]}; {parts[i]}: {parts[i + 1]}")
        for group, meaning in pending:
            for key in group:
                meanings[key] = meaning.strip().rstrip(".")
    return meanings


__all__ = ["argument_meanings"]
