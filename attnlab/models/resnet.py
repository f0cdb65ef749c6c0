"""ResNet blocks with pluggable attention, merge and AW-convolution, and the CIFAR-style ResNet.

The blocks are timm's `BasicBlock` / `Bottleneck` with three extra switches, so the same blocks serve our CIFAR-style
ResNets and timm's ImageNet `ResNet` (through its ``block`` and ``block_args`` arguments):

- ``attn_layer``: an attention module after the block's last BN and before the merge (timm's ``se`` slot);
- ``merge`` (and ``merge_args``, its options): how the residual branch F meets the shortcut S — ``"add"`` (ResNet)
  or an FMMNet product (`attnlab.layers.merge`); the block returns act(merge(F, S));
- ``aw``: AW-convolution (`attnlab.layers.awconv`) in place of the 3×3 ``conv2`` — the only 3×3 conv of a basic
  block's second half and the middle conv of a bottleneck;
- ``post_act``: apply the activation after the merge (default) or return merge(F, S) as it is.

`MergedBasicBlock` / `MergedBottleneck` are torchvision's blocks with a merge, what ``attnlab.convert(merge=...)``
makes of them.

`CifarResNet` follows He et al. 2016 (arXiv 1512.03385, Sec. 4.2): a 3×3 stem at full resolution, no max-pool, stages
of 16/32/64 channels (resnet20/32/56/110: 6n+2 layers) or 64–512 (resnet18c). Shortcuts that change shape use a 1×1
conv + BN (option B) rather than the paper's zero-padding (option A): same depth, +0.4% params on resnet20.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import create_classifier, get_device_dtype
from timm.models import checkpoint_seq
from timm.models import resnet as timm_resnet
from torch import nn
from torchvision.models import resnet as tv_resnet

from .._compat import feature_take_indices
from ..errors import AttnlabError
from ..layers import AWConv2d, create_merge
from ..layers.merge import FixedBiasBatchNorm2d


class _MergeAwMixin:
    """What our blocks add to timm's: a merge module, optionally an AW conv2, and optionally no activation after the
    merge (``post_act=False``, as in pre-activation ResNets)."""

    last_bn = "bn2"  # the BN that ends the residual branch F

    def __init__(
        self,
        inplanes: int,
        planes: int,
        *args,
        merge: str = "add",
        merge_args: dict | None = None,
        aw: bool | dict = False,
        post_act: bool = True,
        **kwargs,
    ):
        if not isinstance(post_act, bool):
            raise AttnlabError(f"post_act must be true or false, got {post_act!r}")
        super().__init__(inplanes, planes, *args, **kwargs)
        outplanes = planes * self.expansion
        if aw:
            self.conv2 = AWConv2d.from_conv(self.conv2, **(aw if isinstance(aw, dict) else {}))
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.merge = create_merge(merge, outplanes, **dd, **(merge_args or {}))
        if getattr(self.merge, "residual_bias", None) is not None:  # the merge fixes the bias of F's last BN
            bn = getattr(self, self.last_bn)
            setattr(self, self.last_bn, FixedBiasBatchNorm2d.from_bn(bn, self.merge.residual_bias))
        self.post_act = post_act
        if self.drop_path is not None and not self.merge.identity_at_zero:
            # stochastic depth zeroes F; for this merge that zeroes the whole block instead of skipping it
            raise AttnlabError(f"drop_path_rate > 0 does not suit merge '{merge}' (F = 0 is not the identity)")

    def zero_init_last(self) -> None:
        if self.merge.zero_init_residual:
            super().zero_init_last()

    def _merge(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """Attention, stochastic depth, then merge(F, S): the common end of both blocks (the caller activates it
        unless ``post_act`` is off; an activation module cannot be an argument in TorchScript)."""
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        return self.merge(x, shortcut)


class BasicBlock(_MergeAwMixin, timm_resnet.BasicBlock):
    """timm's basic block (two 3×3 convs) with ``merge`` and ``aw`` switches; other args as timm's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self._merge(self.bn2(self.conv2(x)), shortcut)
        return self.act2(x) if self.post_act else x


class Bottleneck(_MergeAwMixin, timm_resnet.Bottleneck):
    """timm's bottleneck (1×1, 3×3, 1×1) with ``merge`` and ``aw`` (on the middle 3×3) switches."""

    last_bn = "bn3"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self._merge(self.bn3(self.conv3(x)), shortcut)
        return self.act3(x) if self.post_act else x


class MergedBasicBlock(tv_resnet.BasicBlock):
    """torchvision's basic block returning relu(merge(F, S)); built by `attnlab.convert(merge=...)` from one."""

    last_bn = "bn2"
    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.merge(self.bn2(self.conv2(out)), shortcut))


class MergedBottleneck(tv_resnet.Bottleneck):
    """torchvision's bottleneck returning relu(merge(F, S)); built by `attnlab.convert(merge=...)` from one."""

    last_bn = "bn3"
    merge: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.merge(self.bn3(self.conv3(out)), shortcut))


MAX_STAGES = 4  # layer1..layer4, as timm's ResNet; TorchScript needs the stages as named attributes


class CifarResNet(nn.Module):
    """ResNet for small images: 3×3 stem, no max-pool, one stage (``layer1``, ``layer2``, ...) per entry of
    ``channels``; timm's ResNet interface (``forward_features``, ``forward_head``, ``forward_intermediates``,
    ``feature_info``, ``reset_classifier``, gradient checkpointing), scriptable.

    Args:
        block: block class (`BasicBlock` or `Bottleneck`).
        layers: blocks per stage (1 to 4 stages).
        channels: width of each stage (the stem has the first width).
        num_classes: classifier outputs (0: no classifier, the forward returns pooled features).
        in_chans: input channels.
        global_pool: timm's pooling type (``"avg"``, ``"max"``, ``"avgmax"``, ``"catavgmax"``; ``""``: none).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        zero_init_last: zero the last BN of each residual branch where the block's merge allows it.
        block_args: extra keyword arguments for every block (``attn_layer``, ``merge``, ``aw``, ...).
        device, dtype: where and in which dtype to create the parameters.
    """

    def __init__(
        self,
        block: type[nn.Module],
        layers: Sequence[int],
        channels: Sequence[int] = (16, 32, 64),
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = True,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        block_args: dict | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not 1 <= len(layers) <= MAX_STAGES or len(channels) != len(layers):
            raise AttnlabError(
                f"CifarResNet needs 1 to {MAX_STAGES} stages with one width each, got {layers}, {channels}"
            )
        dd = {"device": device, "dtype": dtype}
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.grad_checkpointing = False
        stem = channels[0]
        self.conv1 = nn.Conv2d(in_chans, stem, 3, padding=1, bias=False, **dd)
        self.bn1 = norm_layer(stem, **dd)
        self.act1 = act_layer(inplace=True)
        stages, feature_info = timm_resnet.make_blocks(
            (block,) * len(layers),
            tuple(channels),
            tuple(layers),
            stem,
            drop_path_rate=drop_path_rate,
            act_layer=act_layer,
            norm_layer=norm_layer,
            **(block_args or {}),
            **dd,
        )
        for name, stage in stages:
            self.add_module(name, stage)
        for i in range(len(stages), MAX_STAGES):
            setattr(self, f"layer{i + 1}", None)
        self.stage_names = [name for name, _ in stages]
        # make_blocks assumes an ImageNet stem that already downsampled 4×; ours keeps full resolution.
        self.feature_info = [dict(num_chs=stem, reduction=1, module="act1")]
        self.feature_info += [dict(info, reduction=2**i) for i, info in enumerate(feature_info)]
        self.num_features = channels[-1] * block.expansion
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.init_weights(zero_init_last)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return dict(stem=r"^conv1|bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> str | nn.Module:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none); ``global_pool`` None keeps the current pooling."""
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool_type, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    @torch.jit.ignore
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, name) for name in self.stage_names]

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Final features and the feature maps of the stem (index 0) and stages (1, 2, ...), as timm's ResNet.

        Args:
            x: input batch.
            indices: the last n maps if an int, all if None, else the listed indices.
            norm: unused (no final norm), accepted for timm's interface.
            stop_early: skip the stages after the last map asked for.
            output_fmt: ``"NCHW"`` only.
            intermediates_only: return only the list of maps.
        """
        if output_fmt != "NCHW":
            raise AttnlabError(f"forward_intermediates: output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates = []
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages()[:max_index] if stop_early else self.stages()
        for i, stage in enumerate(stages, start=1):
            x = checkpoint_seq(stage, x) if self.grad_checkpointing else stage(x)
            if i in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last map in ``indices`` (and the head); returns the indices kept."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for name in self.stage_names[max_index:]:
            setattr(self, name, nn.Sequential())  # empty, so forward and checkpoint_seq still iterate it
        if max_index < len(self.stage_names):
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or max_index < len(self.stage_names):
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages(), x, flatten=True)
        x = self.layer1(x)  # spelt out (no getattr by name) so that TorchScript compiles it
        if self.layer2 is not None:
            x = self.layer2(x)
        if self.layer3 is not None:
            x = self.layer3(x)
        if self.layer4 is not None:
            x = self.layer4(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def stages_of(model: nn.Module) -> list[nn.Sequential]:
    """The residual stages (``layer1``, ``layer2``, ...) of a CIFAR or timm ResNet, in order."""
    names = getattr(model, "stage_names", None) or [f"layer{i}" for i in range(1, 5) if hasattr(model, f"layer{i}")]
    return [getattr(model, n) for n in names]


def restrict_attention(model: nn.Module, where: str | Sequence[int]) -> None:
    """Keep the blocks' attention only where asked, removing it elsewhere.

    Args:
        model: a ResNet built from our blocks.
        where: ``"all"`` (every block), ``"last"`` (the last block of each stage), or stage numbers counted from 1
            (a sequence, or a comma-separated string like ``"2,3"``).
    """
    stages = stages_of(model)
    if where == "all":
        return
    if isinstance(where, int):
        where = [where]
    if where == "last":
        keep = {(s, len(stage) - 1) for s, stage in enumerate(stages)}
    else:
        try:
            numbers = [int(n) for n in (where.split(",") if isinstance(where, str) else where)]
        except ValueError:
            raise AttnlabError(f"attn_where must be 'all', 'last' or stage numbers like '2,3', got {where!r}") from None
        bad = [n for n in numbers if not 1 <= n <= len(stages)]
        if bad:
            raise AttnlabError(f"attn_where: stage {bad[0]} does not exist (stages are 1..{len(stages)})")
        keep = {(n - 1, b) for n in numbers for b in range(len(stages[n - 1]))}
    for s, stage in enumerate(stages):
        for b, block in enumerate(stage):
            if (s, b) not in keep:
                block.se = None
