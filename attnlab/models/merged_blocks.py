"""The residual block families of timm and torchvision with a merge in place of their residual addition.

Each class here is one library block class with the same forward, except that ``F + S`` becomes ``self.merge(F, S)``
(F: the residual branch after its attention, layer scale and stochastic depth; S: the shortcut, projected where the
block projects it); an activation after the addition stays after the merge, and a block with none (inverted
residuals, ConvNeXt, pre-activation RegNet) returns merge(F, S) as it is. `convert(merge=...)` changes an instance's
class to its merged subclass in place, so every trained weight keeps its key. attnlab's and torchvision's ResNet blocks
have theirs in `models.resnet`; `MERGED` lists every family, with where its skip, last norm and stochastic depth are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
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
from . import resnet as ours

# --- timm EfficientNet / MobileNet: no activation after the addition ---------------------------------------------


class MergedDepthwiseSeparableConv(timm_effnet.DepthwiseSeparableConv):
    """timm's depthwise-separable block (with a skip) returning merge(F, S)."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.conv_s2d is not None:
            x = self.bn_s2d(self.conv_s2d(x))
        x = self.se(self.aa(self.bn1(self.conv_dw(x))))
        x = self.bn2(self.conv_pw(x))
        return self.merge(self.drop_path(x), shortcut)


class MergedInvertedResidual(timm_effnet.InvertedResidual):
    """timm's inverted residual (MBConv, with a skip) returning merge(F, S)."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.conv_s2d is not None:
            x = self.bn_s2d(self.conv_s2d(x))
        x = self.bn1(self.conv_pw(x))
        x = self.se(self.aa(self.bn2(self.conv_dw(x))))
        x = self.bn3(self.conv_pwl(x))
        return self.merge(self.drop_path(x), shortcut)


class MergedCondConvResidual(timm_effnet.CondConvResidual):
    """timm's CondConv inverted residual (with a skip) returning merge(F, S)."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        routing = torch.sigmoid(self.routing_fn(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)))
        x = self.bn1(self.conv_pw(x, routing))
        x = self.se(self.bn2(self.conv_dw(x, routing)))
        x = self.bn3(self.conv_pwl(x, routing))
        return self.merge(self.drop_path(x), shortcut)


class MergedEdgeResidual(timm_effnet.EdgeResidual):
    """timm's edge residual (FusedMBConv, with a skip) returning merge(F, S)."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.se(self.aa(self.bn1(self.conv_exp(x))))
        x = self.bn2(self.conv_pwl(x))
        return self.merge(self.drop_path(x), shortcut)


class MergedUniversalInvertedResidual(timm_effnet.UniversalInvertedResidual):
    """timm's universal inverted residual (MobileNetV4, with a skip) returning merge(F, S)."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.se(self.dw_mid(self.pw_exp(self.dw_start(x))))
        x = self.layer_scale(self.dw_end(self.pw_proj(x)))
        return self.merge(self.drop_path(x), shortcut)


# --- timm RegNet, ByobNet: activation after the addition (except the pre-activation bottleneck) ----------------------


class MergedRegNetBottleneck(timm_regnet.Bottleneck):
    """timm's RegNet bottleneck returning act(merge(F, S))."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.act3(self.merge(self.drop_path(x), self.downsample(shortcut)))


class MergedRegNetPreBottleneck(timm_regnet.PreBottleneck):
    """timm's pre-activation RegNet bottleneck returning merge(F, S), S taken after the first norm as timm's."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        shortcut = x
        x = self.conv2(self.norm2(self.conv1(x)))
        x = self.conv3(self.norm3(self.se(x)))
        return self.merge(self.drop_path(x), self.downsample(shortcut))


class MergedByobBasicBlock(timm_byob.BasicBlock):
    """timm's ByobNet basic block (with a shortcut) returning act(merge(F, S))."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.attn_last(self.conv2_kxk(self.attn(self.conv1_kxk(x))))
        return self.act(self.merge(self.drop_path(x), self.shortcut(shortcut)))


class MergedByobBottleneckBlock(timm_byob.BottleneckBlock):
    """timm's ByobNet bottleneck (with a shortcut) returning act(merge(F, S))."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.attn(self.conv2b_kxk(self.conv2_kxk(self.conv1_1x1(x))))
        x = self.attn_last(self.conv3_1x1(x))
        return self.act(self.merge(self.drop_path(x), self.shortcut(shortcut)))


class MergedByobDarkBlock(timm_byob.DarkBlock):
    """timm's ByobNet dark block (with a shortcut) returning act(merge(F, S))."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.attn_last(self.conv2_kxk(self.attn(self.conv1_1x1(x))))
        return self.act(self.merge(self.drop_path(x), self.shortcut(shortcut)))


class MergedByobEdgeBlock(timm_byob.EdgeBlock):
    """timm's ByobNet edge block (with a shortcut) returning act(merge(F, S))."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.attn_last(self.conv2_1x1(self.attn(self.conv1_kxk(x))))
        return self.act(self.merge(self.drop_path(x), self.shortcut(shortcut)))


# --- ConvNeXt: F ends in a layer scale, no activation after the addition ---------------------------------------------


class MergedConvNeXtBlock(timm_convnext.ConvNeXtBlock):
    """timm's ConvNeXt block returning merge(F, S)."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.merge(self.drop_path(x), self.shortcut(shortcut))


# --- torchvision -----------------------------------------------------------------------------------------------------


class MergedMobileNetV2InvertedResidual(tv_mnv2.InvertedResidual):
    """torchvision's MobileNetV2 inverted residual (with a skip) returning merge(F, S)."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(self.conv(x), x)


class MergedMobileNetV3InvertedResidual(tv_mnv3.InvertedResidual):
    """torchvision's MobileNetV3 inverted residual (with a skip) returning merge(F, S)."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(self.block(x), x)


class MergedMBConv(tv_effnet.MBConv):
    """torchvision's EfficientNet MBConv (with a skip) returning merge(F, S)."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(self.stochastic_depth(self.block(x)), x)


class MergedFusedMBConv(tv_effnet.FusedMBConv):
    """torchvision's EfficientNetV2 FusedMBConv (with a skip) returning merge(F, S)."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(self.stochastic_depth(self.block(x)), x)


class MergedResBottleneckBlock(tv_regnet.ResBottleneckBlock):
    """torchvision's RegNet bottleneck returning act(merge(F, S))."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(self.merge(self.f(x), shortcut))


class MergedCNBlock(tv_convnext.CNBlock):
    """torchvision's ConvNeXt block returning merge(F, S)."""

    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(self.stochastic_depth(self.layer_scale * self.block(x)), x)


# --- the table -------------------------------------------------------------------------------------------------------


def _last(container: str, inner: str = "") -> Callable[[nn.Module], str]:
    def path(block: nn.Module) -> str:
        last = list(getattr(block, container)._modules)[-1]
        return f"{container}.{last}{'.' + inner if inner else ''}"

    return path


def _fixed(path: str) -> Callable[[nn.Module], str]:
    return lambda block: path


def _uir_last_norm(block: nn.Module) -> str | None:
    if type(block.layer_scale) is not nn.Identity:
        return None
    return "dw_end.bn" if type(block.dw_end) is not nn.Identity else "pw_proj.bn"


def _always(block: nn.Module) -> bool:
    return True


@dataclass(frozen=True)
class Merged:
    """How one block class takes a merge.

    Attributes:
        cls: its merged subclass (this module, or `models.resnet` for the ResNets).
        skip: whether a block adds a shortcut at all (none where the stride or the channels change): blocks without
            one have no addition to replace and are left as they are.
        last_norm: the path (inside the block) of the norm that ends F, for merges that fix its bias; None where F
            ends otherwise (a layer scale, a convolution).
        drop: the block's stochastic depth attribute, if any.
    """

    cls: type
    skip: Callable[[nn.Module], bool] = _always
    last_norm: Callable[[nn.Module], str | None] = lambda block: None
    drop: str | None = None


def _has_skip(block: nn.Module) -> bool:
    return bool(block.has_skip)


def _use_res(block: nn.Module) -> bool:
    return bool(block.use_res_connect)


def _byob_skip(block: nn.Module) -> bool:
    return block.shortcut is not None


def _regnet_skip(block: nn.Module) -> bool:
    return block.downsample is not None


_RESNET = {
    timm_resnet.BasicBlock: Merged(ours.BasicBlock, last_norm=_fixed("bn2"), drop="drop_path"),
    timm_resnet.Bottleneck: Merged(ours.Bottleneck, last_norm=_fixed("bn3"), drop="drop_path"),
    ours.BasicBlock: Merged(ours.BasicBlock, last_norm=_fixed("bn2"), drop="drop_path"),
    ours.Bottleneck: Merged(ours.Bottleneck, last_norm=_fixed("bn3"), drop="drop_path"),
    tv_resnet.BasicBlock: Merged(ours.MergedBasicBlock, last_norm=_fixed("bn2")),
    tv_resnet.Bottleneck: Merged(ours.MergedBottleneck, last_norm=_fixed("bn3")),
}
_OTHERS = {
    timm_effnet.DepthwiseSeparableConv: Merged(MergedDepthwiseSeparableConv, _has_skip, _fixed("bn2"), "drop_path"),
    timm_effnet.InvertedResidual: Merged(MergedInvertedResidual, _has_skip, _fixed("bn3"), "drop_path"),
    timm_effnet.CondConvResidual: Merged(MergedCondConvResidual, _has_skip, _fixed("bn3"), "drop_path"),
    timm_effnet.EdgeResidual: Merged(MergedEdgeResidual, _has_skip, _fixed("bn2"), "drop_path"),
    timm_effnet.UniversalInvertedResidual: Merged(
        MergedUniversalInvertedResidual, _has_skip, _uir_last_norm, "drop_path"
    ),
    timm_regnet.Bottleneck: Merged(MergedRegNetBottleneck, _regnet_skip, _fixed("conv3.bn"), "drop_path"),
    timm_regnet.PreBottleneck: Merged(MergedRegNetPreBottleneck, _regnet_skip, drop="drop_path"),
    timm_byob.BasicBlock: Merged(MergedByobBasicBlock, _byob_skip, _fixed("conv2_kxk.bn"), "drop_path"),
    timm_byob.BottleneckBlock: Merged(MergedByobBottleneckBlock, _byob_skip, _fixed("conv3_1x1.bn"), "drop_path"),
    timm_byob.DarkBlock: Merged(MergedByobDarkBlock, _byob_skip, _fixed("conv2_kxk.bn"), "drop_path"),
    timm_byob.EdgeBlock: Merged(MergedByobEdgeBlock, _byob_skip, _fixed("conv2_1x1.bn"), "drop_path"),
    timm_convnext.ConvNeXtBlock: Merged(MergedConvNeXtBlock, drop="drop_path"),
    tv_mnv2.InvertedResidual: Merged(MergedMobileNetV2InvertedResidual, _use_res, _last("conv")),
    tv_mnv3.InvertedResidual: Merged(MergedMobileNetV3InvertedResidual, _use_res, _last("block", "1")),
    tv_effnet.MBConv: Merged(MergedMBConv, _use_res, _last("block", "1"), "stochastic_depth"),
    tv_effnet.FusedMBConv: Merged(MergedFusedMBConv, _use_res, _last("block", "1"), "stochastic_depth"),
    tv_regnet.ResBottleneckBlock: Merged(MergedResBottleneckBlock, last_norm=_fixed("f.c.1")),
    tv_convnext.CNBlock: Merged(MergedCNBlock, drop="stochastic_depth"),
}
MERGED: dict[type, Merged] = {
    **_RESNET,
    **_OTHERS,
    **{m.cls: m for m in _OTHERS.values()},  # a merged block takes another merge
    ours.MergedBasicBlock: _RESNET[tv_resnet.BasicBlock],
    ours.MergedBottleneck: _RESNET[tv_resnet.Bottleneck],
}
"""Every block class a merge goes into (and every merged class, which takes another), with its `Merged`."""

MERGED_BASES: dict[type, type] = {m.cls: base for base, m in _OTHERS.items()}
"""Each merged class of this module and the library class it merges (`blocks.FAMILIES` names its family)."""

REFUSED: dict[type, str] = {
    timm_byob.RepVggBlock: (
        "its shortcut is a BN added to two convolution branches so that reparameterize() folds all three into one "
        "convolution; a product does not fold"
    ),
}
"""Known block classes no merge goes into, and why."""


__all__ = ["MERGED", "MERGED_BASES", "REFUSED", "Merged"]
