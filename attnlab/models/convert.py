"""Model surgery: swap every attention of a network for another registered one (EfficientNet's SE → ECA, CBAM,
CRAM or none), in place.

The attentions swapped are the channel, element, spatial and rectangle sites `capture_attention` sees (a CBAM's two
parts are one module; a coordinate attention's two gates are one module); AW-convolutions are convolutions, not
swapped. Each replacement is ``create_attn(NAME, C, **attn_kwargs)`` for the C channels the old module received,
measured by one dry forward, on the old module's device and dtype. A swap does not preserve a pretrained network's
function: the new attention starts from its own initialisation and the network needs fine-tuning.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers.cbam import CbamModule, LightCbamModule
from torch import nn

from ..errors import AttnlabError
from ..layers import create_attn
from .external import first_conv
from .gates import attention_sites

COMPOSITES = (CbamModule, LightCbamModule)  # attentions whose sites are their parts: swapped whole
SWAPPED_KINDS = ("channel", "element", "spatial", "rectangle")


def _swappable(model: nn.Module) -> list[str]:
    """Paths of the attention modules to replace, in definition order, each once."""
    paths = {id(m): p for p, m in model.named_modules()}
    parents = {id(c): m for m in model.modules() for c in m.children()}
    found: dict[str, None] = {}
    for site in attention_sites(model)[0]:
        if site.kind not in SWAPPED_KINDS:
            continue
        module = site.module
        parent = parents.get(id(module))
        if isinstance(parent, COMPOSITES):
            module = parent
        if id(module) not in paths or module is model:
            raise AttnlabError(f"{site.path}: the attention is the model itself; nothing to swap it inside")
        found[paths[id(module)]] = None
    return list(found)


def _input_channels(model: nn.Module, paths: list[str], image_size: int) -> dict[str, int]:
    conv = first_conv(model)
    in_chans = conv[1].in_channels if conv is not None else 3
    param = next(model.parameters())
    seen: dict[str, int] = {}

    def record(path: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.setdefault(path, args[0].shape[1])

        return hook

    handles = [model.get_submodule(p).register_forward_pre_hook(record(p)) for p in paths]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_chans, image_size, image_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    missing = [p for p in paths if p not in seen]
    if missing:
        raise AttnlabError(f"convert: {', '.join(missing[:3])} did not run in a forward pass; cannot size them")
    return seen


def convert(
    model: nn.Module, *, attention: str, attn_kwargs: dict[str, Any] | None = None, image_size: int = 64
) -> nn.Module:
    """Replace every attention of ``model`` by attention ``attention`` (a `list_attn` name; ``"none"`` removes
    them), in place; returns ``model``.

    Args:
        model: any network with attention `capture_attention` sees (timm, torchvision, attnlab, registered ones).
        attention: the registered attention to put in their place.
        attn_kwargs: its options.
        image_size: side of the dry forward that measures each attention's channels.

    """
    paths = _swappable(model)
    if not paths:
        raise AttnlabError(f"convert: {type(model).__name__} has no attention to swap")
    create_attn(attention, 8, **(attn_kwargs or {}))  # a bad name or option fails before any surgery
    channels = _input_channels(model, paths, image_size)
    for path in paths:
        old = model.get_submodule(path)
        reference = next(old.parameters(), None)
        new = create_attn(attention, channels[path], **(attn_kwargs or {}))
        if reference is not None:
            new = new.to(reference.device, reference.dtype)
        new.train(old.training)
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


__all__ = ["convert"]
