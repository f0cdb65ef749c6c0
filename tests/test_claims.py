"""The claim rules on hand-made per-seed numbers, claims reading analysis headlines, and metric names checked
against what the analyses declare."""

from __future__ import annotations

import pytest
from scipy import stats

from attnlab.errors import AttnlabError
from attnlab.experiment.verdicts import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    TEST_ACC,
    Evidence,
    Metric,
    any_of,
    below,
    best_of,
    pairwise,
)

A = [0.912, 0.905, 0.918, 0.909, 0.914]
B = [0.901, 0.899, 0.915, 0.897, 0.902]

# ------------------------------------------------------------------------------------------------------------ verdicts


def rows(model: str, values: list[float], dataset: str = "d") -> list[dict]:
    return [{"dataset": dataset, "model": model, "seed": s, "test_acc": v} for s, v in enumerate(values)]


def evidence(**models: list[float]) -> Evidence:
    return Evidence([r for name, values in models.items() for r in rows(name, values)], {})


def test_pairwise_rule():
    ev = evidence(base=B, good=A, bad=[b - 0.01 for b in B], noisy=[0.95, 0.85, 0.92, 0.88, 0.90])
    assert pairwise("c", ev, "d", "good", "base").verdict == HOLDS
    assert pairwise("c", ev, "d", "base", "good").verdict == DOES_NOT_HOLD
    assert pairwise("c", ev, "d", "noisy", "base").verdict == INCONCLUSIVE
    # the same clear effect on two seeds is too few to decide
    two = Evidence(rows("base", B[:2]) + rows("good", A[:2]), {})
    v = pairwise("c", two, "d", "good", "base")
    assert v.verdict == INCONCLUSIVE and "only 2 shared seed" in v.reason
    assert pairwise("c", ev, "d", "missing", "base").verdict == INCONCLUSIVE
    v = pairwise("c", ev, "d", "good", "base")
    p = stats.ttest_rel(A, B).pvalue
    assert f"p={p:.3f}" in v.numbers and "n=5" in v.numbers


def test_lower_is_better_metric_flips_the_direction():
    loss = Metric("test_acc", higher_is_better=False, label="a loss")
    ev = evidence(base=B, good=A)
    assert pairwise("c", ev, "d", "good", "base", loss).verdict == DOES_NOT_HOLD
    assert pairwise("c", ev, "d", "base", "good", loss).verdict == HOLDS


def test_family_rule_is_holm_adjusted():
    lifted = [b + d for b, d in zip(B, [0.004, 0.006, 0.002, 0.009, 0.003], strict=True)]
    raw = stats.ttest_rel(lifted, B).pvalue
    assert 0.01 < raw < 0.05  # significant alone, not after a Holm factor of 5
    ev = evidence(base=B, x=lifted, n1=B, n2=B, n3=B, n4=B)
    assert pairwise("c", ev, "d", "x", "base").verdict == HOLDS
    assert any_of("c", ev, "d", ["x", "n1", "n2", "n3", "n4"], "base").verdict == INCONCLUSIVE
    ev = evidence(base=B, good=A, worse=[b - 0.02 for b in B])
    assert any_of("c", ev, "d", ["good", "worse"], "base").verdict == HOLDS
    ev = evidence(base=A, w1=B, w2=[b - 0.01 for b in B])
    assert any_of("c", ev, "d", ["w1", "w2"], "base").verdict == DOES_NOT_HOLD


def test_best_form_rule():
    ev = evidence(top=A, mid=B, low=[b - 0.02 for b in B])
    v = best_of("c", ev, "d", ["low", "top", "mid"])
    assert v.verdict == HOLDS and v.reason.startswith("top beats every other")
    ev = evidence(top=A, close=[a - d for a, d in zip(A, [0.001, -0.002, 0.003, 0.0, 0.001], strict=True)], low=B)
    v = best_of("c", ev, "d", ["top", "close", "low"])
    assert v.verdict == INCONCLUSIVE and "best by mean: top" in v.reason
    assert best_of("c", ev, "d", ["top", "missing"]).verdict == INCONCLUSIVE


def test_threshold_rule():
    ev = evidence(low=[0.1, 0.2, 0.15, 0.12], high=[0.8, 0.7, 0.75, 0.85], mid=[0.2, 0.8, 0.4, 0.6])
    assert below("c", ev, "d", "low", TEST_ACC, 0.5).verdict == HOLDS
    assert below("c", ev, "d", "high", TEST_ACC, 0.5).verdict == DOES_NOT_HOLD
    assert below("c", ev, "d", "mid", TEST_ACC, 0.5).verdict == INCONCLUSIVE


def test_claims_read_analysis_headlines_per_seed():
    from attnlab.experiment.claims import attention_weakly_consistent, smoother_than_plain

    tv = {"plain": [0.50, 0.55, 0.52, 0.58], "fmm": [0.30, 0.36, 0.31, 0.35]}
    rho = [0.21, 0.18, 0.25, 0.2]
    analyses = {
        ("d", "smoothness"): {s: {"headline": {m: {"tv_same": v[s]} for m, v in tv.items()}} for s in range(4)},
        ("d", "consistency"): {
            s: {"headline": {"se": {"spearman_ablation": rho[s], "null_spearman": 0.01 * s}}} for s in range(4)
        },
    }
    ev = Evidence([], analyses)
    (smooth,) = smoother_than_plain("plain", ["fmm"]).rule(ev, ["d"])
    assert smooth.verdict == HOLDS
    assert f"p={stats.ttest_rel(tv['fmm'], tv['plain']).pvalue:.1e}" in smooth.numbers
    (weak,) = attention_weakly_consistent(["se"]).rule(ev, ["d"])
    assert weak.verdict == HOLDS and "chance" in weak.numbers
    del analyses[("d", "smoothness")][3]["headline"]["fmm"]  # a missing value leaves that seed out
    (smooth,) = smoother_than_plain("plain", ["fmm"]).rule(ev, ["d"])
    assert "n=3" in smooth.numbers


def test_a_misspelt_metric_is_an_error_not_an_inconclusive_claim():
    """Claims name analysis metrics through the analyses' constants; a name typed by hand must be declared."""
    from attnlab.analysis.smoothness import TV_SAME

    assert Metric(TV_SAME, "smoothness").name == "tv_same"
    with pytest.raises(AttnlabError, match="unknown smoothness headline metric 'tv_smae'; did you mean tv_same"):
        Metric("tv_smae", "smoothness")
    with pytest.raises(AttnlabError, match="unknown analysis 'smoothnes'"):
        Metric("tv_same", "smoothnes")
    with pytest.raises(AttnlabError, match="unknown results.csv column 'test_accuracy'"):
        Metric("test_accuracy")
    with pytest.raises(ImportError):
        from attnlab.analysis.smoothness import TV_SMAE  # noqa: F401


def test_every_preset_claim_metric_is_declared_by_its_analysis():
    from attnlab.analysis import get_analysis
    from attnlab.experiment import claims

    metrics = [v for v in vars(claims).values() if isinstance(v, Metric)]
    metrics += [m for v in vars(claims).values() if isinstance(v, tuple) for m in v if isinstance(m, Metric)]
    assert len(metrics) >= 15
    for m in metrics:
        assert m.analysis is None or m.name in get_analysis(m.analysis).metrics
