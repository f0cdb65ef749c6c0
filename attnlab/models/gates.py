"""Which modules gate features, and how to read each one's gate: the table behind `capture_attention`.

A *site* is one gate of a network. A class is registered with `register_attention`: either the name of a submodule
whose output is the gate (``gate="gate"``: timm's modules all build ``self.gate``; torchvision's
``SqueezeExcitation`` has ``scale_activation``; timm's legacy SENet ``sigmoid``), hooked so the value is the one the
network multiplies by, or a ``read(module, inputs, output)`` function that recomputes the gate from the module's own
parts (for modules that call ``torch.sigmoid`` inline). Lookup walks the class's MRO, so subclasses inherit their
parent's reading unless registered themselves.

Kinds (the form of the value; the analyses key on it): ``"channel"`` (B×C×1×1), ``"element"`` (a per-channel gate
that varies over positions: B×C×H×W, or B×C×H×1 / B×C×1×W for the axis gates of coordinate attention),
``"spatial"`` (B×1×H×W), ``"rectangle"`` (CRAM: dict of center, size, angle, mask), ``"weight"`` (AW-convolution:
B×C_out×C_in×k×k). A site's *mechanism* names what computes it (the module's class: ``SEModule``, ``CRAM``, ...).

Modules that look like attention (a class name with attn/attention/excite/squeeze/gate/cbam/eca/context/lambda/
nonlocal, or a sigmoid-type child) but have no reading are *unread*: `attention_sites` lists them by path and class
so that nothing is skipped silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import (
    CecaModule,
    EcaModule,
    EffectiveSEModule,
    GatherExcite,
    GlobalContext,
    SEModule,
)
from timm.layers.cbam import ChannelAttn, LightChannelAttn, LightSpatialAttn, SpatialAttn
from timm.layers.coord_attn import CoordAttn, EfficientLocalAttn, SimpleCoordAttn, StripAttn
from timm.layers.squeeze_excite import SqueezeExciteCl
from timm.models.hgnet import EseModule as HGNetEseModule
from timm.models.senet import SEModule as LegacySEModule
from torch import nn
from torchvision.ops import SqueezeExcitation

from .._compat import EfficientNetSqueezeExcite
from ..errors import AttnlabError
from ..layers.merge import MERGES
from ..layers.probe import AttentionProbe

KINDS = ("channel", "element", "spatial", "rectangle", "weight")
Read = Callable[[nn.Module, tuple, Any], Any]


@dataclass(frozen=True)
class Reading:
    """How to read one gate of a module.

    Attributes:
        kind: one of `KINDS`.
        gate: dotted path (inside the module) of the submodule whose output is the gate, or None with ``read``.
        read: ``read(module, inputs, output) -> gate``, called after the module's forward, or None with ``gate``.
        calls: names of the successive calls of ``gate`` in one forward (CoordAttn: ``("h", "w")``); a site per call,
            keyed ``path[name]``. One call (the default) keys the site by the module's path.
    """

    kind: str
    gate: str | None = None
    read: Read | None = None
    calls: tuple[str, ...] = ("",)


Resolver = Callable[[nn.Module], "list[Reading] | str"]
_REGISTRY: dict[type, Resolver] = {}


def register_attention(
    cls: type[nn.Module],
    *,
    kind: str,
    gate: str | None = None,
    read: Read | None = None,
    calls: tuple[str, ...] = ("",),
) -> None:
    """Make `capture_attention` (and every analysis) see the gate of every ``cls`` in a network.

    Give exactly one of ``gate`` (the dotted name of the submodule whose output is the gate, e.g. ``"sigmoid"``) or
    ``read`` (``read(module, inputs, output)`` returning the gate, recomputed from the module's parts).

    Args:
        cls: the module class; its subclasses are read the same way unless registered themselves.
        kind: ``"channel"`` (B×C×1×1; B×1×C and B×1×1×C are reshaped), ``"element"``, ``"spatial"``, ``"rectangle"``
            or ``"weight"`` (see the module docstring).
        gate: submodule to hook (its output is recorded).
        read: function recomputing the gate after the module's forward.
        calls: names of the gate's successive calls in one forward, when the gate submodule runs more than once.
    """
    _check_reading(cls, Reading(kind, gate, read, tuple(calls)))
    reading = Reading(kind, gate, read, tuple(calls))
    _REGISTRY[cls] = lambda module: [reading]


def _register_resolver(cls: type, resolver: Resolver) -> None:
    """A class whose readings depend on how the instance was built (or which has none: a reason string)."""
    _REGISTRY[cls] = resolver


def _check_reading(cls: type, reading: Reading) -> None:
    name = getattr(cls, "__name__", repr(cls))
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise AttnlabError(f"register_attention: {name} is not an nn.Module class")
    if reading.kind not in KINDS:
        raise AttnlabError(f"register_attention({name}): kind must be one of {', '.join(KINDS)}, got {reading.kind!r}")
    if (reading.gate is None) == (reading.read is None):
        raise AttnlabError(f"register_attention({name}): give exactly one of gate= (a submodule name) or read=")
    if not reading.calls or len(set(reading.calls)) != len(reading.calls):
        raise AttnlabError(f"register_attention({name}): calls must be distinct names, got {reading.calls!r}")


def readings_for(module: nn.Module) -> list[Reading] | str | None:
    """The readings of ``module`` (a reason string if its class is known to have no readable gate; an empty list if
    it is known and not an attention; None if unknown)."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls](module)
    return None


@dataclass(frozen=True)
class Site:
    """One gate of a network.

    Attributes:
        path: its key in the capture record: the module's path, plus ``[call]`` for gates run several times.
        kind: the form of the value (`KINDS`).
        mechanism: what computes it (the class name of the attention module).
        module: the module whose output is the gated feature map.
        reading: how it is read.
    """

    path: str
    kind: str
    mechanism: str
    module: nn.Module
    reading: Reading | None  # None: an attnlab AttentionProbe (hooked directly)
    probe: AttentionProbe | None = None


_LOOKS_LIKE = re.compile(r"attn|attention|excit|squeeze|gate|gating|cbam|eca|context|lambda|nonlocal", re.I)
_GATE_ACTIVATIONS = (nn.Sigmoid, nn.Hardsigmoid)


def _looks_like_attention(module: nn.Module) -> bool:
    if not any(True for _ in module.parameters()):  # activations and other parameter-free helpers
        return False
    if _LOOKS_LIKE.search(type(module).__name__):
        return True
    return any(
        isinstance(child, _GATE_ACTIVATIONS) or "sigmoid" in type(child).__name__.lower() for child in module.children()
    )


def attention_sites(model: nn.Module) -> tuple[list[Site], list[str]]:
    """Every readable gate of ``model`` in definition order, and the modules that look like attention but cannot be
    read (``"path (Class: why)"``)."""
    sites: list[Site] = []
    unread: list[tuple[str, str]] = []
    named = list(model.named_modules())
    covered: set[str] = set()
    for path, module in named:
        if isinstance(module, AttentionProbe):
            owner_path = path.rpartition(".")[0] if path.endswith("probe") else path
            owner = model.get_submodule(owner_path)
            sites.append(Site(owner_path, module.kind, type(owner).__name__, owner, None, module))
            covered.add(owner_path)
            continue
        readings = readings_for(module)
        if isinstance(readings, str):
            unread.append((path, f"{type(module).__name__}: {readings}"))
            covered.add(path)
        elif readings is not None:
            for reading in readings:
                for call in reading.calls:
                    key = f"{path}[{call}]" if len(reading.calls) > 1 else path
                    sites.append(Site(key, reading.kind, type(module).__name__, module, reading))
            covered.add(path)
    looks = []
    for path, module in named:
        if not path or path in covered or isinstance(module, AttentionProbe) or not _looks_like_attention(module):
            continue  # the network itself is not one of its attention modules (torchvision's SqueezeNet)
        if not any(_is_within(c, path) or _is_within(path, c) for c in covered):
            looks.append(path)
    # the innermost look-alike names the attention (timm's SelfAttnBlock holds a BottleneckAttn: the latter)
    for path in looks:
        if not any(other != path and _is_within(other, path) for other in looks):
            unread.append((path, f"{type(model.get_submodule(path)).__name__}: no registered reading"))
    return sites, [f"{p or '<model>'} ({why})" for p, why in unread]


def _is_within(path: str, outer: str) -> bool:
    return outer == "" or path == outer or path.startswith(outer + ".")


# --- the attention modules people run (CbamModule, LightCbamModule: read through their .channel and .spatial) -----

for _cls in (
    SEModule,
    EffectiveSEModule,
    SqueezeExciteCl,
    EcaModule,
    CecaModule,
    ChannelAttn,
    EfficientNetSqueezeExcite,
):
    register_attention(_cls, kind="channel", gate="gate")
register_attention(LegacySEModule, kind="channel", gate="sigmoid")  # timm's legacy_seresnet*
register_attention(HGNetEseModule, kind="channel", gate="sigmoid")  # timm's hgnet (v1)
register_attention(SqueezeExcitation, kind="channel", gate="scale_activation")  # torchvision
register_attention(SpatialAttn, kind="spatial", gate="gate")
register_attention(LightSpatialAttn, kind="spatial", gate="gate")
register_attention(CoordAttn, kind="element", gate="gate", calls=("h", "w"))  # x · a_w · a_h
register_attention(EfficientLocalAttn, kind="element", gate="gate", calls=("h", "w"))
register_attention(SimpleCoordAttn, kind="element", gate="gate")  # one gate of a_h + a_w
register_attention(StripAttn, kind="element", gate="gate")


def _light_channel_gate(module: LightChannelAttn, inputs: tuple, output: Any) -> torch.Tensor:
    """LightChannelAttn calls ``F.sigmoid`` inline (its ``gate`` module is built but unused): recomputed."""
    x = inputs[0]
    pooled = 0.5 * x.mean((2, 3), keepdim=True) + 0.5 * x.amax((2, 3), keepdim=True)
    return F.sigmoid(module.fc2(module.act(module.fc1(pooled))))


register_attention(LightChannelAttn, kind="channel", read=_light_channel_gate)


def _global_context(module: GlobalContext) -> list[Reading] | str:
    if module.mlp_scale is None:
        return "context added (fuse_scale=False), no multiplicative gate"
    return [Reading("channel", gate="gate")]


def _gather_excite(module: GatherExcite) -> list[Reading]:
    # global extent without gather convs: one value per channel; otherwise a gate interpolated over positions
    return [Reading("channel" if module.gather is None and module.extent == 0 else "element", gate="gate")]


_register_resolver(GlobalContext, _global_context)
_register_resolver(GatherExcite, _gather_excite)
for _merge in MERGES.values():  # residual merges (FMM's products, some gated): a mechanism of their own, no site
    _register_resolver(_merge, lambda module: [])

__all__ = ["KINDS", "Reading", "Site", "attention_sites", "readings_for", "register_attention"]
