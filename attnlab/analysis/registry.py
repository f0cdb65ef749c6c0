"""The analyses, one record each: what `run_analysis`, ``attnlab analyze``, ``attnlab compare`` and the claims know of
an analysis. Adding an analysis is a module (its function, its ``headline`` and the constants naming its headline
metrics), its figures in `plots`, and one record here."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..docstrings import argument_meanings
from ..errors import lookup, unknown_name
from . import plots
from .consistency import METRIC_MEANINGS as CONSISTENCY_MEANINGS
from .consistency import METRICS as CONSISTENCY_METRICS
from .consistency import READS as CONSISTENCY_READS
from .consistency import consistency
from .consistency import headline as consistency_headline
from .landscape import METRIC_MEANINGS as LANDSCAPE_MEANINGS
from .landscape import METRICS as LANDSCAPE_METRICS
from .landscape import headline as landscape_headline
from .landscape import landscape
from .localization import METRIC_MEANINGS as LOCALIZATION_MEANINGS
from .localization import METRICS as LOCALIZATION_METRICS
from .localization import READS as LOCALIZATION_READS
from .localization import SPATIAL_KINDS, localization, selection_note
from .localization import headline as localization_headline
from .sites import gate_sites
from .smoothness import METRIC_MEANINGS as SMOOTHNESS_MEANINGS
from .smoothness import METRICS as SMOOTHNESS_METRICS
from .smoothness import headline as smoothness_headline
from .smoothness import smoothness


@dataclass(frozen=True)
class Analysis:
    """One analysis.

    Attributes:
        name: ``attnlab analyze NAME``.
        function: the library function, called as ``function(model, images, labels_or_boxes, **options)``.
        headline: result → {metric: float}, the numbers a report quotes and claims read.
        metrics: the headline metric names a claim may use (constants of the analysis's module).
        meanings: one line per headline metric (the module's ``METRIC_MEANINGS``; ``{name}`` in a key stands for any
            word, and the meaning may use it): the printed legend.
        figures: ``(results, extras, out) → PNG file names``, drawn for all checkpoints at once.
        internal: keyword arguments the runner sets itself (not user options).
        extra: a key the runner takes out of each result for the figures (per-sample data the JSON does not keep).
        needs_boxes: called with the ground-truth boxes instead of the labels (needs a dataset with boxes).
        seeded: takes ``seed=`` (every random draw of the analysis).
        selects_on_validation: chooses something (a layer) on held-out validation images, given to it as
            ``select_images`` and ``select_boxes``, before scoring the test images.
        notes: result → lines printed beside its headline (what was chosen, and on which images).
        reads: what attention it reads, in words ("" for an analysis of any network): a network without it cannot be
            analysed.
        reads_kinds: the attention kinds meant by ``reads`` (None: every kind).
    """

    name: str
    function: Callable[..., dict]
    headline: Callable[[dict[str, Any]], dict[str, float]]
    metrics: tuple[str, ...]
    meanings: dict[str, str]
    figures: Callable[[dict, dict, Path], list[str]]
    internal: dict[str, Any] = field(default_factory=dict)
    extra: str | None = None
    needs_boxes: bool = False
    seeded: bool = True
    selects_on_validation: bool = False
    notes: Callable[[dict[str, Any]], list[str]] = lambda result: []
    reads: str = ""
    reads_kinds: tuple[str, ...] | None = None

    def options(self) -> dict[str, Any]:
        """The user options (keyword → default) of the analysis."""
        return {
            p.name: p.default
            for p in inspect.signature(self.function).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in {*self.internal, *RUNNER_SETS}
        }

    def can_analyse(self, model: nn.Module) -> bool:
        """Whether ``model`` has the attention the analysis reads."""
        return not self.reads or bool(gate_sites(model, self.reads_kinds))

    def option_meanings(self) -> dict[str, str]:
        """The user options' meanings, from the function's docstring (``Args:``)."""
        meanings = argument_meanings(self.function)
        return {name: meanings.get(name, "") for name in self.options()}

    def meaning(self, metric: str) -> str:
        """The one-line meaning of headline metric ``metric`` ("" for a metric `meanings` does not describe)."""
        if metric in self.meanings:
            return self.meanings[metric]
        # the most specific template first: spearman_{method}_ci_low before spearman_{method}
        for pattern, text in sorted(self.meanings.items(), key=lambda kv: -len(re.sub(r"{\w+}", "", kv[0]))):
            names = re.findall(r"{(\w+)}", pattern)
            regex = re.escape(pattern)
            for name in names:
                regex = regex.replace(re.escape(f"{{{name}}}"), f"(?P<{name}>.+?)", 1)
            found = re.fullmatch(regex, metric) if names else None
            if found:
                return text.format(**found.groupdict())
        return ""


OVERLAY_EXAMPLES = 6
RUNNER_SETS = ("seed", "select_images", "select_boxes", "progress")
"""Keyword arguments the runner always sets itself where an analysis takes them (never user options)."""

ANALYSES: dict[str, Analysis] = {
    a.name: a
    for a in (
        Analysis(
            "consistency",
            consistency,
            consistency_headline,
            CONSISTENCY_METRICS,
            CONSISTENCY_MEANINGS,
            plots.consistency_figures,
            internal={"keep_values": True},
            extra="values",
            reads=CONSISTENCY_READS,
        ),
        Analysis(
            "smoothness",
            smoothness,
            smoothness_headline,
            SMOOTHNESS_METRICS,
            SMOOTHNESS_MEANINGS,
            plots.smoothness_figures,
            internal={"keep_curves": True},
        ),
        Analysis(
            "landscape", landscape, landscape_headline, LANDSCAPE_METRICS, LANDSCAPE_MEANINGS, plots.landscape_figures
        ),
        Analysis(
            "localization",
            localization,
            localization_headline,
            LOCALIZATION_METRICS,
            LOCALIZATION_MEANINGS,
            plots.localization_figures,
            internal={"keep_examples": OVERLAY_EXAMPLES},
            extra="examples",
            needs_boxes=True,
            seeded=False,
            selects_on_validation=True,
            notes=selection_note,
            reads=LOCALIZATION_READS,
            reads_kinds=SPATIAL_KINDS,
        ),
    )
}


def get_analysis(name: str) -> Analysis:
    """The record of analysis ``name`` (`AttnlabError` with close matches if there is none)."""
    return lookup(ANALYSES, name, "analysis")


def analysis_options(name: str) -> dict[str, Any]:
    """The options (keyword → default) that ``run_analysis(name, ...)`` accepts."""
    return get_analysis(name).options()


def metric(analysis: str, name: str) -> str:
    """``name`` if analysis ``analysis`` declares it as a headline metric; an `AttnlabError` otherwise."""
    if name not in get_analysis(analysis).metrics:
        raise unknown_name(f"{analysis} headline metric", name, get_analysis(analysis).metrics)
    return name
