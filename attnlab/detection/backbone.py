"""Any attnlab model as a detection backbone: timm's feature extraction under torchvision's `BackboneWithFPN`.

timm builds the model with ``features_only=True`` and says, through its ``feature_info``, which module ends each
level and with how many channels at which stride; torchvision's `BackboneWithFPN` takes those modules as its body
(its `IntermediateLayerGetter` runs the same children in the same order as timm's feature wrapper) and puts a
feature pyramid on top. The result is what torchvision's `FasterRCNN` and `RetinaNet` take, with the module paths of
torchvision's own ``resnet_fpn_backbone`` (``body.layer1.0...``), so `attnlab.capture_attention` finds every attention
module inside a detector. ``trainable_layers`` and ``frozen_bn`` behave as in ``resnet_fpn_backbone``; since attnlab
has no pretrained weights they matter when the backbone starts from a trained classifier (``weights``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
from timm.layers import freeze_batch_norm_2d
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from ..errors import AttnlabError, unknown_name
from ..models import list_models
from ..train.checkpoint import load_state_strict, load_tensors


def _stem_and_stages(body: nn.Module) -> list[list[str]]:
    """Names of the body's children grouped as [stem children, layer1, layer2, ...]."""
    names = [name for name, _ in body.named_children()]
    stages = [[name] for name in names if name.startswith("layer")]
    return [[name for name in names if not name.startswith("layer")], *stages]


def freeze_layers(body: nn.Module, trainable_layers: int | None) -> None:
    """Stop gradients to all but the last ``trainable_layers`` of [stem, layer1, ...] (None: train them all)."""
    groups = _stem_and_stages(body)
    if trainable_layers is None:
        return
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int):
        raise AttnlabError(f"trainable_layers must be an integer, got {trainable_layers!r}")
    if not 0 <= trainable_layers <= len(groups):
        raise AttnlabError(f"trainable_layers must be in [0, {len(groups)}] for this backbone, got {trainable_layers}")
    frozen = {name for group in groups[: len(groups) - trainable_layers] for name in group}
    for name, child in body.named_children():
        if name in frozen:
            child.requires_grad_(False)


def _load_classifier(body: nn.Module, name: str, weights: str | Path) -> None:
    """Copy a trained classifier's weights (a run folder or its ``model.safetensors``) into ``body``."""
    from ..train.load import _weights_path, read_metadata

    path = _weights_path(Path(weights))
    trained = read_metadata(path).get("attnlab_model")
    if trained != name:
        raise AttnlabError(f"{path}: holds a {trained or 'non-attnlab'} model, not {name}")
    wanted = body.state_dict()
    tensors = {key: value for key, value in load_tensors(path).items() if key in wanted}
    load_state_strict(body, tensors, path)


def backbone(
    name: str,
    *,
    in_chans: int = 3,
    out_indices: Sequence[int] | None = None,
    out_channels: int = 256,
    trainable_layers: int | None = None,
    frozen_bn: bool = False,
    weights: str | Path | None = None,
    extra_blocks: ExtraFPNBlock | None = None,
    **model_kwargs,
) -> BackboneWithFPN:
    """A `BackboneWithFPN` over attnlab model ``name`` (its output keys are ``"0"``, ``"1"``, ... and ``"pool"``).

    Args:
        name: an attnlab model name (`attnlab.list_models`), e.g. ``"aw_se_resnet20"``, ``"se_resnet50"``.
        in_chans: input channels.
        out_indices: timm feature levels fed to the pyramid (0 is the stem); default every stage (1, 2, ...).
        out_channels: channels of every pyramid level.
        trainable_layers: how many of [stem, layer1, ..., layerN] stay trainable, counted from the last, as in
            torchvision's ``resnet_fpn_backbone``; None (default) trains all.
        frozen_bn: replace every BatchNorm of the backbone by a frozen one (fixed statistics and affine).
        weights: start from a trained attnlab classifier of the same name (run folder or ``model.safetensors``);
            its classifier head is left out.
        extra_blocks: torchvision's extra pyramid block (default `LastLevelMaxPool`, the ``"pool"`` level).
        **model_kwargs: model options (``attn_layer``, ``merge``, ``aw``, ...), as for `attnlab.create_model`.

    The returned module also carries ``feature_info``: timm's entry (``num_chs``, ``reduction``, ``module``) for
    each pyramid input level, in order.
    """
    if name not in list_models():
        raise unknown_name("model", name, list_models())
    features = timm.create_model(name, features_only=True, feature_cls="dict", in_chans=in_chans, **model_kwargs)
    levels = _levels(features.feature_info, out_indices)
    if weights is not None:
        _load_classifier(features, name, weights)
    chosen = [features.feature_info.get_dicts()[i] for i in levels]
    return_layers = {level["module"]: str(i) for i, level in enumerate(chosen)}
    channels = [level["num_chs"] for level in chosen]
    fpn = BackboneWithFPN(features, return_layers, channels, out_channels, extra_blocks=extra_blocks)
    freeze_layers(fpn.body, trainable_layers)
    if frozen_bn:
        fpn.body = freeze_batch_norm_2d(fpn.body)
    fpn.feature_info = chosen
    return fpn


def _levels(info, out_indices: Sequence[int] | None) -> list[int]:
    """The feature levels to use: ``out_indices`` checked against the model's, or every stage (all but the stem)."""
    if out_indices is None:
        return list(range(1, len(info)))
    levels = list(out_indices)
    if (
        not levels
        or levels != sorted(set(levels))
        or not all(isinstance(i, int) and 0 <= i < len(info) for i in levels)
    ):
        raise AttnlabError(f"out_indices must be increasing levels in [0, {len(info)}), got {out_indices!r}")
    return levels
