"""The project's one statistics module: mean, spread and a t-based 95% interval of a sample (seeds, samples, layers),
paired tests between two models over shared seeds, and Holm's adjustment.

Samples may be small (2–10 seeds), so degenerate ones are answered, not crashed on: with one value the spread and the
interval are NaN (one value says nothing about its uncertainty), with none every number is NaN; a paired test needs
two shared seeds. Differences that are all zero (two models with identical numbers) give t = 0, p = 1 (no evidence of
a difference) where scipy would give NaN; differences that are all equal but not zero have no spread, so the t-test
is undefined and its p-value is NaN (scipy would report t = ±inf, p = 0, a certainty two runs cannot give). "Equal"
allows for float rounding: a spread below 1e-12 of the values' scale counts as none, so ``0.91 - 0.9`` and
``0.81 - 0.8`` are the same difference.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05


@dataclass(frozen=True)
class Described:
    """A sample of per-seed values: size, mean, sample standard deviation (ddof 1) and a t-based 95% interval."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class PairedTest:
    """``a`` against ``b`` over the seeds both have: mean of a − b, paired t-test and Wilcoxon signed-rank test."""

    n: int
    mean_diff: float
    t_stat: float
    t_p: float
    wilcoxon_stat: float
    wilcoxon_p: float


NAN = float("nan")


def _no_spread(values: np.ndarray) -> bool:
    scale = max(1.0, float(np.max(np.abs(values))))
    return float(np.ptp(values)) <= 1e-12 * scale


def describe(values: Sequence[float], within: tuple[float, float] | None = None) -> Described:
    """Mean, sample std and the 95% Student-t interval of the mean (NaN where ``values`` are too few).

    ``within``: the range the values can take (an accuracy's [0, 1]); the interval is clipped to it, since a wide
    t-interval over a few unstable seeds (10% and 94%, say) would otherwise reach past 100%.
    """
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return Described(0, NAN, NAN, NAN, NAN)
    mean = float(np.mean(x))
    if n == 1:
        return Described(1, mean, NAN, NAN, NAN)
    if _no_spread(x):
        value = float(x[0])  # equal values: their value, not a mean that rounding moved
        return Described(n, value, 0.0, value, value)
    std = float(np.std(x, ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
    low, high = within or (-math.inf, math.inf)
    return Described(n, mean, std, max(mean - half, low), min(mean + half, high))


def mean_ci(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """`describe` of the finite values as a dict {mean, ci_low, ci_high, n}, the form analysis results store."""
    v = np.asarray(values, dtype=np.float64).ravel()
    d = describe(v[np.isfinite(v)])
    return {"mean": d.mean, "ci_low": d.ci_low, "ci_high": d.ci_high, "n": d.n}


def paired_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Two-sided paired t-test and Wilcoxon signed-rank test of ``a`` against ``b`` (same seeds, same order)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must have the same length, got {len(x)} and {len(y)}")
    n = len(x)
    if n < 2:
        return PairedTest(n, float(np.mean(x - y)) if n else NAN, NAN, NAN, NAN, NAN)
    d = x - y
    mean_diff = float(np.mean(d))
    scale = max(1.0, float(np.max(np.abs(np.concatenate([x, y])))))
    if np.all(np.abs(d) <= 1e-12 * scale):
        return PairedTest(n, 0.0, 0.0, 1.0, 0.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns on near-constant or tied samples
        if _no_spread(d):
            t_stat, t_p = NAN, NAN
        else:
            t = stats.ttest_rel(x, y)
            t_stat, t_p = float(t.statistic), float(t.pvalue)
        w = stats.wilcoxon(x, y)
    return PairedTest(n, mean_diff, t_stat, t_p, float(w.statistic), float(w.pvalue))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (family-wise error control over several comparisons); NaNs pass through and
    do not count towards the family size."""
    indexed = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(indexed)
    adjusted = [NAN] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted
