"""What a comparison trains: classifiers (`attnlab.train`) or detectors (`attnlab.detection`).

A task names a run's configuration class, the function that trains one run, the settings that leave a run's numbers
unchanged (a finished run is reused when only these differ), the score that verdicts compare (last-epoch test
accuracy for classifiers, COCO AP@[.5:.95] for detectors: ``val_<score>`` and ``test_<score>`` in ``summary.json``) and
the columns ``results.csv`` takes from each run's summary. Everything above the runs (results, report, claims) reads
these, so a detection comparison is reported and decided exactly as a classification one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..detection.config import NEUTRAL as DETECT_NEUTRAL
from ..detection.config import DetectConfig
from ..errors import lookup
from ..train.config import NEUTRAL, NEUTRAL_WITHOUT_SKIPS, TrainConfig
from ..train.rundir import RunDir


@dataclass(frozen=True)
class Task:
    """One kind of run a comparison can train.

    Attributes:
        name: ``classify`` or ``detect``.
        config: the run configuration class (`TrainConfig`, `DetectConfig`).
        trainer: ``module:function`` that trains one run (imported when a run starts).
        neutral: settings that say where a run executes, not what it computes.
        score: the compared number: ``summary.json``'s ``test_<score>`` (and ``val_<score>`` per epoch).
        score_name: how text names it ("accuracy", "AP"); short: how a table header does ("acc", "AP").
        unit: how tables show it (×100): "%" for accuracy, "×100" for AP.
        score_text: what the reported score is, one paragraph for the report.
        columns: ``summary.json`` keys copied into ``results.csv`` (beside dataset, model, arch, seed, device, run).
        neutral_without_skips: settings that are neutral too for a finished run that skipped no step.
        score_range: the values the score can take (accuracy and AP are fractions); its intervals are clipped to it.
    """

    name: str
    config: type
    trainer: str
    neutral: frozenset[str]
    score: str
    score_name: str
    short: str
    unit: str
    score_text: str
    columns: tuple[str, ...]
    neutral_without_skips: frozenset[str] = frozenset()
    score_range: tuple[float, float] = (0.0, 1.0)

    def reuse_despite(self, run: Path) -> frozenset[str]:
        """The settings in which the finished run in folder ``run`` may differ from the wanted ones and still be
        reused: `neutral`, and `neutral_without_skips` when its history records no skipped step."""
        if self.neutral_without_skips and not any(r.get("skipped_steps") for r in RunDir(run).history()):
            return self.neutral | self.neutral_without_skips
        return self.neutral

    def make_config(self, values: dict[str, Any], source: str = "config") -> Any:
        return self.config.from_dict(values, source=source)

    def train(self, cfg: Any, **kwargs: Any) -> dict[str, Any]:
        """Train one run (``kwargs``: resume, progress, log); returns its summary."""
        module, _, function = self.trainer.partition(":")
        run: Callable[..., dict[str, Any]] = getattr(importlib.import_module(module), function)
        return run(cfg, **kwargs)


TASKS: dict[str, Task] = {
    "classify": Task(
        name="classify",
        config=TrainConfig,
        trainer="attnlab.train:train",
        neutral=NEUTRAL,
        neutral_without_skips=NEUTRAL_WITHOUT_SKIPS,
        score="acc",
        score_name="accuracy",
        short="acc",
        unit="%",
        score_text="Test accuracy is each run's last-epoch test accuracy (never the best epoch); validation "
        "accuracy, on a split carved from the training set, is shown beside it.",
        columns=(
            "val_acc",
            "test_acc",
            "test_loss",
            "params",
            "flops",
            "train_img_per_s",
            "latency_ms",
            "wall_time_s",
            "epochs",
        ),
    ),
    "detect": Task(
        name="detect",
        config=DetectConfig,
        trainer="attnlab.detection.task:train_detector",
        neutral=DETECT_NEUTRAL,
        score="ap",
        score_name="AP",
        short="AP",
        unit="×100",
        score_text="Test AP is each run's last-epoch COCO AP@[.5:.95] on the test split (never the best epoch), "
        "computed by torchmetrics with the pycocotools backend; validation AP, on a split carved from the training "
        "set, is shown beside it.",
        columns=(
            "val_ap",
            "test_ap",
            "test_ap50",
            "test_ap75",
            "test_ar100",
            "params",
            "backbone_flops",
            "train_img_per_s",
            "latency_ms",
            "wall_time_s",
            "epochs",
        ),
    ),
}


def get_task(name: str) -> Task:
    return lookup(TASKS, name, "task")


def task_of(cfg: Any) -> Task:
    """The task whose configuration ``cfg`` is."""
    for task in TASKS.values():
        if isinstance(cfg, task.config):
            return task
    configs = ", ".join(t.config.__name__ for t in TASKS.values())
    raise TypeError(f"no task trains a {type(cfg).__name__} (expected one of: {configs})")
