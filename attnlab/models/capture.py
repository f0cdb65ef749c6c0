"""Observe what every attention module attends with, without changing the model's outputs.

attnlab's own modules pass their gate, map, rectangle or weight attention through an `AttentionProbe`; timm's SE, ECA
and CBAM are observed at their gate activations. Forward hooks only read: outputs are bit-identical with or without
capture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from timm.layers import EcaModule, SEModule
from timm.layers.cbam import CbamModule
from torch import nn

from ..layers.probe import AttentionProbe


class AttentionRecord(dict):
    """``{module_path: tensor or dict of tensors}`` from the latest forward; ``kinds[path]`` says what each one is:
    ``"channel"`` (B×C×1×1), ``"spatial"`` (B×1×H×W), ``"rectangle"`` (dict: center, size, angle, mask) or
    ``"weight"`` (B×C_out×C_in×k×k)."""

    def __init__(self):
        super().__init__()
        self.kinds: dict[str, str] = {}


def attention_points(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(path, module to hook, kind)`` for every place where ``model`` computes attention."""
    points = []
    for path, module in model.named_modules():
        if isinstance(module, AttentionProbe):
            points.append((path.removesuffix(".probe"), module, module.kind))
        elif isinstance(module, (SEModule, EcaModule)):
            points.append((path, module.gate, "channel"))
        elif isinstance(module, CbamModule):
            points.append((f"{path}.channel", module.channel.gate, "channel"))
            points.append((f"{path}.spatial", module.spatial.gate, "spatial"))
    return points


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def capture_attention(model: nn.Module, detach: bool = True) -> Iterator[AttentionRecord]:
    """Context manager yielding an `AttentionRecord` that every forward of ``model`` refills.

    Args:
        model: any module containing attnlab or timm attention (attnlab models, timm-built ones, DDP-wrapped).
        detach: store detached tensors (default); ``False`` keeps the autograd graph, for losses on the attention.
    """
    record = AttentionRecord()
    handles = []
    for path, module, kind in attention_points(model):
        record.kinds[path] = kind

        def hook(mod: nn.Module, inputs: tuple, output: Any, path: str = path, kind: str = kind) -> None:
            value = inputs[0] if isinstance(mod, AttentionProbe) else output
            if kind == "channel" and isinstance(value, torch.Tensor) and value.ndim == 3:  # ECA gates are B×1×C
                value = value.reshape(value.shape[0], -1, 1, 1)
            record[path] = value if not detach else _detached(value)

        handles.append(module.register_forward_hook(hook))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
