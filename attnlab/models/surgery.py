"""What every mode of `convert` shares: replacing a submodule by path, and measuring the channels a module receives."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AttnlabError
from .external import first_conv


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (dotted) inside ``model``."""
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def input_channels(model: nn.Module, paths: list[str], image_size: int, mode: str) -> dict[str, int]:
    """The channel count (dim 1) of the first input each module at ``paths`` receives in one dry forward of an
    ``image_size`` square of zeros, in eval mode (``mode`` names the conversion in the error)."""
    conv = first_conv(model)
    in_chans = conv[1].in_channels if conv is not None else 3
    param = next(model.parameters())
    seen: dict[str, int] = {}

    def record(path: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if path not in seen and args[0].dim() != 4:
                raise AttnlabError(f"convert({mode}): {path} receives a {args[0].dim()}-d tensor, not B×C×H×W")
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
        raise AttnlabError(f"convert({mode}): {', '.join(missing[:3])} did not run in a forward pass; cannot size them")
    return seen


__all__ = ["input_channels", "set_module"]
