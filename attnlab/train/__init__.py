"""Training: settings (`config`), the entry grammar (`entry`), the run folder (`rundir`), the one run engine
(`engine`) and classification as its task (`classify`), evaluation (`evaluate`), checkpoints (`checkpoint`), loading
finished runs (`load`), and what a model costs (`cost`); DDP under torchrun.

The names below load on first use (PEP 562), so ``attnlab.train.config`` is read without importing the engine (and
torch) with it: the command line builds its flags from it. `evaluate` is the module; its function is
``attnlab.train.evaluate.evaluate`` (a lazy name would be shadowed by the submodule of that name).
"""

from __future__ import annotations

from ..lazy import lazy_names

_LAZY = {
    "RunConfig": "config",
    "TrainConfig": "config",
    "benchmark_models": "cost",
    "count_flops": "cost",
    "measure_latency": "cost",
    "TrainingDiverged": "engine",
    "build_model": "classify",
    "run_data": "classify",
    "train": "classify",
    "check_fits": "load",
    "evaluate_trained": "load",
    "load_trained": "load",
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY)


__all__ = sorted(_LAZY)
