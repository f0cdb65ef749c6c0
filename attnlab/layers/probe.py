"""A no-op module through which attention layers pass what they attend with, so it can be observed.

`capture_attention` (in `attnlab.models.capture`) hooks every `AttentionProbe`; an attention module calls
``self.probe(value)`` on its gate, map, rectangle dict or weight-attention tensor and gets the value back unchanged.
A probe scripts (``torch.jit.script``), but its value has no static type, so scripted layers skip it
(``if not torch.jit.is_scripting()``): hooks on scripted modules are not what `capture_attention` observes anyway.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .._compat import has_forward_hooks


class AttentionProbe(nn.Module):
    """Identity on any value (tensor or dict of tensors); exists only to be hooked.

    Args:
        kind: what passes through: ``"channel"`` (B×C×1×1 gate), ``"spatial"`` (B×1×H×W map),
            ``"rectangle"`` (dict with center, size, angle, mask) or ``"weight"`` (B×C_out×C_in×k×k).
    """

    __jit_unused_properties__ = ["observed"]  # TorchScript compiles properties otherwise; this one reads hooks

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, value: Any) -> Any:
        return value

    @property
    def observed(self) -> bool:
        """Whether a forward hook (its own or a global one) would see the value: a layer may skip building a value
        that exists only for observers when nobody looks."""
        return has_forward_hooks(self)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
