"""Training: settings (`config`), the run folder (`rundir`), the loop (`engine`), evaluation (`evaluate`),
checkpoints (`checkpoint`), loading finished runs (`load`), and what a model costs (`cost`); DDP under torchrun."""

from .config import TrainConfig
from .cost import benchmark_models, count_flops, measure_latency
from .engine import TrainingDiverged, build_model, train
from .evaluate import evaluate
from .load import check_fits, load_trained, run_data

__all__ = [
    "TrainConfig",
    "TrainingDiverged",
    "benchmark_models",
    "build_model",
    "check_fits",
    "count_flops",
    "evaluate",
    "load_trained",
    "measure_latency",
    "run_data",
    "train",
]
