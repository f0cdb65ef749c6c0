"""The one statistics module against scipy on fixed numbers, its degenerate cases (one answer for n = 1) and Holm's
adjustment."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from attnlab.stats import describe, holm, mean_ci, paired_test

A = [0.912, 0.905, 0.918, 0.909, 0.914]
B = [0.901, 0.899, 0.915, 0.897, 0.902]


def test_describe_matches_scipy():
    d = describe(A)
    assert d.n == 5
    assert d.mean == pytest.approx(np.mean(A), abs=1e-15)
    assert d.std == pytest.approx(np.std(A, ddof=1), abs=1e-15)
    low, high = stats.t.interval(0.95, len(A) - 1, loc=np.mean(A), scale=stats.sem(A))
    assert (d.ci_low, d.ci_high) == (pytest.approx(low, abs=1e-14), pytest.approx(high, abs=1e-14))


def test_describe_clips_the_interval_to_the_range_the_values_can_take():
    unstable = [0.4426, 0.9458, 0.6504]  # fmm post_act=false over 3 seeds: the t-interval reaches past 100%
    free, bounded = describe(unstable), describe(unstable, within=(0.0, 1.0))
    assert free.ci_high > 1.0 and bounded.ci_high == 1.0
    assert (bounded.mean, bounded.std, bounded.ci_low) == (free.mean, free.std, free.ci_low)
    assert describe(A, within=(0.0, 1.0)) == describe(A)  # an interval inside the range is left alone


def test_describe_degenerate_samples():
    assert describe([]).n == 0 and math.isnan(describe([]).mean)
    one = describe([0.7])
    assert one.mean == 0.7 and math.isnan(one.std) and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    same = describe([0.8, 0.8, 0.8])
    assert (same.std, same.ci_low, same.ci_high) == (0.0, 0.8, 0.8)


def test_paired_test_matches_scipy():
    p = paired_test(A, B)
    t = stats.ttest_rel(A, B)
    w = stats.wilcoxon(A, B)
    assert p.n == 5
    assert p.mean_diff == pytest.approx(np.mean(np.subtract(A, B)), abs=1e-15)
    assert (p.t_stat, p.t_p) == (pytest.approx(t.statistic, rel=1e-12), pytest.approx(t.pvalue, rel=1e-12))
    assert (p.wilcoxon_stat, p.wilcoxon_p) == (w.statistic, pytest.approx(w.pvalue, rel=1e-12))


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy's own call below
def test_paired_test_degenerate_samples():
    short = paired_test([0.9], [0.8])
    assert short.n == 1 and short.mean_diff == pytest.approx(0.1) and math.isnan(short.t_p)
    assert paired_test([], []).n == 0
    same = paired_test(A, A)
    assert (same.mean_diff, same.t_stat, same.t_p, same.wilcoxon_p) == (0.0, 0.0, 1.0, 1.0)
    # equal differences up to float rounding: scipy reports a huge t and p ≈ 0, we report "undefined"
    shifted = paired_test([0.91, 0.81, 0.71], [0.9, 0.8, 0.7])
    assert stats.ttest_rel([0.91, 0.81, 0.71], [0.9, 0.8, 0.7]).pvalue < 1e-10
    assert math.isnan(shifted.t_p) and shifted.mean_diff == pytest.approx(0.01)
    with pytest.raises(ValueError, match="same length"):
        paired_test([1, 2], [1])


def test_holm_by_hand():
    adjusted = holm([0.01, 0.04, 0.03, 0.005, math.nan])
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(adjusted[4])


@given(st.lists(st.floats(0, 1), min_size=1, max_size=12))
def test_holm_properties(pvalues):
    adjusted = holm(pvalues)
    assert all(p <= a <= 1 for p, a in zip(pvalues, adjusted, strict=True))
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    assert all(adjusted[i] <= adjusted[j] for i, j in zip(order, order[1:], strict=False))
    assert adjusted[order[0]] == pytest.approx(min(1.0, len(pvalues) * pvalues[order[0]]))


def test_mean_ci_is_describe_of_the_finite_values_with_the_same_answer_for_one_value():
    one = mean_ci([0.7, math.nan])
    assert one["n"] == 1 and one["mean"] == 0.7 and math.isnan(one["ci_low"]) and math.isnan(one["ci_high"])
    d = describe([0.1, 0.4, 0.35])
    assert mean_ci([0.1, 0.4, math.inf, 0.35]) == {"mean": d.mean, "ci_low": d.ci_low, "ci_high": d.ci_high, "n": 3}
