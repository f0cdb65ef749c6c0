"""Training engine: configuration, the loop, evaluation, checkpoints, DDP."""

from .config import TrainConfig
from .engine import TrainingDiverged, build_model, count_flops, evaluate, measure_latency, train
from .saved import load_trained

__all__ = [
    "TrainConfig",
    "TrainingDiverged",
    "build_model",
    "count_flops",
    "evaluate",
    "load_trained",
    "measure_latency",
    "train",
]
