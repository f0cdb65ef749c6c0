"""Networks from elsewhere: any name of timm's registry, and torchvision's classification models as
``torchvision:NAME``, built with attnlab's ``num_classes`` / ``in_chans`` conventions.

timm adapts both itself (its ``num_classes`` and ``in_chans`` arguments; pretrained input convolutions through
``adapt_input_conv``). torchvision's builders take ``num_classes`` only without weights, so with weights the network
is built as trained and its classifier (the last ``nn.Linear``) replaced; ``in_chans`` replaces the first
convolution by one whose weight is timm's ``adapt_input_conv`` of the original (summed for one channel, repeated
and rescaled for more), as timm does for its own pretrained weights.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torchvision
from timm.models import adapt_input_conv
from torch import nn

from ..errors import AttnlabError, unknown_name

TORCHVISION = "torchvision:"


def torchvision_names() -> list[str]:
    """torchvision's classification models, as ``torchvision:NAME``."""
    return [TORCHVISION + n for n in torchvision.models.list_models(module=torchvision.models)]


def is_external(name: str) -> bool:
    """Whether ``name`` is a timm registry name (a ``.tag`` allowed) or a torchvision classification model."""
    if name.startswith(TORCHVISION):
        return name in torchvision_names()
    return timm.is_model(name)


def _download_error(name: str, error: Exception) -> AttnlabError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return AttnlabError(
        f"{name}: pretrained weights could not be downloaded ({first}); offline, pass a weights file instead "
        "(weights=FILE; the CLI's --weights FILE)"
    )


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The network's input convolution: timm's ``pretrained_cfg['first_conv']`` where it names one, else the first
    ``nn.Conv2d`` in definition order."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("first_conv")
    if isinstance(name, str):
        module = model.get_submodule(name) if name in dict(model.named_modules()) else None
        if isinstance(module, nn.Conv2d):
            return name, module
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def classifier(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The network's classifier: timm's ``pretrained_cfg['classifier']`` where it names a module, else the last
    ``nn.Linear`` in definition order."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    modules = dict(model.named_modules())
    for name in [names] if isinstance(names, str) else list(names or ()):
        if name in modules and any(True for _ in modules[name].parameters()):
            return name, modules[name]
    linear = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    return linear[-1] if linear else None


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def adapt_in_chans(model: nn.Module, in_chans: int) -> None:
    """Replace the input convolution by one taking ``in_chans`` channels, its weight adapted as timm does."""
    found = first_conv(model)
    if found is None:
        raise AttnlabError(f"{type(model).__name__}: no input convolution to adapt to {in_chans} channels")
    path, conv = found
    if conv.in_channels == in_chans:
        return
    if conv.groups != 1:
        raise AttnlabError(f"{type(model).__name__}: its input convolution {path} is grouped; cannot adapt in_chans")
    new = nn.Conv2d(
        in_chans,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(in_chans, conv.weight.detach(), base_chans=conv.in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    _replace(model, path, new)


def replace_classifier(model: nn.Module, num_classes: int) -> bool:
    """A freshly initialised classifier of ``num_classes`` outputs in place of a different-sized one; True if
    replaced."""
    found = classifier(model)
    if found is None or not isinstance(found[1], nn.Linear):
        raise AttnlabError(f"{type(model).__name__}: no linear classifier to resize to {num_classes} classes")
    path, head = found
    if head.out_features == num_classes:
        return False
    new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    _replace(model, path, new.to(head.weight.device, head.weight.dtype))
    return True


def _torchvision(name: str, num_classes: int, in_chans: int, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    tv_name = name.removeprefix(TORCHVISION)
    if name not in torchvision_names():
        raise unknown_name("torchvision model", tv_name, [n.removeprefix(TORCHVISION) for n in torchvision_names()])
    try:
        if pretrained:
            try:
                model = torchvision.models.get_model(tv_name, weights="DEFAULT", **kwargs)
            except Exception as e:  # no network, a proxy, a truncated download: each one line
                raise _download_error(name, e) from None
            replace_classifier(model, num_classes)
        else:
            model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise AttnlabError(f"{name}: {e}") from None
    adapt_in_chans(model, in_chans)
    return model


def _conventions(model: nn.Module, num_classes: int, in_chans: int) -> nn.Module:
    for attr, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if not hasattr(model, attr):
            setattr(model, attr, value)
    return model


def external_model(name: str, num_classes: int, in_chans: int, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a timm registry network or ``torchvision:NAME`` (see the module docstring). Like attnlab's own, the
    network carries ``num_classes`` and ``in_chans`` attributes."""
    if name.startswith(TORCHVISION):
        return _conventions(_torchvision(name, num_classes, in_chans, pretrained, kwargs), num_classes, in_chans)
    if not timm.is_model(name):
        raise unknown_name("model", name, timm.list_models())
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
        return _conventions(model, num_classes, in_chans)
    except TypeError as e:
        raise AttnlabError(f"{name}: {e}") from None
    except Exception as e:
        if pretrained:  # no network (a hub or urllib error of some kind), a proxy, a truncated download
            raise _download_error(name, e) from None
        raise


def check_image_size(model: nn.Module, image_size: int | tuple[int, int], name: str = "") -> None:
    """One dry forward at ``image_size`` (batch of 1, eval mode, no gradients): a network that cannot take that size
    says so in one line, instead of failing deep inside the first training step."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    conv = first_conv(model)
    channels = conv[1].in_channels if conv is not None else 3
    param = next(model.parameters(), None)
    x = torch.zeros(1, channels, h, w, device=param.device if param is not None else None)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except Exception as e:  # any failure of the dry forward is the answer (an attnlab input check's too); why first
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AttnlabError(f"{name or type(model).__name__} cannot take {h}×{w} images: {first}") from None
    finally:
        model.train(training)


__all__ = [
    "TORCHVISION",
    "adapt_in_chans",
    "check_image_size",
    "classifier",
    "external_model",
    "first_conv",
    "is_external",
    "replace_classifier",
    "torchvision_names",
]
