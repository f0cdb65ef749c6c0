"""convert(insert=NAME): an attention in every residual block of a network that has none (`blocks.FAMILIES` says
where in each family).

Identity at initialisation, so that a pretrained network keeps its function until the attention learns: a gate of SE,
ECA, CBAM, spatial attention or CRAM cannot output exactly 1 (a sigmoid, a soft mask), so each is inserted inside
`Blended`, y = x + g·(attn(x) − x) with a learnt g that starts at 0 (our reading; ReZero's and LayerScale's
zero-started residual scale, put around the attention instead of the branch). ``"aw"`` (`AWModule`, x + BN(AW(x))
with the BN weight at 0) is already the identity at init and goes in bare. Analyses read the inner attention's own
gate; the block applies it blended by g.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import AttnlabError
from ..layers import create_attn
from .blocks import find_blocks
from .gates import attention_sites
from .surgery import input_channels, set_module

IDENTITY_AT_INIT = frozenset({"aw"})
"""Registered attentions that are the identity at initialisation by themselves (inserted without `Blended`)."""


class Blended(nn.Module):
    """y = x + g·(attn(x) − x), g a learnt scalar starting at 0: an inserted attention that starts as the identity.

    Args:
        attn: the attention (B×C×H×W → B×C×H×W).
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn
        reference = next(attn.parameters(), None)
        dd = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
        self.blend = nn.Parameter(torch.zeros((), **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.blend * (self.attn(x) - x)


def _empty(module: nn.Module | None) -> bool:
    return module is None or type(module) is nn.Identity


def insert_attention(
    model: nn.Module, attention: str, attn_kwargs: dict[str, Any] | None = None, image_size: int = 64
) -> nn.Module:
    """Put attention ``attention`` into every residual block of ``model``, in place (module docstring)."""
    if attention == "none":
        raise AttnlabError("convert(insert='none'): nothing to insert; to remove attention, swap it: attention='none'")
    kwargs = attn_kwargs or {}
    create_attn(attention, 8, **kwargs)  # a bad name or option fails before any surgery
    blocks = find_blocks(model, f"insert={attention!r}")
    sites = attention_sites(model)[0]
    for path, block, family in blocks:
        present = getattr(block, family.slot) if family.slot else None
        inside = [s for s in sites if s.path.startswith(path + ".")]
        if not _empty(present) or inside:
            where = f"{path}.{family.slot}" if not _empty(present) else inside[0].path
            what = type(present).__name__ if not _empty(present) else inside[0].mechanism
            raise AttnlabError(
                f"convert(insert={attention!r}): {type(model).__name__} already has attention ({where}: {what}); "
                "swap it with attention=NAME, or remove it first with attention='none'"
            )
    # placeholders first, sized by one dry forward, then the attention (created once the channels are known)
    places = []
    for path, block, family in blocks:
        if family.slot:
            place = f"{path}.{family.slot}"
            setattr(block, family.slot, nn.Identity())
        else:
            end = f"{path}.{family.end(block)}"
            last = model.get_submodule(end)
            pair = (nn.Identity(), last) if family.before else (last, nn.Identity())
            set_module(model, end, nn.Sequential(*pair))
            place = f"{end}.{0 if family.before else 1}"
        places.append(place)
    channels = input_channels(model, places, image_size, f"insert={attention!r}")
    reference = next(model.parameters())
    for place in places:
        attn = create_attn(attention, channels[place], device=reference.device, dtype=reference.dtype, **kwargs)
        new = attn if attention in IDENTITY_AT_INIT else Blended(attn)
        new.train(model.training)
        set_module(model, place, new)
    return model


__all__ = ["Blended", "IDENTITY_AT_INIT", "insert_attention"]
