"""Verdicts on claims, decided by fixed rules from paired tests over seeds, never by eye (the paper-specific claims
built on these rules are in `attnlab.experiment.claims`).

One comparison (A against B on a metric, the claim naming the direction it expects):

- **holds**: at least `MIN_SEEDS` seeds shared by A and B, and the two-sided paired t-test over them gives
  p < `ALPHA` with the mean difference in the claimed direction;
- **does not hold**: the same, with the difference in the opposite direction;
- **inconclusive at this budget**: anything else (too few seeds, p ≥ ALPHA, differences without spread, or missing
  results).

The paired t-test decides; the Wilcoxon signed-rank p is reported beside it as a check that does not assume normal
differences (with fewer than 6 seeds it cannot reach p < 0.05 at all, so it cannot decide). A claim about a family
("some form of multiplication beats addition") adjusts the family's p-values by Holm–Bonferroni, holds if any
member holds after adjustment, and does not hold if even the member with the best mean is significantly on the
wrong side.

A claim about a level rather than a difference ("attention is only *weakly* consistent with importance") compares
the per-seed values with a threshold by a one-sample t-test instead, with the same three outcomes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats as scipy_stats

from ..analysis.registry import metric as declared_metric
from ..errors import unknown_name
from ..stats import ALPHA, describe, holm, paired_test
from .results import RESULT_FIELDS, headline_per_seed, per_seed

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
INCONCLUSIVE = "inconclusive at this budget"
MIN_SEEDS = 3

RULES = (
    f"A claim **holds** when the effect is in the claimed direction with a two-sided paired t-test p < {ALPHA} over "
    f"at least {MIN_SEEDS} shared seeds; it **does not hold** when the effect is significant in the opposite "
    f"direction; otherwise it is **inconclusive at this budget** (too few seeds, p ≥ {ALPHA}, or missing results). "
    "Families of comparisons are Holm–Bonferroni adjusted. The Wilcoxon signed-rank p is shown beside the t-test "
    "(it cannot go below 0.05 with fewer than 6 seeds)."
)


def rules(score_name: str = "accuracy") -> str:
    """`RULES` as a report states them, naming the compared score (``"accuracy"``, ``"AP"``)."""
    return f"{RULES} {score_name[0].upper()}{score_name[1:]} is the last-epoch test {score_name} of each run."


@dataclass(frozen=True)
class Verdict:
    """The outcome of one claim: what was claimed, the verdict, the numbers behind it and a one-sentence reason."""

    claim: str
    verdict: str
    numbers: str
    reason: str


@dataclass(frozen=True)
class Metric:
    """Where a number comes from: a column of results.csv (``analysis`` None) or an analysis headline metric.

    Attributes:
        name: the column or headline key.
        analysis: the analysis that produces it, or None.
        higher_is_better: the direction a claim of "better" means.
        label: how the report names it.
        scale: multiply values by this for display (100 for accuracies in percent).
        unit: appended to displayed values.
    """

    name: str
    analysis: str | None = None
    higher_is_better: bool = True
    label: str = ""
    scale: float = 1.0
    unit: str = ""

    def __post_init__(self) -> None:
        """A metric a claim names must exist: an analysis's declared headline metric, or a results.csv column."""
        if self.analysis is not None:
            declared_metric(self.analysis, self.name)
        elif self.name not in RESULT_FIELDS:
            raise unknown_name("results.csv column", self.name, RESULT_FIELDS)

    @property
    def title(self) -> str:
        return self.label or (f"{self.analysis}.{self.name}" if self.analysis else self.name)

    def show(self, value: float, signed: bool = False) -> str:
        """``value`` for the report: scaled with 2 decimals, or 3 significant digits when that would show 0.00."""
        if math.isnan(value):
            return "n/a"
        scaled = value * self.scale
        sign = "+" if signed else ""
        if scaled == 0 or abs(scaled) >= 0.01:
            return f"{scaled:{sign}.2f}{self.unit}"
        return f"{scaled:{sign}.3g}{self.unit}"


TEST_ACC = Metric("test_acc", label="test accuracy", scale=100, unit="%")
TEST_AP = Metric("test_ap", label="test AP@[.5:.95] ×100", scale=100)
RESULT_METRICS = {m.name: m for m in (TEST_ACC, TEST_AP)}
"""The scores a study file's claim may name as its ``metric`` (`attnlab.experiment.study`)."""


class Evidence:
    """The numbers verdicts read: results rows and analysis results of one comparison."""

    def __init__(self, rows: Sequence[dict[str, Any]], analyses: dict[tuple[str, str], dict[int, dict[str, Any]]]):
        self.rows = rows
        self.analyses = analyses

    def values(self, dataset: str, model: str, metric: Metric) -> dict[int, float]:
        """``{seed: value}`` of ``metric`` for entry ``model`` (NaN values are left out)."""
        if metric.analysis is None:
            found = per_seed(self.rows, dataset, model, metric.name)
        else:
            found = headline_per_seed(self.analyses, dataset, metric.analysis, model, metric.name)
        return {s: v for s, v in found.items() if not math.isnan(v)}


def _fmt_p(p: float) -> str:
    return "n/a" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


@dataclass(frozen=True)
class Comparison:
    """A against B on one metric over their shared seeds."""

    a: str
    b: str
    metric: Metric
    n: int
    mean_a: float
    mean_b: float
    diff: float
    t_p: float
    wilcoxon_p: float

    @property
    def signed(self) -> float:
        """The difference oriented so that positive means "A is better"."""
        return self.diff if self.metric.higher_is_better else -self.diff

    def text(self, p: float | None = None) -> str:
        m = self.metric
        if self.n == 0:
            return f"{m.title}: no seed has both {self.a} and {self.b}"
        adjusted = "" if p is None or math.isnan(p) or p == self.t_p else f", Holm-adjusted {_fmt_p(p)}"
        return (
            f"{m.title}: {self.a} {m.show(self.mean_a)} vs {self.b} {m.show(self.mean_b)} "
            f"(Δ {m.show(self.diff, signed=True)}, n={self.n}, paired t p={_fmt_p(self.t_p)}{adjusted}, "
            f"Wilcoxon p={_fmt_p(self.wilcoxon_p)})"
        )


def compare(evidence: Evidence, dataset: str, a: str, b: str, metric: Metric) -> Comparison:
    """A against B on ``metric`` over the seeds where both have a value."""
    va, vb = evidence.values(dataset, a, metric), evidence.values(dataset, b, metric)
    shared = sorted(set(va) & set(vb))
    test = paired_test([va[s] for s in shared], [vb[s] for s in shared])
    mean_a = describe([va[s] for s in shared]).mean
    mean_b = describe([vb[s] for s in shared]).mean
    return Comparison(a, b, metric, test.n, mean_a, mean_b, test.mean_diff, test.t_p, test.wilcoxon_p)


def decide(c: Comparison, p: float | None = None) -> tuple[str, str]:
    """(verdict, reason) of one comparison whose claim is "A is better than B"; ``p`` overrides the t-test's p-value
    (an adjusted one)."""
    p = c.t_p if p is None else p
    if c.n == 0:
        return INCONCLUSIVE, f"no seed has results for both {c.a} and {c.b}."
    if c.n < MIN_SEEDS:
        return INCONCLUSIVE, f"only {c.n} shared seed(s); a verdict needs at least {MIN_SEEDS}."
    if math.isnan(p):
        return INCONCLUSIVE, "the per-seed differences have no spread, so the t-test is undefined."
    if p >= ALPHA:
        return INCONCLUSIVE, f"the difference is not significant (p = {_fmt_p(p)} ≥ {ALPHA})."
    if c.signed > 0:
        return HOLDS, f"{c.a} is better than {c.b} on {c.metric.title} (p = {_fmt_p(p)})."
    return DOES_NOT_HOLD, f"{c.a} is significantly worse than {c.b} on {c.metric.title} (p = {_fmt_p(p)})."


def pairwise(claim: str, evidence: Evidence, dataset: str, a: str, b: str, metric: Metric = TEST_ACC) -> Verdict:
    """The claim "``a`` is better than ``b`` on ``metric``" (see the module docstring for the rule)."""
    c = compare(evidence, dataset, a, b, metric)
    verdict, reason = decide(c)
    return Verdict(claim, verdict, c.text(), reason)


def any_of(claim: str, evidence: Evidence, dataset: str, members: Sequence[str], b: str, metric: Metric = TEST_ACC):
    """The claim "at least one of ``members`` is better than ``b``", Holm-adjusted over the members."""
    comparisons = [compare(evidence, dataset, a, b, metric) for a in members]
    adjusted = holm([c.t_p if c.n >= MIN_SEEDS else math.nan for c in comparisons])
    numbers = "; ".join(c.text(p) for c, p in zip(comparisons, adjusted, strict=True))
    ranked = [(c, p) for c, p in zip(comparisons, adjusted, strict=True) if c.n > 0]
    if not ranked:
        return Verdict(claim, INCONCLUSIVE, numbers, f"no results for {b} and any of {', '.join(members)}.")
    winners = [(c, p) for c, p in ranked if decide(c, p)[0] == HOLDS]
    if winners:
        best = max(winners, key=lambda cp: cp[0].signed)[0]
        names = ", ".join(c.a for c, _ in winners)
        reason = f"{names} beat(s) {b} after Holm adjustment; the largest gain is {best.a}."
        return Verdict(claim, HOLDS, numbers, reason)
    best, p = max(ranked, key=lambda cp: cp[0].signed)
    verdict, reason = decide(best, p)
    if verdict == DOES_NOT_HOLD:
        return Verdict(claim, verdict, numbers, f"even the best of them, {best.a}, is significantly worse than {b}.")
    return Verdict(claim, INCONCLUSIVE, numbers, f"best by mean: {best.a}; {reason}")


def best_of(claim: str, evidence: Evidence, dataset: str, members: Sequence[str], metric: Metric = TEST_ACC):
    """The claim "the member with the best mean is better than every other member", Holm-adjusted over the others.

    It holds when the best-by-mean member beats each of the others significantly; it cannot "not hold" (the best
    mean is never significantly worse), so otherwise it is inconclusive.
    """
    means = {m: describe(list(evidence.values(dataset, m, metric).values())).mean for m in members}
    ranked = sorted(
        (m for m in members if not math.isnan(means[m])), key=lambda m: means[m], reverse=metric.higher_is_better
    )
    if len(ranked) < 2:
        return Verdict(claim, INCONCLUSIVE, "", "fewer than two of them have results.")
    best = ranked[0]
    comparisons = [compare(evidence, dataset, best, other, metric) for other in ranked[1:]]
    adjusted = holm([c.t_p if c.n >= MIN_SEEDS else math.nan for c in comparisons])
    numbers = "; ".join(c.text(p) for c, p in zip(comparisons, adjusted, strict=True))
    outcomes = [decide(c, p) for c, p in zip(comparisons, adjusted, strict=True)]
    if all(v == HOLDS for v, _ in outcomes):
        return Verdict(claim, HOLDS, numbers, f"{best} beats every other form after Holm adjustment.")
    undecided = next(reason for v, reason in outcomes if v != HOLDS)
    return Verdict(claim, INCONCLUSIVE, numbers, f"best by mean: {best}; against the runner-up or another: {undecided}")


def below(claim: str, evidence: Evidence, dataset: str, model: str, metric: Metric, threshold: float) -> Verdict:
    """The claim "``metric`` of ``model`` is below ``threshold``": one-sample t-test of the per-seed values."""
    values = list(evidence.values(dataset, model, metric).values())
    d = describe(values)
    numbers = (
        f"{metric.title} of {model}: {metric.show(d.mean)} "
        f"(95% CI {metric.show(d.ci_low)}–{metric.show(d.ci_high)} over {d.n} seed(s)); threshold {threshold}"
    )
    if d.n < MIN_SEEDS:
        return Verdict(claim, INCONCLUSIVE, numbers, f"only {d.n} seed(s); a verdict needs at least {MIN_SEEDS}.")
    if d.std == 0:
        return Verdict(claim, INCONCLUSIVE, numbers, "the per-seed values have no spread, so the t-test is undefined.")
    p = float(scipy_stats.ttest_1samp(values, threshold).pvalue)
    numbers += f", one-sample t p={_fmt_p(p)}"
    if p >= ALPHA:
        return Verdict(claim, INCONCLUSIVE, numbers, f"not significantly different from {threshold} (p = {_fmt_p(p)}).")
    if d.mean < threshold:
        return Verdict(claim, HOLDS, numbers, f"{metric.title} is significantly below {threshold}.")
    return Verdict(claim, DOES_NOT_HOLD, numbers, f"{metric.title} is significantly above {threshold}.")


ClaimRule = Callable[[Evidence, Sequence[str]], list[Verdict]]
"""A claim's rule: (evidence, the datasets it ran on) → one verdict per tested case."""


@dataclass(frozen=True)
class Claim:
    """A claim a preset decides: a one-sentence ``statement`` and the ``rule`` that returns its verdicts."""

    key: str
    statement: str
    rule: ClaimRule


def decide_claims(
    claims: Sequence[Claim], evidence: Evidence, datasets: Sequence[str]
) -> list[tuple[Claim, list[Verdict]]]:
    """Every claim decided on ``evidence``."""
    return [(claim, claim.rule(evidence, datasets)) for claim in claims]
