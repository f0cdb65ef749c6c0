"""Training: settings (`config`), the entry grammar (`entry`), the run folder (`rundir`), the one run engine
(`engine`) and classification as its task (`classify`), evaluation (`evaluate`), checkpoints (`checkpoint`), loading
finished runs (`load`), and what a model costs (`cost`); DDP under torchrun."""

from .classify import build_model, run_data, train
from .config import RunConfig, TrainConfig
from .cost import benchmark_models, count_flops, measure_latency
from .engine import TrainingDiverged
from .evaluate import evaluate
from .load import check_fits, load_trained

__all__ = [
    "RunConfig",
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
