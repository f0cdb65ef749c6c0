"""Object detection with attnlab backbones: torchvision's Faster R-CNN / RetinaNet over any attnlab model, trained and
evaluated with the training engine's guarantees and COCO metrics."""

from .backbone import backbone
from .config import DetectConfig
from .detector import create_detector
from .load import evaluate_run, load_detector
from .task import evaluate_detector, train_detector

__all__ = [
    "DetectConfig",
    "backbone",
    "create_detector",
    "evaluate_detector",
    "evaluate_run",
    "load_detector",
    "train_detector",
]
