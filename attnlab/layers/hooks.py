"""What a mechanism asks of the training loop, registered by the mechanism so that the engine imports none.

A mechanism registers a factory ``factory(model, **options) -> StepHook | None`` under its name. The options are the
mechanism's training settings (CRAM's equivariance weight and transforms, AW's memory layout): keyword-only, each
annotated and with a default, so that the schema checks a run's ``mechanisms`` mapping against them before any model
exists (`check_mechanisms`), exactly as model and analysis options are checked. After building the model the engine
calls `training_hooks(model, mechanisms)`: every factory looks at the model and returns a `StepHook` for this run, or
None when its mechanism is not in the model (options given for a mechanism the model lacks are an error). The engine
then asks each hook, in registration order:

- ``channels_last``: whether the mechanism is fast in channels-last memory layout (AW-convolution is not);
- ``before_step(progress)``: a schedule over the run (CRAM anneals its mask's sharpness), progress in [0, 1);
- ``watch()``: a context around the training forward only (CRAM records its rectangles there);
- ``extra_loss(x, generator)``: a term added to the loss (CRAM's weighted equivariance penalty), or None.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import AttnlabError, lookup
from ..schema import check_call, show


class StepHook:
    """One mechanism's part in a training run; every method defaults to doing nothing."""

    def __init__(self, channels_last: bool = True):
        self.channels_last = channels_last

    def before_step(self, progress: float) -> None:
        """Called before every optimiser step with the fraction of the run done."""

    def watch(self) -> contextlib.AbstractContextManager:
        """A context around the training forward (not around any forward an extra loss makes)."""
        return contextlib.nullcontext()

    def extra_loss(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """A term added to the training loss of batch ``x``; ``generator`` draws its randomness (seeded per epoch)."""
        return None


HookFactory = Callable[..., StepHook | None]


class _Registered(NamedTuple):
    """A registered factory and the words its errors use for its layers."""

    factory: HookFactory
    label: str


_HOOKS: dict[str, _Registered] = {}


def register_training_hook(name: str, factory: HookFactory, *, label: str | None = None) -> None:
    """Register ``factory(model, **options) -> StepHook | None`` under mechanism ``name``.

    Every option must be keyword-only, annotated and defaulted (the schema checks values against the annotation, and
    a run that names no option gets the defaults). ``label`` names the mechanism's layers in errors (default: ``name``
    in capitals, "CRAM layers").
    """
    params = list(inspect.signature(factory).parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise AttnlabError(f"training hook '{name}': the factory must take the model as its first argument")
    for p in params[1:]:
        if p.kind is not p.KEYWORD_ONLY or p.default is p.empty or p.annotation is p.empty:
            raise AttnlabError(
                f"training hook '{name}': option '{p.name}' must be keyword-only, annotated and have a default"
            )
    _HOOKS[name] = _Registered(factory, label or name.upper())


def list_training_hooks() -> list[str]:
    """Registered mechanism names, sorted."""
    return sorted(_HOOKS)


def check_mechanisms(mechanisms: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{mechanism: {option: value}}`` checked without a model: every name registered (close matches otherwise) and
    every option one its factory declares, of the annotated type. Values come back converted (``a,b`` text to a
    list, an integer to a float)."""
    if not isinstance(mechanisms, Mapping):
        raise AttnlabError(f"mechanisms must be a mapping of mechanism name to options, got {show(mechanisms)}")
    checked = {}
    for name, options in mechanisms.items():
        registered = lookup(_HOOKS, name, "mechanism")
        if not isinstance(options, Mapping):
            raise AttnlabError(f"mechanisms.{name} must be a mapping of option to value, got {show(options)}")
        checked[name] = check_call(registered.factory, options, f"mechanisms.{name}")
    return checked


def training_hooks(model: nn.Module, mechanisms: Mapping[str, Mapping[str, Any]] | None = None) -> list[StepHook]:
    """The hooks of every mechanism in ``model``; ``mechanisms`` gives options by mechanism name (`check_mechanisms`).

    Options for a mechanism whose factory finds none of its layers in ``model`` are an `AttnlabError`: they would
    silently do nothing.
    """
    options = check_mechanisms(mechanisms or {})
    hooks = []
    for name, registered in _HOOKS.items():
        given = options.get(name, {})
        hook = registered.factory(model, **given)
        if hook is None and given:
            raise AttnlabError(
                f"mechanisms.{name}.{next(iter(given))} needs a model with {registered.label} layers; "
                "this model has none"
            )
        if hook is not None:
            hooks.append(hook)
    return hooks


__all__ = ["StepHook", "check_mechanisms", "list_training_hooks", "register_training_hook", "training_hooks"]
