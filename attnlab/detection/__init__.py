"""Object detection with attnlab backbones: torchvision's Faster R-CNN / RetinaNet over any attnlab model, trained by
the one run engine (`task`: detection as a kind of run) and scored by COCO metrics.

The names below load on first use (PEP 562), so ``attnlab.detection.config`` is read without torch: the command line
builds ``detect train``'s flags from it. The backbone builder is ``attnlab.detection.backbone.backbone`` (a lazy name
would be shadowed by its module).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "DetectConfig": "config",
    "create_detector": "detector",
    "evaluate_detector": "task",
    "train_detector": "task",
    "evaluate_run": "load",
    "load_detector": "load",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'attnlab.detection' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = sorted(_LAZY)
