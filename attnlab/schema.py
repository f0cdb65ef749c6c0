"""One typed schema for every setting: a value is checked against the type annotation of what it sets — a field of
`TrainConfig` (any dataclass), a model option, an analysis or dataset option (a keyword argument) — so that a wrong
type, a non-finite float or an integer wider than 64 bits is one line naming the key, the value and what is allowed.

Conversions are only the lossless ones a YAML file or a command line needs: an integer where a float belongs, a list
where a tuple belongs, and ``a,b,c`` text where a list belongs (``--option methods=ablation,grad_x_act``). Ranges are
``Annotated[float, Range(0, 1)]``; a check an annotation cannot state stays in the owner's ``__post_init__``.
"""

from __future__ import annotations

import collections.abc as abc
import dataclasses
import functools
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from .errors import AttnlabError, unknown_name

INT_BOUND = 2**63
"""Integers must fit 64 signed bits: torch (seeds, sizes, counts) holds no wider one."""


@dataclass(frozen=True)
class Range:
    """``Annotated`` metadata: the interval a number must lie in (``None``: unbounded on that side)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def holds(self, v: float) -> bool:
        above = self.low is None or (v > self.low if self.low_open else v >= self.low)
        return above and (self.high is None or v <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '≥'} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}]"


PLACEMENT = ("device", "dtype")
"""Construction keywords (timm's convention): where and in what a layer is built, passed by its builder, never an
option a user sets."""

PositiveInt = Annotated[int, Range(1)]
Probability = Annotated[float, Range(0, 1)]


class _Mismatch(Exception):
    pass


def describe(tp: Any) -> str:
    """What a value of type ``tp`` may be, in words: ``int | None`` → "an integer or null"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        ranges = [str(m) for m in tp.__metadata__ if isinstance(m, Range)]
        return " ".join([describe(args[0]), *ranges])
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(a) for a in args))
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (list, tuple, abc.Sequence) and args:
        if origin is tuple and args[-1] is not Ellipsis:
            return f"a list of {len(args)} " + " or ".join(dict.fromkeys(_items(a) for a in args))
        return f"a list of {_items(args[0])}"
    if origin in (dict, abc.Mapping) or tp in (dict, abc.Mapping):
        return "a mapping"
    if origin in (list, tuple, abc.Sequence) or tp in (list, tuple):
        return "a list"
    if origin is abc.Callable or tp in (abc.Callable, typing.Callable):
        return "a Python callable (not settable as text)"
    return _NAMES.get(tp, f"a Python {getattr(tp, '__name__', tp)} (not settable as text)")


_NAMES = {int: "a 64-bit integer", float: "a finite number", str: "a string", bool: "true or false", type(None): "null"}


_PLURAL = {int: "64-bit integers", float: "finite numbers", str: "strings", bool: "booleans"}


def _items(tp: Any) -> str:
    return _PLURAL.get(tp) or f"items each {describe(tp)}"


def _convert(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (losslessly converted), or `_Mismatch`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is inspect.Parameter.empty or isinstance(tp, typing.TypeVar):
        return value
    if origin is Annotated:
        value = _convert(value, args[0])
        if not all(m.holds(value) for m in tp.__metadata__ if isinstance(m, Range)):
            raise _Mismatch
        return value
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _convert(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _Mismatch
    if origin in (list, tuple, abc.Sequence) or tp in (list, tuple):
        return _sequence(value, origin or tp, args)
    if origin in (dict, abc.Mapping) or tp in (dict, abc.Mapping):
        if not isinstance(value, dict):
            raise _Mismatch
        key_tp, value_tp = args or (Any, Any)
        return {_convert(k, key_tp): _convert(v, value_tp) for k, v in value.items()}
    return _scalar(value, tp, origin)


def _sequence(value: Any, origin: Any, args: tuple) -> Any:
    if not isinstance(value, list | tuple):
        raise _Mismatch
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_convert(v, a) for v, a in zip(value, args))
    items = [_convert(v, args[0]) for v in value] if args else list(value)
    return tuple(items) if origin is tuple else items


def _scalar(value: Any, tp: Any, origin: Any) -> Any:
    if tp is bool or tp is type(None):
        if type(value) is tp:
            return value
    elif tp is int:
        if type(value) is int and -INT_BOUND <= value < INT_BOUND:
            return value
    elif tp is float:
        if type(value) in (int, float) and math.isfinite(number := _as_float(value)):
            return number
    elif tp is str:
        if type(value) is str:
            return value
    elif origin is abc.Callable or tp in (abc.Callable, typing.Callable):
        if callable(value):
            return value
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        return value  # a typing construct we do not check
    raise _Mismatch


def _as_float(value: float) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer beyond every float
        return math.inf


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)`` on one line, shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check(key: str, value: Any, tp: Any) -> Any:
    """``value`` checked (and losslessly converted) against annotation ``tp``; an `AttnlabError` naming ``key``,
    ``value`` and what ``tp`` allows otherwise. Text ``a,b`` is a list where the type takes a list but no string."""
    try:
        return _convert(value, tp)
    except _Mismatch:
        pass
    if isinstance(value, str):
        from .io import yaml_scalar

        try:
            return _convert([yaml_scalar(v) for v in value.split(",") if v.strip()], tp)
        except _Mismatch:
            pass
    raise AttnlabError(f"{key} must be {describe(tp)}, got {show(value)}")


@functools.cache
def annotations(obj: Any) -> dict[str, Any]:
    """The resolved annotations of a dataclass, a function or a class's constructor (``Annotated`` kept); none where
    they cannot be resolved (then values pass unchecked)."""
    try:
        return typing.get_type_hints(obj.__init__ if isinstance(obj, type) else obj, include_extras=True)
    except (NameError, TypeError, AttributeError):
        return {}


def check_keys(values: Mapping, known: abc.Collection[str], kind: str = "setting") -> None:
    """Refuse keys that are not strings or not known (with close matches)."""
    for key in values:
        if not isinstance(key, str):
            raise AttnlabError(f"{kind} names must be strings, got {show(key)}")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise unknown_name(kind, unknown[0], known)


def check_fields(obj: Any) -> None:
    """Check (and convert in place) every field of dataclass instance ``obj`` against its annotation: the first line of
    a ``__post_init__``, so that every way of building it — YAML, flags, Python — is checked the same way."""
    hints = annotations(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, check(f.name, getattr(obj, f.name), hints[f.name]))


def check_call(
    function: Callable, options: Mapping[str, Any], what: str, declared: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Keyword ``options`` for ``function`` (a class: its constructor), checked: names it takes as options (any, if
    it takes ``**kwargs``) and values of the types it declares (or ``declared`` does, first); ``device`` and ``dtype``
    are not options (`PLACEMENT`). Errors start with ``what``."""
    params = inspect.signature(function).parameters
    params = {n: p for n, p in params.items() if n not in PLACEMENT}
    named = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]  # options are keyword-only where it has any,
    named = named or [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD][1:]  # else all but `channels`
    hints = {**annotations(function), **(declared or {})}
    try:
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            check_keys(options, named, "option")
        else:
            check_keys(options, options, "option")
        return {key: check(key, value, hints.get(key, Any)) for key, value in options.items()}
    except AttnlabError as e:
        raise AttnlabError(f"{what}: {e}") from None
