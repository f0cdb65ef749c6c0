"""Model registry: every attnlab name is built by `create_model` and, after ``import attnlab``, by `timm.create_model`.

A name is ``[variant_]architecture``. Architectures: CIFAR-style ``resnet20/32/56/110`` (16/32/64 channels) and
``resnet18c`` (64–512), and timm's ImageNet ``resnet18/34/50/101``. Variants (prefixes) set the blocks' switches:
``se_ eca_ cbam_ spatial_ cram_`` (an attention after each block's last BN), ``aw_`` (AW-convolution in conv2),
``aw_se_ aw_cbam_`` (both), ``fmm_`` (residual addition replaced by the default FMM product). Plain ImageNet depths
stay timm's own models; we register only prefixed ImageNet names, which timm does not have (``se_resnet50`` is ours,
``seresnet50`` is timm's).

`create_model` also builds any other name of timm's registry and torchvision's classification models as
``torchvision:NAME`` (`external`), and loads weights files (`weights`).
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import list_models as timm_list_models
from timm.models import resnet as timm_resnet
from torch import nn

from .._compat import timm_resnet_cfg
from ..errors import AttnlabError, unknown_name
from ..layers import create_attn
from ..layers.merge import DEFAULT_FMM_MERGE
from ..schema import check
from .capture import capture_attention
from .convert import convert
from .external import TORCHVISION, check_image_size, external_model, is_external, torchvision_names
from .gates import register_attention
from .options import check_model_options
from .resnet import BasicBlock, Bottleneck, CifarResNet, restrict_attention
from .weights import load_weights


@dataclass(frozen=True)
class Arch:
    block: type[nn.Module]
    layers: tuple[int, ...]
    channels: tuple[int, ...] | None  # None: timm's ImageNet ResNet
    min_size: int  # smallest input side the network accepts

    @property
    def imagenet(self) -> bool:
        return self.channels is None


ARCHS: dict[str, Arch] = {
    "resnet20": Arch(BasicBlock, (3, 3, 3), (16, 32, 64), 8),
    "resnet32": Arch(BasicBlock, (5, 5, 5), (16, 32, 64), 8),
    "resnet56": Arch(BasicBlock, (9, 9, 9), (16, 32, 64), 8),
    "resnet110": Arch(BasicBlock, (18, 18, 18), (16, 32, 64), 8),
    "resnet18c": Arch(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), 8),
    "resnet18": Arch(BasicBlock, (2, 2, 2, 2), None, 8),
    "resnet34": Arch(BasicBlock, (3, 4, 6, 3), None, 8),
    "resnet50": Arch(Bottleneck, (3, 4, 6, 3), None, 8),
    "resnet101": Arch(Bottleneck, (3, 4, 23, 3), None, 8),
}


@dataclass(frozen=True)
class Variant:
    attn: str = "none"
    aw: bool = False
    merge: str = "add"
    doc: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {
    "": Variant(doc="plain ResNet"),
    "se": Variant(attn="se", doc="squeeze-and-excitation channel gate (timm)"),
    "eca": Variant(attn="eca", doc="efficient channel attention (timm)"),
    "cbam": Variant(attn="cbam", doc="CBAM channel + spatial attention (timm)"),
    "spatial": Variant(attn="spatial", doc="position-wise spatial attention"),
    "cram": Variant(attn="cram", doc="convolutional rectangular attention"),
    "aw": Variant(aw=True, doc="AW-convolution in conv2"),
    "aw_se": Variant(attn="se", aw=True, doc="AW-convolution + SE"),
    "aw_cbam": Variant(attn="cbam", aw=True, doc="AW-convolution + CBAM"),
    "fmm": Variant(merge=DEFAULT_FMM_MERGE, doc="residual addition replaced by feature-map multiplication"),
}


def _split_name(name: str) -> tuple[str, str]:
    """``"aw_se_resnet20"`` → ``("aw_se", "resnet20")``."""
    variant, _, arch = name.rpartition("_")
    return variant, arch


def _model_names() -> list[str]:
    names = []
    for variant in VARIANTS:
        for arch, spec in ARCHS.items():
            if variant or not spec.imagenet:  # plain ImageNet depths are timm's own models
                names.append(f"{variant}_{arch}" if variant else arch)
    return names


MODEL_NAMES: tuple[str, ...] = tuple(_model_names())


def list_models(pattern: str = "*") -> list[str]:
    """attnlab model names matching a shell-style ``pattern``, in a stable order."""
    return [n for n in MODEL_NAMES if fnmatch.fnmatch(n, pattern)]


class UnknownModelOption(AttnlabError, TypeError):
    """An option neither the network nor timm's builder knows: a one-line `AttnlabError` for our CLI, and the
    ``TypeError`` timm's model contract (and its tests) expect from a constructor given an unknown argument."""


def _check_input(model, args: tuple[torch.Tensor]) -> None:
    """Forward pre-hook: a clear error for inputs the network cannot take, instead of one from deep inside torch.

    Written so that TorchScript compiles it too (``torch.jit.script`` scripts a module's hooks with it)."""
    if not torch.jit.is_scripting():
        _check_is_tensor(args)
    x = args[0]
    if x.dim() != 4:
        raise AttnlabError(f"model input must be B×C×H×W, got shape {_shape(x)}")
    if x.shape[1] != model.in_chans:
        raise AttnlabError(f"model expects {model.in_chans} input channels, got {x.shape[1]} (set in_chans)")
    if min(x.shape[2], x.shape[3]) < model.min_input_size:
        raise AttnlabError(
            f"input {x.shape[2]}×{x.shape[3]} is too small: this network needs at least "
            f"{model.min_input_size}×{model.min_input_size}"
        )
    if not x.is_floating_point():
        raise AttnlabError(f"model input must be floating point, got {x.dtype} (normalise images first)")
    if model.check_finite and not bool(torch.isfinite(x).all()):
        raise AttnlabError("model input contains NaN or Inf values")


def _check_is_tensor(args: tuple) -> None:
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor):
        raise AttnlabError(f"model input must be a tensor, got {type(x).__name__}")


def _shape(x: torch.Tensor) -> str:
    return "(" + ", ".join([str(n) for n in x.shape]) + ")"


def _construct(
    model_cls: type[nn.Module], where: str | Sequence[int], guard: tuple[int, bool] | None, **kwargs
) -> nn.Module:
    """The network itself, with its attention restricted to ``where`` and, unless ``guard`` is None (feature
    extraction), the input check: timm's builder calls this before it wraps the model for ``features_only``."""
    model = model_cls(**kwargs)
    restrict_attention(model, where)
    if guard is not None:
        model.min_input_size, model.check_finite = guard
        model.register_forward_pre_hook(_check_input)
    return model


def _build(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build model ``name``; keyword arguments override the variant (``attn_layer``, ``merge``, ``aw``, ...)."""
    if pretrained:
        raise AttnlabError(
            f"{name}: attnlab has no weights of its own; attnlab.create_model({name!r}, pretrained=True) starts an "
            "ImageNet variant from its base network's weights"
        )
    if name not in MODEL_NAMES:
        raise unknown_name("model", name, MODEL_NAMES)
    variant_name, arch_name = _split_name(name) if name not in ARCHS else ("", name)
    variant, arch = VARIANTS[variant_name], ARCHS[arch_name]
    kwargs = check_model_options(name, kwargs, timm_resnet.ResNet if arch.imagenet else CifarResNet)
    attn = kwargs.pop("attn_layer", variant.attn)
    attn_kwargs = kwargs.pop("attn_kwargs", None) or {}
    where = kwargs.pop("attn_where", "all")
    check_finite = bool(kwargs.pop("check_finite", False))
    block_args = {
        "merge": kwargs.pop("merge", variant.merge),
        "merge_args": kwargs.pop("merge_args", None),
        "post_act": kwargs.pop("post_act", True),
        # the full AW generator costs C_out·C_in·k² outputs per layer: +142% params on resnet50, so the ImageNet
        # depths default to the factorised generator (+1%); pass aw={"generator": "full"} for the literal reading
        "aw": kwargs.pop("aw", {"generator": "factorized"} if variant.aw and arch.imagenet else variant.aw),
        **kwargs.pop("block_args", {}),
    }
    if attn != "none":
        create_attn(attn, 8, **attn_kwargs)  # fail early, with a clear message, on a bad name or argument
        block_args["attn_layer"] = functools.partial(create_attn, attn, **attn_kwargs)
    kwargs.setdefault("num_classes", ARCH_DEFAULT_CLASSES[arch.imagenet])
    model_cls = timm_resnet.ResNet if arch.imagenet else CifarResNet
    _check_options(name, kwargs, model_cls)
    # feature extraction: one level per stage after the stem's (all of them by default), timm's options on top
    feature_cfg = {"out_indices": tuple(range(len(arch.layers) + 1)), **(kwargs.pop("feature_cfg", None) or {})}
    feature_cfg.update({k: kwargs.pop(k) for k in FEATURE_CFG_OPTIONS & set(kwargs)})
    if not arch.imagenet:
        kwargs.setdefault("channels", arch.channels)
    guard = None if kwargs.get("features_only") else (arch.min_size, check_finite)
    constructor = functools.partial(_construct, model_cls, where, guard)
    return build_model_with_cfg(
        constructor,
        name,
        False,
        feature_cfg=feature_cfg,
        block=arch.block,
        layers=arch.layers,
        block_args=block_args,
        **kwargs,
    )


ARCH_DEFAULT_CLASSES = {False: 10, True: 1000}
EXTERNAL_CONVERSIONS = ("aw", "aw_args", "merge", "merge_args")
"""Options that convert a timm or torchvision network (`attnlab.convert`'s ``aw=`` / ``merge=`` and their options);
for attnlab's own names ``aw``, ``merge`` and ``merge_args`` keep their meaning as options of the blocks it builds (an
AW switch, the merge the blocks are built with), which ends in the same network."""
FEATURE_CFG_OPTIONS = frozenset({"output_fmt", "flatten_sequential"})
"""Feature-extraction options that belong in timm's ``feature_cfg`` (accepted as plain keywords too)."""
FEATURE_OPTIONS = frozenset({"features_only", "out_indices", "feature_cls", "feature_cfg", *FEATURE_CFG_OPTIONS})
"""Options timm's builder takes for feature extraction (``features_only=True``) rather than passing on."""


def _check_options(name: str, kwargs: dict[str, Any], model_cls: type) -> None:
    """Refuse options neither the network nor timm's builder knows (with close matches), as a ``TypeError`` like
    any constructor given an unknown argument."""
    own = {*inspect.signature(model_cls).parameters, *FEATURE_OPTIONS} - {"block", "layers", "block_args"}
    builder = inspect.signature(build_model_with_cfg).parameters
    for key in kwargs:
        if key not in own and key not in builder:
            error = unknown_name(
                f"{name} option",
                key,
                [
                    *own,
                    "attn_layer",
                    "attn_kwargs",
                    "attn_where",
                    "merge",
                    "merge_args",
                    "post_act",
                    "aw",
                    "check_finite",
                ],
            )
            raise UnknownModelOption(str(error))


def create_model(
    name: str,
    num_classes: int = 10,
    in_chans: int = 3,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    image_size: int | tuple[int, int] | None = None,
    attention: str | None = None,
    attention_args: dict[str, Any] | None = None,
    insert: str | None = None,
    insert_args: dict[str, Any] | None = None,
    **kwargs,
) -> nn.Module:
    """Build a network by name: attnlab's own, any of timm's registry, or torchvision's as ``torchvision:NAME``.

    Args:
        name: an attnlab name from `list_models` (``"se_resnet20"``, ``"fmm_resnet56"``, ``"aw_resnet50"``), a timm
            name (``"efficientnet_b0"``, ``"seresnet18"``, ``"regnety_002"``, a ``.tag`` allowed) or
            ``"torchvision:NAME"`` (``"torchvision:mobilenet_v3_small"``).
        num_classes: classifier outputs.
        in_chans: input channels (timm's and torchvision's input convolutions are adapted as timm does).
        pretrained: the network's own downloaded weights (timm's or torchvision's; an attnlab ImageNet variant gets
            its base network's). Offline this is one clear error: pass ``weights`` instead.
        weights: a weights file (`attnlab.models.weights.load_weights`: safetensors or a state dict).
        image_size: check, by one dry forward, that the network takes images of this size.
        attention: swap every attention of the built network for this registered one (`attnlab.convert`;
            ``"none"`` removes them), after its weights are loaded: ``weights`` / ``pretrained`` are the original
            network's. The entry grammar's ``efficientnet_b0[attention=eca]``.
        attention_args: that attention's options (``efficientnet_b0[attention=eca,attention_args.k_size=5]``).
        insert: put this registered attention into every residual block (`attnlab.convert`'s ``insert``; identity at
            initialisation), after the swap; ``insert_args`` its options (``torchvision:resnet18[insert=se]``).
        **kwargs: for attnlab names, ``attn_layer`` (an attention name), ``attn_kwargs`` (dict for it),
            ``attn_where`` (``"all"``, ``"last"`` or stage numbers), ``merge`` (a merge name), ``merge_args`` (dict of
            its options), ``post_act`` (False: no activation after the merge), ``aw`` (bool, or a dict of AWConv2d
            options), ``drop_rate``, ``drop_path_rate``, ``zero_init_last``, ``block_args``, ``check_finite``
            (refuse inputs holding NaN/Inf: one reduction per forward, off by default); for the others, their
            builder's own arguments, and `EXTERNAL_CONVERSIONS`: ``aw`` (`attnlab.convert`'s AW selection: ``"3x3"`` or
            a glob), ``aw_args``, ``merge`` (a merge name in place of every residual addition), ``merge_args``.
    """
    conversions: dict[str, Any] = {}
    if name in MODEL_NAMES:
        if "aw_args" in kwargs:
            raise AttnlabError(f"{name}: aw_args converts a timm or torchvision network; attnlab's own take aw={{...}}")
        model = _build(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
        if pretrained:
            _load_base_pretrained(name, model, num_classes, in_chans)
    else:
        check_model_name(name)
        conversions = {key: kwargs.pop(key) for key in EXTERNAL_CONVERSIONS if key in kwargs}
        model = external_model(name, num_classes, in_chans, pretrained=pretrained, **kwargs)
    if weights is not None:
        load_weights(model, weights)
    side = None if image_size is None else image_size if isinstance(image_size, int) else min(image_size)
    sized = {"image_size": side} if side else {}
    modes = {"attention": attention, "insert": insert, **conversions}
    modes.update(attention_args=attention_args, insert_args=insert_args)
    for mode, args, shown in (
        ("attention", "attention_args", "NAME"),
        ("insert", "insert_args", "NAME"),
        ("aw", "aw_args", "3x3|GLOB"),
        ("merge", "merge_args", "NAME"),
    ):
        try:
            check(mode, modes.get(mode), str | None)
            check(args, modes.get(args), dict[str, Any] | None)
        except AttnlabError as e:
            raise AttnlabError(f"{name}: {e}") from None
        if modes.get(args) is not None and modes.get(mode) is None:
            raise AttnlabError(f"{name}: {args} needs {mode}={shown} (what they configure)")
    if attention is not None:  # first, with its own options: convert's attn_kwargs serve one attention per call
        convert(model, attention=attention, attn_kwargs=attention_args, **sized)
    if insert is not None or conversions.get("aw") is not None or conversions.get("merge") is not None:
        convert(
            model,
            insert=insert,
            attn_kwargs=insert_args,
            aw=conversions.get("aw"),
            aw_kwargs=conversions.get("aw_args"),
            merge=conversions.get("merge"),
            merge_kwargs=conversions.get("merge_args"),
            **sized,
        )
    if image_size is not None:
        check_image_size(model, image_size, name)
    return model


def check_model_name(name: str) -> None:
    """Refuse, with close matches, a name that is neither attnlab's, nor timm's, nor ``torchvision:NAME``."""
    if name.startswith(TORCHVISION) and name not in torchvision_names():
        tv_names = [n.removeprefix(TORCHVISION) for n in torchvision_names()]
        raise unknown_name("torchvision model", name.removeprefix(TORCHVISION), tv_names)
    if name not in MODEL_NAMES and not is_external(name):
        raise unknown_name("model", name, [*MODEL_NAMES, *timm_list_models(), *torchvision_names()])


def _load_base_pretrained(name: str, model: nn.Module, num_classes: int, in_chans: int) -> None:
    """An attnlab ImageNet variant starts from its base network's downloaded weights (``se_resnet50``: timm's
    ``resnet50``); CIFAR names have none."""
    variant, arch = _split_name(name) if name not in ARCHS else ("", name)
    if not ARCHS[arch].imagenet:
        raise AttnlabError(f"{name}: attnlab's CIFAR networks have no pretrained weights (pass a weights file)")
    base = external_model(arch, num_classes, in_chans, pretrained=True)
    load_weights(model, base.state_dict())


def _default_cfg(arch: Arch) -> dict[str, Any]:
    if arch.imagenet:
        return timm_resnet_cfg(url="", license=None)
    return dict(
        url="",
        num_classes=10,
        input_size=(3, 32, 32),
        pool_size=(32 // 2 ** (len(arch.layers) - 1),) * 2,  # every stage after the first halves the 32 px input
        crop_pct=1.0,
        interpolation="bilinear",
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        first_conv="conv1",
        classifier="fc",
    )


default_cfgs = generate_default_cfgs(
    {n: _default_cfg(ARCHS[_split_name(n)[1] if n not in ARCHS else n]) for n in MODEL_NAMES}
)


def _register_with_timm() -> None:
    """Make every attnlab name an entrypoint of timm's registry (``timm.create_model("cram_resnet20")``)."""
    module = sys.modules[__name__]
    for name in MODEL_NAMES:

        def entrypoint(pretrained: bool = False, _name: str = name, **kwargs) -> nn.Module:
            kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
            return _build(_name, pretrained=pretrained, **kwargs)

        entrypoint.__name__ = entrypoint.__qualname__ = name
        entrypoint.__module__ = module.__name__
        entrypoint.__doc__ = f"{name}: attnlab model (see attnlab.create_model)."
        register_model(entrypoint)


_register_with_timm()

__all__ = [
    "ARCHS",
    "VARIANTS",
    "capture_attention",
    "check_image_size",
    "convert",
    "check_model_name",
    "create_model",
    "list_models",
    "load_weights",
    "register_attention",
]
