"""The residual block families `convert` knows, and where each one's attention goes.

A family either has its own attention slot (timm's ``se`` / ``attn`` / ``attn_last`` attribute, None or
``nn.Identity`` when empty): the attention goes there, where the family's own attention variants put it. Or it has
none (torchvision's blocks, timm's ConvNeXt): the attention goes at the end of the residual branch, by wrapping its
last module in ``nn.Sequential(module, attention)`` (the branch's last norm), or, for ConvNeXt, whose last norm sits
mid-branch in channels-last layout, its stochastic depth in ``nn.Sequential(attention, module)`` (after the layer
scale). Precedents: mmcv's ResNet ``plugins``
(fixed positions in a block) and zennit's canonizers (per block class); unlike both, a block class not in the table
is refused by name (`find_blocks`). A block that `convert(merge=...)` gave a merged class (`merged_blocks`) stays in
its library class's family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from timm.models import byobnet as timm_byob
from timm.models import convnext as timm_convnext
from timm.models import regnet as timm_regnet
from timm.models import resnet as timm_resnet
from torch import nn
from torchvision.models import convnext as tv_convnext
from torchvision.models import efficientnet as tv_effnet
from torchvision.models import mobilenetv2 as tv_mnv2
from torchvision.models import mobilenetv3 as tv_mnv3
from torchvision.models import regnet as tv_regnet
from torchvision.models import resnet as tv_resnet

from .._compat import timm_efficientnet_blocks as timm_effnet
from ..errors import AttnlabError
from . import resnet as ours
from .gates import attention_sites
from .merged_blocks import MERGED_BASES


def _last_child(block: nn.Module, container: str, inner: str = "") -> str:
    last = list(getattr(block, container)._modules)[-1]
    return f"{container}.{last}{'.' + inner if inner else ''}"


@dataclass(frozen=True)
class Family:
    """Where one block class takes an inserted attention.

    Attributes:
        name: the family, as the docs name it.
        slot: the block's own attention attribute (None or ``nn.Identity`` when empty), or None without one.
        end: without a slot, the path (inside the block) of the residual branch's last module, which gets wrapped.
        before: the attention goes before ``end`` (a stochastic depth: the attention runs first, as in timm's ResNet),
            not after it.
    """

    name: str
    slot: str | None = None
    end: Callable[[nn.Module], str] | None = None
    before: bool = False


FAMILIES: dict[type, Family] = {
    timm_resnet.BasicBlock: Family("timm ResNet/ResNeXt", slot="se"),
    timm_resnet.Bottleneck: Family("timm ResNet/ResNeXt", slot="se"),
    ours.BasicBlock: Family("attnlab ResNet", slot="se"),
    ours.Bottleneck: Family("attnlab ResNet", slot="se"),
    timm_byob.BasicBlock: Family("timm ByobNet", slot="attn_last"),
    timm_byob.BottleneckBlock: Family("timm ByobNet", slot="attn_last"),
    timm_byob.DarkBlock: Family("timm ByobNet", slot="attn_last"),
    timm_byob.EdgeBlock: Family("timm ByobNet", slot="attn_last"),
    timm_byob.RepVggBlock: Family("timm ByobNet", slot="attn"),
    timm_regnet.Bottleneck: Family("timm RegNet", slot="se"),
    timm_regnet.PreBottleneck: Family("timm RegNet", slot="se"),
    timm_effnet.DepthwiseSeparableConv: Family("timm EfficientNet/MobileNet", slot="se"),
    timm_effnet.InvertedResidual: Family("timm EfficientNet/MobileNet", slot="se"),
    timm_effnet.CondConvResidual: Family("timm EfficientNet/MobileNet", slot="se"),
    timm_effnet.UniversalInvertedResidual: Family("timm EfficientNet/MobileNet", slot="se"),
    timm_effnet.EdgeResidual: Family("timm EfficientNet/MobileNet", slot="se"),
    timm_convnext.ConvNeXtBlock: Family("timm ConvNeXt", end=lambda b: "drop_path", before=True),
    tv_resnet.BasicBlock: Family("torchvision ResNet", end=lambda b: "bn2"),
    tv_resnet.Bottleneck: Family("torchvision ResNet", end=lambda b: "bn3"),
    ours.MergedBasicBlock: Family("torchvision ResNet", end=lambda b: "bn2"),
    ours.MergedBottleneck: Family("torchvision ResNet", end=lambda b: "bn3"),
    tv_regnet.ResBottleneckBlock: Family("torchvision RegNet", end=lambda b: "f.c.1"),
    tv_mnv2.InvertedResidual: Family("torchvision MobileNetV2", end=lambda b: _last_child(b, "conv")),
    tv_mnv3.InvertedResidual: Family("torchvision MobileNetV3", end=lambda b: _last_child(b, "block", "1")),
    tv_effnet.MBConv: Family("torchvision EfficientNet", end=lambda b: _last_child(b, "block", "1")),
    tv_effnet.FusedMBConv: Family("torchvision EfficientNet", end=lambda b: _last_child(b, "block", "1")),
    tv_convnext.CNBlock: Family("torchvision ConvNeXt", end=lambda b: "stochastic_depth", before=True),
}

FAMILIES.update({merged: FAMILIES[base] for merged, base in MERGED_BASES.items()})  # convert(merge=...) made them

NOT_BLOCKS: tuple[type, ...] = (timm_byob.Stem, timm_effnet.ConvBnAct)
"""Classes that hold convolutions but are no residual block (a stem, a plain conv–norm–act): passed over."""

LIBRARY_LAYERS = ("torch.nn.", "timm.layers.", "torchvision.ops.", "attnlab.layers.")
"""Modules whose forward is defined here are layers, not blocks (a Sequential subclass keeps Sequential's forward)."""


def _is_layer(module: nn.Module) -> bool:
    return type(module).forward.__module__.startswith(LIBRARY_LAYERS)


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def find_blocks(model: nn.Module, mode: str) -> list[tuple[str, nn.Module, Family]]:
    """Every block of a known family in ``model``, in definition order, as (path, block, family).

    A module holding a convolution that is neither a library layer, an attention, a known block, a known non-block,
    nor a container of known blocks is an unknown block: ``AttnlabError`` naming its class and path (``mode`` names the
    conversion in the message). A network with no known block is refused too.
    """
    attention = {id(s.module) for s in attention_sites(model)[0]}
    found: list[tuple[str, nn.Module, Family]] = []

    def visit(path: str, module: nn.Module) -> None:
        family = FAMILIES.get(type(module))
        if family is not None:
            found.append((path, module, family))
            return
        if id(module) in attention or isinstance(module, NOT_BLOCKS):
            return
        children = [(f"{path}.{n}" if path else n, c) for n, c in module.named_children()]
        holds_blocks = any(type(m) in FAMILIES for m in module.modules())
        if path and not holds_blocks and not _is_layer(module) and _has_conv(module):
            raise AttnlabError(
                f"convert({mode}): {path} is a {type(module).__module__}.{type(module).__name__}, a block class "
                f"convert does not know; known: {', '.join(sorted({f.name for f in FAMILIES.values()}))}"
            )
        for child_path, child in children:
            visit(child_path, child)

    visit("", model)
    if not found:
        raise AttnlabError(f"convert({mode}): {type(model).__name__} has no residual block of a family convert knows")
    return found


__all__ = ["FAMILIES", "Family", "NOT_BLOCKS", "find_blocks"]
