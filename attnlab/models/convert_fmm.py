"""convert(merge=NAME): FMMNet's merges in place of the residual additions of every block family `convert` knows.

Each block with a skip becomes the same block computing merge(F, S) instead of F + S (and act(merge(F, S)) where the
family activates after its addition: ResNet, RegNet, ByobNet), F the residual branch after its last norm, attention,
layer scale and stochastic depth, S the shortcut (`merged_blocks` has one merged subclass per library block class;
timm's ResNet blocks become attnlab's own, `models.resnet`). The instance's class changes in place (zennit's
canonizers patch the forward the same way, per block class), so every trained weight keeps its key and the merge adds
its own (`layers.merge`). Blocks without a skip (a stride or a channel change with no projection: most inverted
residuals that start a stage) have no addition and are left as they are. A merge that fixes the bias of F's last BN
(``residual_bias``) gets that BN replaced by a `FixedBiasBatchNorm2d` with its weight and statistics; a family whose F
ends otherwise (ConvNeXt's layer scale, a pre-activation block's convolution) refuses it. RepVGG blocks are refused
(`merged_blocks.REFUSED` says why), as is a block with stochastic depth under a merge for which F = 0 is not the
identity.

No merge but ``add`` is the identity on a trained network: a product of the trained F and S is a different function
(``gate``/``mul_residual`` are the identity only where F = 0, as after ``zero_init_last``), so a converted pretrained
network needs training; tests/test_convert*.py measure how far its logits move (docs/guides/your-network.md).
"""

from __future__ import annotations

from typing import Any

from timm.layers import DropPath
from torch import nn
from torchvision.ops import StochasticDepth

from ..errors import AttnlabError
from ..layers import create_merge
from ..layers.merge import AddMerge, FixedBiasBatchNorm2d
from . import resnet as ours
from .blocks import find_blocks
from .merged_blocks import MERGED, REFUSED
from .surgery import input_channels


def _stochastic_depth(block: nn.Module, attr: str | None) -> bool:
    """Whether the block's stochastic depth (which may wrap an inserted attention) can drop F in training."""
    module = getattr(block, attr, None) if attr else None
    if module is None:
        return False
    return any(
        (isinstance(m, DropPath) and m.drop_prob > 0) or (isinstance(m, StochasticDepth) and m.p > 0)
        for m in module.modules()
    )


def _plain_bn(module: nn.Module) -> bool:
    """A BatchNorm2d that only normalises (timm's BatchNormAct2d with no activation or drop counts)."""
    return isinstance(module, nn.BatchNorm2d) and all(
        type(getattr(module, a, nn.Identity())) is nn.Identity for a in ("act", "drop")
    )


def convert_merges(
    model: nn.Module, merge: str, merge_kwargs: dict[str, Any] | None = None, image_size: int = 64
) -> nn.Module:
    """Make every residual block of ``model`` with a skip merge its branches with ``merge`` (a `list_merges` name), in
    place (module docstring); ``image_size`` is the side of the dry forward that measures each merge's channels."""
    kwargs = merge_kwargs or {}
    mode = f"merge={merge!r}"
    probe = create_merge(merge, 8, **kwargs)  # a bad name or option fails before any surgery
    fixes_bias = getattr(probe, "residual_bias", None) is not None
    chosen: list[tuple[str, nn.Module, Any, str | None]] = []
    for path, block, family in find_blocks(model, mode):
        if type(block) in REFUSED:
            raise AttnlabError(
                f"convert({mode}): {path} is a {type(block).__name__} ({family.name}); no merge goes into it: "
                f"{REFUSED[type(block)]}"
            )
        merged = MERGED[type(block)]
        if not merged.skip(block):
            continue
        if _stochastic_depth(block, merged.drop) and not probe.identity_at_zero:
            raise AttnlabError(
                f"convert({mode}): {path} has stochastic depth, which zeroes F; for merge '{merge}' that zeroes the "
                "whole block (F = 0 is not the identity); build the network with drop_path_rate=0 "
                "(torchvision: stochastic_depth_prob=0)"
            )
        last = merged.last_norm(block)
        if fixes_bias:
            holder = block.get_submodule(last) if last else None
            if isinstance(holder, nn.Sequential):  # wrapped with an inserted attention: (norm, attention)
                last, holder = f"{last}.0", holder[0]
            if holder is None or not _plain_bn(holder):
                raise AttnlabError(
                    f"convert({mode}): {path} is a {type(block).__name__} ({family.name}), whose residual branch "
                    "does not end in a BatchNorm; residual_bias fixes that norm's bias"
                )
        chosen.append((path, block, merged, last))
    if not chosen:
        raise AttnlabError(f"convert({mode}): {type(model).__name__} has no residual block with a skip to merge")
    for _, block, merged, _ in chosen:  # an addition first, to measure F's channels in one dry forward
        block.__class__ = merged.cls
        block.merge = AddMerge(0)
        if isinstance(block, ours.BasicBlock | ours.Bottleneck) and not hasattr(block, "post_act"):
            block.post_act = True
    channels = input_channels(model, [f"{path}.merge" for path, *_ in chosen], image_size, mode)
    for path, block, _, last in chosen:
        reference = next(block.parameters())
        block.merge = create_merge(
            merge, channels[f"{path}.merge"], device=reference.device, dtype=reference.dtype, **kwargs
        )
        block.merge.train(block.training)
        if fixes_bias:  # the merge fixes the bias of F's last BN (layers/merge.py)
            norm = block.get_submodule(last)
            fixed = FixedBiasBatchNorm2d.from_bn(norm, block.merge.residual_bias)
            fixed.train(norm.training)
            parent, _, attr = last.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, attr, fixed)
    return model


__all__ = ["convert_merges"]
