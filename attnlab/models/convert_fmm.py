"""convert(merge=NAME): FMMNet's merges in place of the residual additions of ResNet blocks.

Each timm or torchvision ``BasicBlock`` / ``Bottleneck`` becomes the same block computing act(merge(F, S)) instead of
act(F + S), F the residual branch after its last BN (and attention, if any), S the shortcut: a timm block becomes
attnlab's own ResNet block (`models.resnet`, a subclass of timm's), a torchvision block its merged subclass there,
both by changing the instance's class in place (zennit's canonizers patch the forward the same way, per block class),
so every trained weight keeps its key and the merge adds its own (`layers.merge`). A merge that fixes the bias of F's
last BN (``residual_bias``) gets that BN replaced by a `FixedBiasBatchNorm2d` with its weight and statistics. Other
block families (inverted residuals, RegNet, ByobNet, ConvNeXt) are refused by name.

No merge but ``add`` is the identity at init on a trained network: a product of the trained F and S is a different
function (``gate``/``mul_residual`` are the identity only where F = 0, as after ``zero_init_last``), so a converted
pretrained network needs fine-tuning; tests/test_convert.py measures how far its logits move.
"""

from __future__ import annotations

from typing import Any

from timm.models import resnet as timm_resnet
from torch import nn
from torchvision.models import resnet as tv_resnet

from ..errors import AttnlabError
from ..layers import create_merge
from ..layers.merge import FixedBiasBatchNorm2d
from . import resnet as ours
from .blocks import find_blocks

MERGED: dict[type, type] = {
    timm_resnet.BasicBlock: ours.BasicBlock,
    timm_resnet.Bottleneck: ours.Bottleneck,
    ours.BasicBlock: ours.BasicBlock,
    ours.Bottleneck: ours.Bottleneck,
    tv_resnet.BasicBlock: ours.MergedBasicBlock,
    tv_resnet.Bottleneck: ours.MergedBottleneck,
    ours.MergedBasicBlock: ours.MergedBasicBlock,
    ours.MergedBottleneck: ours.MergedBottleneck,
}


def convert_merges(model: nn.Module, merge: str, merge_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Make every ResNet block of ``model`` merge its branches with ``merge`` (a `list_merges` name), in place (module
    docstring)."""
    kwargs = merge_kwargs or {}
    mode = f"merge={merge!r}"
    probe = create_merge(merge, 8, **kwargs)  # a bad name or option fails before any surgery
    blocks = find_blocks(model, mode)
    for path, block, family in blocks:
        if type(block) not in MERGED:
            raise AttnlabError(
                f"convert({mode}): {path} is a {type(block).__name__} ({family.name}); merges go into timm's, "
                "torchvision's and attnlab's ResNet BasicBlock / Bottleneck only"
            )
        if getattr(block, "drop_path", None) is not None and not probe.identity_at_zero:
            raise AttnlabError(
                f"convert({mode}): {path} has stochastic depth, which zeroes F; for merge '{merge}' that zeroes the "
                "whole block (F = 0 is not the identity)"
            )
    for _, block, _ in blocks:
        block.__class__ = MERGED[type(block)]
        holder, attr = block, block.last_bn
        if isinstance(getattr(holder, attr), nn.Sequential):  # wrapped with an inserted attention: (norm, attention)
            holder, attr = getattr(holder, attr), "0"
        last = getattr(holder, attr)
        block.merge = create_merge(
            merge, last.num_features, device=last.weight.device, dtype=last.weight.dtype, **kwargs
        )
        block.merge.train(block.training)
        bias = getattr(block.merge, "residual_bias", None)
        if bias is not None:  # the merge fixes the bias of F's last BN (layers/merge.py)
            fixed = FixedBiasBatchNorm2d.from_bn(last, bias)
            fixed.train(last.training)
            setattr(holder, attr, fixed)
        if isinstance(block, ours.BasicBlock | ours.Bottleneck) and not hasattr(block, "post_act"):
            block.post_act = True
    return model


__all__ = ["MERGED", "convert_merges"]
