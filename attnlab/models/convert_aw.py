"""convert(aw=SELECTION): AW-convolution in place of chosen convolutions, keeping their trained weights.

Each chosen ``nn.Conv2d`` becomes `AWConv2d.from_conv` (its weight and bias copied). The AW generator's last layer
starts at zero, so the attention is gate(0) = 1 for the gates ``sigmoid2`` (default), ``softmax_kernel`` and
``linear``, and the network computes what it computed before (up to float rounding); ``gate="sigmoid"`` starts at 0.5
(0.25 factorized), which halves every chosen layer's output, so it is refused here.

Selection: ``"KxK"`` (every dense K×K convolution: ``groups=1``, e.g. ``"3x3"``), a glob over the convolutions'
module paths (``"layer4.*"``, fnmatch), or a predicate ``(path, conv) -> bool``. A convolution subclass with its own
forward (timm's ``Conv2dSame``: padding computed per input) cannot keep its function as an AWConv2d and is refused by
name, as is a selection that matches nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from ..errors import AttnlabError
from ..layers import AWConv2d
from .surgery import set_module

Selection = str | Callable[[str, nn.Conv2d], bool]
_KERNEL = re.compile(r"(\d+)x(\d+)")


def _selector(select: Selection) -> Callable[[str, nn.Conv2d], bool]:
    if callable(select):
        return select
    kernel = _KERNEL.fullmatch(select)
    if kernel:
        size = (int(kernel[1]), int(kernel[2]))
        return lambda path, conv: conv.kernel_size == size and conv.groups == 1
    return lambda path, conv: fnmatchcase(path, select)


def convert_aw(model: nn.Module, select: Selection, aw_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Replace the convolutions of ``model`` that ``select`` chooses by AW-convolutions with their weights, in place
    (module docstring)."""
    kwargs = aw_kwargs or {}
    if kwargs.get("gate") == "sigmoid":
        raise AttnlabError(
            "convert(aw=...): gate 'sigmoid' starts at 0.5 and would halve every converted convolution; "
            "use sigmoid2 (default), softmax_kernel or linear"
        )
    chosen = _selector(select)
    convs = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d) and not isinstance(m, AWConv2d)]
    picked = [(p, m) for p, m in convs if chosen(p, m)]
    if not picked:
        name = type(model).__name__
        raise AttnlabError(f"convert(aw={select!r}): selects none of {name}'s {len(convs)} convolutions")
    for path, conv in picked:
        if type(conv) is not nn.Conv2d:
            raise AttnlabError(
                f"convert(aw={select!r}): {path} is a {type(conv).__name__} (a Conv2d with its own forward); "
                "AW-convolution replaces plain nn.Conv2d only"
            )
    for path, conv in picked:
        aw = AWConv2d.from_conv(conv, **kwargs)
        aw.train(conv.training)
        set_module(model, path, aw)
    return model


__all__ = ["convert_aw"]
