"""Model surgery on any network, in place: swap its attentions, insert attention into its residual blocks, put
AW-convolutions in place of its convolutions, FMM merges in place of its residual additions.

One mode per file: swap is here; insert in `insert`, AW in `convert_aw`, FMM in `convert_fmm`, the block families they
know in `blocks`. Several modes in one call run in that order (swap, insert, AW, merge).

Swap: the attentions swapped are the channel, element, spatial and rectangle sites `capture_attention` sees (a
CBAM's two parts are one module; a coordinate attention's two gates are one module); AW-convolutions are convolutions,
not swapped. Each replacement is ``create_attn(NAME, C, **attn_kwargs)`` for the C channels the old module received,
measured by one dry forward, on the old module's device and dtype. A swap does not preserve a pretrained network's
function: the new attention starts from its own initialisation and the network needs fine-tuning.
"""

from __future__ import annotations

from typing import Any

from timm.layers.cbam import CbamModule, LightCbamModule
from torch import nn

from ..errors import AttnlabError
from ..layers import create_attn
from .convert_aw import Selection, convert_aw
from .convert_fmm import convert_merges
from .gates import attention_sites
from .insert import insert_attention
from .surgery import input_channels, set_module

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


def swap_attention(
    model: nn.Module, attention: str, attn_kwargs: dict[str, Any] | None = None, image_size: int = 64
) -> nn.Module:
    """Replace every attention of ``model`` by attention ``attention`` (``"none"`` removes them), in place."""
    paths = _swappable(model)
    if not paths:
        raise AttnlabError(f"convert: {type(model).__name__} has no attention to swap")
    create_attn(attention, 8, **(attn_kwargs or {}))  # a bad name or option fails before any surgery
    channels = input_channels(model, paths, image_size, f"attention={attention!r}")
    for path in paths:
        old = model.get_submodule(path)
        reference = next(old.parameters(), None)
        new = create_attn(attention, channels[path], **(attn_kwargs or {}))
        if reference is not None:
            new = new.to(reference.device, reference.dtype)
        new.train(old.training)
        set_module(model, path, new)
    return model


def convert(
    model: nn.Module,
    *,
    attention: str | None = None,
    insert: str | None = None,
    attn_kwargs: dict[str, Any] | None = None,
    aw: Selection | None = None,
    aw_kwargs: dict[str, Any] | None = None,
    merge: str | None = None,
    merge_kwargs: dict[str, Any] | None = None,
    image_size: int = 64,
) -> nn.Module:
    """Convert ``model`` in place and return it; at least one mode. Inserted attention and AW-convolution start as the
    identity (the network computes what it did); a swap and a merge other than ``add`` change its function.

    Args:
        model: any network (timm, torchvision, attnlab, a user's).
        attention: swap every attention `capture_attention` sees for this registered one (``"none"`` removes them).
        insert: put this registered attention into every residual block of a known family (`blocks.FAMILIES`); the
            network must have no attention left in them.
        attn_kwargs: options of the swapped or inserted attention.
        aw: which convolutions become AW-convolutions: ``"3x3"`` (every dense 3×3), a glob over module paths, or a
            predicate ``(path, conv) -> bool``.
        aw_kwargs: AW options (``gate``, ``generator``, ``reduction``, ...).
        merge: the merge (`list_merges`) in place of the residual addition of every block of a known family that has
            a skip (`merged_blocks.MERGED`).
        merge_kwargs: its options.
        image_size: side of the dry forward that measures each attention's and merge's channels.
    """
    if attention is None and insert is None and aw is None and merge is None:
        raise AttnlabError("convert: say what to convert: attention=, insert=, aw= or merge=")
    if attention is not None:
        swap_attention(model, attention, attn_kwargs, image_size)
    if insert is not None:
        insert_attention(model, insert, attn_kwargs, image_size)
    if aw is not None:
        convert_aw(model, aw, aw_kwargs)
    if merge is not None:
        convert_merges(model, merge, merge_kwargs, image_size)
    return model


__all__ = ["convert", "swap_attention"]
