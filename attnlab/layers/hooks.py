"""What a mechanism asks of the training loop, registered by the mechanism itself so that the engine imports none.

After building the model, the engine calls `training_hooks(model, settings)`: every registered factory looks at the
model and the run's settings (a `attnlab.train.TrainConfig`, read by attribute) and returns a `StepHook` for this run,
or None when the mechanism is not in the model. A factory may also refuse settings that need its mechanism (CRAM's
``equivariance`` on a model without CRAM). The engine then asks each hook, in registration order:

- ``channels_last``: whether the mechanism is fast in channels-last memory layout (AW-convolution is not);
- ``before_step(progress)``: a schedule over the run (CRAM anneals its mask's sharpness), progress in [0, 1);
- ``watch()``: a context around the training forward only (CRAM records its rectangles there);
- ``extra_loss(x, generator)``: a term added to the loss (CRAM's weighted equivariance penalty), or None.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


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


HookFactory = Callable[[nn.Module, Any], StepHook | None]
_HOOKS: dict[str, HookFactory] = {}


def register_training_hook(name: str, factory: HookFactory) -> None:
    """Register ``factory(model, settings) -> StepHook | None`` under ``name`` (a mechanism's module does, once)."""
    _HOOKS[name] = factory


def training_hooks(model: nn.Module, settings: Any) -> list[StepHook]:
    """The hooks of every mechanism in ``model`` for a run with ``settings``."""
    return [hook for factory in _HOOKS.values() if (hook := factory(model, settings)) is not None]


__all__ = ["StepHook", "register_training_hook", "training_hooks"]
