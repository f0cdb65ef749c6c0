"""attnlab: attention mechanisms for convolutional networks — FMMNet, AW-convolution, CRAM and the classic baselines —
with a training engine, honest comparisons and the analyses that test what the papers claim.

``import attnlab`` imports neither torch nor timm (the command line answers ``--help`` at once): the names below are
loaded on first use (PEP 562). Every attnlab model name still works in ``timm.create_model`` after ``import attnlab``:
`attnlab.timm_hook` registers them as soon as timm is imported, or at once if it already is.
"""

from __future__ import annotations

import importlib
import sys

from . import timm_hook
from .errors import AttnlabError
from .lazy import lazy_names

__version__ = "0.1.0"

_LAZY = {
    "capture_attention": "models",
    "convert": "models",
    "create_model": "models",
    "list_models": "models",
    "register_attention": "models",
    "create_attn": "layers",
    "get_attn": "layers",
    "list_attn": "layers",
    "register_attn": "layers",
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY)


if "timm" in sys.modules:  # torch and timm are loaded already: register attnlab's names with timm now
    importlib.import_module(timm_hook.MODELS)
timm_hook.install()

__all__ = [
    "AttnlabError",
    "capture_attention",
    "convert",
    "create_attn",
    "create_model",
    "get_attn",
    "list_attn",
    "list_models",
    "register_attn",
    "register_attention",
]
