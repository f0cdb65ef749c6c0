"""Every private torch and timm API attnlab leans on, in one place, each with why it is needed.

A torch or timm upgrade that moves one of them fails here, at import, and in ``tests/test_compat.py``, instead of deep
inside a layer or a training run. ``pyproject.toml`` bounds torch, torchvision and timm to the versions the tests have
run against; raise a bound only after the suite passes on the new version.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

# timm's EfficientNet / MobileNet block classes live in a private module only: `convert` knows their attention slot
# and subclasses them for the FMM merges, and capture_attention reads the gate of their SqueezeExcite
from timm.models import _efficientnet_blocks as timm_efficientnet_blocks
from timm.models import resnet as _timm_resnet
from timm.models._features import feature_take_indices  # CifarResNet resolves ``indices`` exactly as timm's models do
from torch import nn
from torch.nn.modules import module as _module

EfficientNetSqueezeExcite = timm_efficientnet_blocks.SqueezeExcite

# the default pretrained config of timm's ResNets, so that our models' configs carry the same fields
timm_resnet_cfg: Callable[..., dict[str, Any]] = _timm_resnet._cfg

# AW's fused backward takes the softmax gate's derivative from the saved output alone (no logits kept)
softmax_backward_data: Callable[..., torch.Tensor] = torch._softmax_backward_data

# AW's fused backward: input and weight gradients of the batch-folded grouped convolution without an autograd graph
convolution_backward: Callable[..., tuple] = torch.ops.aten.convolution_backward


def dynamo_config() -> Any:
    """``torch._dynamo.config`` (imported on first use: dynamo is slow to import): the compile settings
    `attnlab.train.compiling` scopes to a compiled model's calls with its ``patch``."""
    import torch._dynamo

    return torch._dynamo.config


def dynamo_config_patch(**changes: Any) -> contextlib.AbstractContextManager:
    """A context in which dynamo's config has ``changes`` (restored on exit)."""
    return dynamo_config().patch(**changes)


# nn.Module.compile stores the compiled call here; reading and clearing it is the only way to tell whether a module
# is compiled and to run it eagerly for a while (a FLOP count, the eager fall-back) without rebuilding it
_COMPILED_CALL = "_compiled_call_impl"


def compiled_call(model: nn.Module) -> Callable | None:
    """The compiled call `nn.Module.compile` installed on ``model`` (None when it is not compiled)."""
    return getattr(model, _COMPILED_CALL, None)


def set_compiled_call(model: nn.Module, call: Callable | None) -> None:
    """Install ``call`` as ``model``'s compiled call (None: calls go to the eager module)."""
    setattr(model, _COMPILED_CALL, call)


def conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of ``conv`` as its forward applies it, ``padding="same"`` resolved: torch
    computes it in a private attribute, and AW-convolution must refuse an uneven one (its folded batch pads evenly)."""
    return tuple(conv._reversed_padding_repeated_twice)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether a forward (pre-)hook would see ``module``'s output: one of its own or a process-wide one
    (``nn.modules.module.register_module_forward_hook``). torch offers no public way to ask, and an `AttentionProbe`
    must know whether anyone observes it."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
    )


__all__ = [
    "EfficientNetSqueezeExcite",
    "compiled_call",
    "conv_padding",
    "convolution_backward",
    "dynamo_config",
    "dynamo_config_patch",
    "feature_take_indices",
    "has_forward_hooks",
    "set_compiled_call",
    "softmax_backward_data",
    "timm_efficientnet_blocks",
    "timm_resnet_cfg",
]
