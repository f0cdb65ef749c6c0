"""Attention modules and their registry.

Every attention is built as ``create_attn(name, channels, **kw)`` and maps B×C×H×W → B×C×H×W. The classic baselines
(SE, ECA, CBAM) are timm's modules; position-wise spatial attention, CRAM and AW-convolution are written here, one
mechanism per file. ``register_attn`` adds a new one; the models pick attentions up by name only. A mechanism that
needs something of the training loop (a schedule, a loss term, a memory layout) registers a training hook with its
options (`hooks.register_training_hook`). Every factory takes ``device``/``dtype`` as timm's layers do.
"""

from __future__ import annotations

from collections.abc import Callable

from timm.layers import EcaModule, SEModule, register_notrace_module
from timm.layers.cbam import CbamModule
from torch import nn

from ..errors import lookup
from ..schema import check_call
from .awconv import AWConv2d, aw_module, aw_training
from .cram import CRAM
from .cram_equivariance import cram_training
from .hooks import StepHook, check_mechanisms, list_training_hooks, register_training_hook, training_hooks
from .merge import MERGES, create_merge, list_merges
from .probe import AttentionProbe
from .spatial import SpatialAttention

# torch.fx leaves (timm's notrace registry, which its feature extractors and tests trace with): these branch on the
# input's shape, dtype or memory layout, which symbolic tracing cannot follow; a traced network calls them whole
for _leaf in (AWConv2d, CRAM, *MERGES.values()):
    register_notrace_module(_leaf)

AttnFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, AttnFactory] = {}


def register_attn(name: str, factory: AttnFactory | None = None):
    """Register ``factory(channels, **kw) -> nn.Module`` under ``name``; usable as a decorator."""

    def add(f: AttnFactory) -> AttnFactory:
        _REGISTRY[name] = f
        return f

    return add(factory) if factory is not None else add


def get_attn(name: str) -> AttnFactory:
    """The factory registered under ``name`` (``AttnlabError`` with close matches if there is none)."""
    return lookup(_REGISTRY, name, "attention")


def create_attn(name: str, channels: int, device=None, dtype=None, **kwargs) -> nn.Module:
    """Build attention ``name`` for ``channels`` channels on ``device`` in ``dtype`` (timm's blocks pass them);
    ``"none"`` gives ``nn.Identity``. A factory takes ``device`` and ``dtype`` keywords and builds in place."""
    factory = get_attn(name)
    return factory(channels, **check_call(factory, kwargs, f"attention '{name}'"), device=device, dtype=dtype)


def list_attn() -> list[str]:
    """Registered attention names, sorted."""
    return sorted(_REGISTRY)


def _none(channels: int, **_) -> nn.Module:
    return nn.Identity()


register_attn("none", _none)
register_attn("se", SEModule)  # Hu et al. 2018; timm: reduction 1/16, rounded to a multiple of 8
register_attn("eca", EcaModule)  # Wang et al. 2020; timm: kernel size adapted to the channel count
register_attn("cbam", CbamModule)  # Woo et al. 2018; timm: channel MLP then 7×7 spatial map
register_attn("spatial", SpatialAttention)
register_attn("cram", CRAM)
register_attn("aw", aw_module)  # an AW-convolution used as a stand-alone, shape-preserving attention

register_training_hook("cram", cram_training)  # β annealing; options: the equivariance term's weight and transforms
register_training_hook("aw", aw_training, label="AW-convolution")  # option: the memory layout it trains in

__all__ = [
    "AWConv2d",
    "AttentionProbe",
    "CRAM",
    "SpatialAttention",
    "StepHook",
    "check_mechanisms",
    "create_merge",
    "list_merges",
    "create_attn",
    "get_attn",
    "list_attn",
    "list_training_hooks",
    "register_attn",
    "register_training_hook",
    "training_hooks",
]
