"""Object detection with attnlab backbones: torchvision's Faster R-CNN / RetinaNet over any attnlab model, trained by
the one run engine (`task`: detection as a kind of run) and scored by COCO metrics.

The names below load on first use (PEP 562), so ``attnlab.detection.config`` is read without torch: the command line
builds ``detect train``'s flags from it. The backbone builder is ``attnlab.detection.backbone.backbone`` (a lazy name
would be shadowed by its module).
"""

from __future__ import annotations

from ..lazy import lazy_names

_LAZY = {
    "DetectConfig": "config",
    "create_detector": "detector",
    "evaluate_detector": "task",
    "train_detector": "task",
    "evaluate_run": "load",
    "load_detector": "load",
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY)


__all__ = sorted(_LAZY)
