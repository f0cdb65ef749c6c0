"""Any attnlab model or timm network as a detection backbone: timm's feature extraction under torchvision's
`BackboneWithFPN`.

timm builds the model with ``features_only=True`` and says, through its ``feature_info``, which module ends each
level and with how many channels at which stride; torchvision's `BackboneWithFPN` takes those modules as its body
(its `IntermediateLayerGetter` runs the same children in the same order as timm's feature wrapper) and puts a
feature pyramid on top. The result is what torchvision's `FasterRCNN` and `RetinaNet` take, with the module paths of
torchvision's own ``resnet_fpn_backbone`` (``body.layer1.0...``), so `attnlab.capture_attention` finds every attention
module inside a detector. ``trainable_layers`` and ``frozen_bn`` behave as in ``resnet_fpn_backbone``; since attnlab
has no pretrained weights they matter when the backbone starts from a trained classifier (``weights``).

A timm network other than attnlab's (``efficientnet_b0``, ``regnety_002``, ``convnext_atto``) is built whole by
`attnlab.create_model` (so ``attention=NAME`` converts it, ``pretrained`` / ``weights_file`` load its weights) and
wrapped in timm's `FeatureDictNet`, with ``flatten_sequential=True`` where a feature level sits inside a Sequential
(``blocks.2`` becomes the top-level ``blocks_2``, as `BackboneWithFPN` needs). ``trainable_layers`` counts ``layer*``
stages only, so it is for ResNet-style names. torchvision's classifiers (``torchvision:NAME``) are refused: they
declare no feature levels (no ``feature_info``) for the pyramid to take; torchvision's own detection builders cover
them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
from timm.layers import freeze_batch_norm_2d
from timm.models import FeatureDictNet
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from ..errors import AttnlabError
from ..models import MODEL_NAMES, check_model_name, create_model
from ..models.external import TORCHVISION
from ..train.checkpoint import load_state_strict, load_tensors
from ..train.classify import notices_as_lines


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


def check_backbone_name(name: str) -> None:
    """Refuse, in one line, a name that is no network (close matches) or one that cannot be a backbone."""
    check_model_name(name)
    if name.startswith(TORCHVISION):
        raise AttnlabError(
            f"{name}: torchvision's classifiers declare no feature levels for a detection backbone; use a timm or "
            "attnlab name (e.g. mobilenetv3_large_100, efficientnet_b0, resnet18)"
        )


def _load_whole(body: nn.Module, name: str, in_chans: int, pretrained: bool, weights_file, model_kwargs: dict) -> None:
    """The whole classifier ``name`` with its weights (downloaded or from a file), copied into the feature body."""
    with notices_as_lines():
        whole = create_model(name, in_chans=in_chans, pretrained=pretrained, weights=weights_file, **model_kwargs)
    wanted = body.state_dict()
    load_state_strict(body, {k: v for k, v in whole.state_dict().items() if k in wanted}, name)


def backbone(
    name: str,
    *,
    in_chans: int = 3,
    out_indices: Sequence[int] | None = None,
    out_channels: int = 256,
    trainable_layers: int | None = None,
    frozen_bn: bool = False,
    weights: str | Path | None = None,
    pretrained: bool = False,
    weights_file: str | Path | None = None,
    extra_blocks: ExtraFPNBlock | None = None,
    **model_kwargs,
) -> BackboneWithFPN:
    """A `BackboneWithFPN` over attnlab model ``name`` (its output keys are ``"0"``, ``"1"``, ... and ``"pool"``).

    Args:
        name: an attnlab model name (`attnlab.list_models`), e.g. ``"aw_se_resnet20"``, ``"se_resnet50"``, or a
            timm network (``"efficientnet_b0"``); not ``torchvision:NAME`` (see the module doc).
        in_chans: input channels.
        out_indices: timm feature levels fed to the pyramid (0 is the stem); default every stage (1, 2, ...).
        out_channels: channels of every pyramid level.
        trainable_layers: how many of [stem, layer1, ..., layerN] stay trainable, counted from the last, as in
            torchvision's ``resnet_fpn_backbone``; None (default) trains all.
        frozen_bn: replace every BatchNorm of the backbone by a frozen one (fixed statistics and affine).
        weights: start from a trained attnlab classifier of the same name (run folder or ``model.safetensors``);
            its classifier head is left out.
        pretrained: start from the network's own downloaded weights (as `attnlab.create_model`).
        weights_file: start from a weights file of the classifier network (`attnlab.models.load_weights`).
        extra_blocks: torchvision's extra pyramid block (default `LastLevelMaxPool`, the ``"pool"`` level).
        **model_kwargs: model options (``attn_layer``, ``merge``, ``aw``, ...), as for `attnlab.create_model`.

    The returned module also carries ``feature_info``: timm's entry (``num_chs``, ``reduction``, ``module``) for
    each pyramid input level, in order.
    """
    check_backbone_name(name)
    if name in MODEL_NAMES:
        features = timm.create_model(name, features_only=True, feature_cls="dict", in_chans=in_chans, **model_kwargs)
        if pretrained or weights_file is not None:
            _load_whole(features, name, in_chans, pretrained, weights_file, model_kwargs)
    else:
        with notices_as_lines():
            whole = create_model(name, in_chans=in_chans, pretrained=pretrained, weights=weights_file, **model_kwargs)
        if not hasattr(whole, "feature_info"):
            raise AttnlabError(f"{name}: the network declares no feature levels (timm's feature_info)")
        every = tuple(range(len(whole.feature_info)))
        nested = any("." in level["module"] for level in whole.feature_info)  # a level inside a Sequential
        features = FeatureDictNet(whole, out_indices=every, flatten_sequential=nested)
    levels = _levels(features.feature_info, out_indices)
    if weights is not None:
        _load_classifier(features, name, weights)
    chosen = [features.feature_info.get_dicts()[i] for i in levels]
    return_layers = {level["module"].replace(".", "_"): str(i) for i, level in enumerate(chosen)}
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
