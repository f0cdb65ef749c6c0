"""The claims of the papers attnlab tests, each a `Claim` built on the generic decision rules of
`attnlab.experiment.verdicts`: FMMNet's products against addition, Ye et al.'s consistency and smoothness, Zhu et al.'s
AW-convolution, Nguyen et al.'s CRAM, and beyond ResNets whether a network's own squeeze-excite helps it and whether
ECA, CBAM or CRAM swapped in for it do better. `CLAIMS` names the constructors a study file may use (`load_preset`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..analysis.consistency import NULL_SPEARMAN, RANDOM_GATE_SPEARMAN, SPEARMAN_ABLATION
from ..analysis.landscape import HESSIAN_TOP_EIG
from ..analysis.localization import CROSS_LAYER_IOU, IOU_BEST_LAYER
from ..analysis.localization import EQUIVARIANCE_ERROR as LOCALIZATION_EQUIVARIANCE_ERROR
from ..analysis.smoothness import (
    FLIPS_DIFF,
    FLIPS_SAME,
    INPUT_GRAD_NORM,
    JACOBIAN_FRO,
    NOISE_ACC_AT_0_1,
    SECOND_DIFF_SAME,
    TV_DIFF,
    TV_SAME,
)
from ..models import ARCHS
from ..stats import describe
from .plan import parse_entry
from .verdicts import TEST_ACC, Claim, Evidence, Metric, Verdict, any_of, below, best_of, compare, pairwise

# ------------------------------------------------------------------------------------------------------------ metrics
# Analysis metrics are the analyses' own constants: a misspelt one is an ImportError, and `Metric` refuses a name its
# analysis does not declare.

SPEARMAN = Metric(SPEARMAN_ABLATION, "consistency", higher_is_better=True, label="Spearman ρ(attention, importance)")
SMOOTH_PRIMARY = Metric(
    TV_SAME, "smoothness", higher_is_better=False, label="total variation of p along same-class paths"
)
SMOOTH_OTHERS = (
    *(
        Metric(name, "smoothness", higher_is_better=False)
        for name in (
            TV_DIFF,
            SECOND_DIFF_SAME,
            FLIPS_SAME,
            FLIPS_DIFF,
            INPUT_GRAD_NORM,
            JACOBIAN_FRO,
        )
    ),
    Metric(NOISE_ACC_AT_0_1, "smoothness", higher_is_better=True),
)
CONSISTENCY_CONTROLS = (
    Metric(NULL_SPEARMAN, "consistency", label="ρ against permuted importances (chance)"),
    Metric(RANDOM_GATE_SPEARMAN, "consistency", label="ρ of randomly permuted attention parameters"),
)
SHARPNESS = Metric(HESSIAN_TOP_EIG, "landscape", higher_is_better=False, label="top Hessian eigenvalue")
IOU = Metric(
    IOU_BEST_LAYER,
    "localization",
    higher_is_better=True,
    label="IoU of the thresholded map with the true box (layer chosen on validation)",
)
CROSS_LAYER = Metric(CROSS_LAYER_IOU, "localization", higher_is_better=True, label="IoU between layers' regions")
EQUIVARIANCE_ERROR = Metric(
    LOCALIZATION_EQUIVARIANCE_ERROR, "localization", higher_is_better=False, label="equivariance error"
)

WEAK_CORRELATION = 0.5
"""Our reading of "only weakly consistent": a rank correlation below 0.5 (below a "moderate" association). The paper
gives no number; the threshold is a named constant so the verdict says what it assumed."""


def products_beat_addition(kind: str, baseline: str, products: Sequence[str]) -> Claim:
    """FMMNet: replacing the residual addition by a product of feature maps improves accuracy (for some form).

    Args:
        kind: ``"plain"`` (the paper's literal replacement: ``mul``, ``mul_bn`` and their bias / activation options) or
            ``"gated"`` (one factor squashed or offset into an attention-like gate: ``gate``, ``gate_shortcut``,
            ``mul_residual``); the two are separate claims, since a gate is attention by another name.
        baseline: the addition network.
        products: its product forms of that kind.
    """

    def rule(evidence: Evidence, datasets: Sequence[str]) -> list[Verdict]:
        found = []
        for d in datasets:
            found.append(any_of(f"some {kind} product beats addition on {d}", evidence, d, products, baseline))
            if len(products) > 1:
                found.append(best_of(f"one {kind} product is the best on {d}", evidence, d, products))
        return found

    what = {
        "plain": "Plain products of feature maps (FMMNet's literal replacement: F·S, BN(F)·BN(S))",
        "gated": "Gated products (one factor squashed or offset into an attention-like gate on the other)",
    }[kind]
    return Claim(f"fmm-{kind}", f"{what} beat the residual addition; which form?", rule)


def attention_weakly_consistent(models: Sequence[str]) -> Claim:
    """Ye et al.: attention weights agree only weakly with the importance of the features they gate."""

    def rule(evidence: Evidence, datasets: Sequence[str]) -> list[Verdict]:
        found = []
        for d in datasets:
            for m in models:
                claim = f"{m}: ρ(attention, ablation importance) < {WEAK_CORRELATION} on {d}"
                v = below(claim, evidence, d, m, SPEARMAN, WEAK_CORRELATION)
                controls = []
                for c in CONSISTENCY_CONTROLS:
                    values = list(evidence.values(d, m, c).values())
                    if values:
                        controls.append(f"{c.title}: {c.show(describe(values).mean)}")
                found.append(Verdict(v.claim, v.verdict, "; ".join([v.numbers, *controls]), v.reason))
        return found

    return Claim(
        "consistency",
        "Attention weights are only weakly consistent with feature importance (rank correlation with the loss rise "
        f"when a gated unit is ablated is below {WEAK_CORRELATION}).",
        rule,
    )


def smoother_than_plain(baseline: str, models: Sequence[str]) -> Claim:
    """Ye et al.: FMM and attention networks are smoother and more stable between real samples than plain ResNets."""

    def rule(evidence: Evidence, datasets: Sequence[str]) -> list[Verdict]:
        found = []
        for d in datasets:
            for m in models:
                v = pairwise(f"{m} smoother than {baseline} on {d}", evidence, d, m, baseline, SMOOTH_PRIMARY)
                extra = [compare(evidence, d, m, baseline, x) for x in (*SMOOTH_OTHERS, SHARPNESS)]
                numbers = "; ".join([v.numbers, *(c.text() for c in extra if c.n > 0)])
                found.append(Verdict(v.claim, v.verdict, numbers, v.reason))
        return found

    return Claim(
        "smoothness",
        "FMM and attention networks are smoother and more stable between real samples than plain ResNets "
        f"(decided on {SMOOTH_PRIMARY.title}, lower is smoother; the other measures are shown beside it).",
        rule,
    )


def weight_attention_adds(pairs: Sequence[tuple[str, str]], metric: Metric = TEST_ACC) -> Claim:
    """Zhu et al.: weight-shaped (AW) attention improves a network, also on top of activation attention — in
    classification accuracy and, as a detection backbone, in COCO AP (``metric`` `TEST_AP`).

    Args:
        pairs: (entry with AW, the same entry without it).
        metric: what "improves" is measured by.
    """

    def rule(evidence: Evidence, datasets: Sequence[str]) -> list[Verdict]:
        return [pairwise(f"{a} beats {b} on {d}", evidence, d, a, b, metric) for d in datasets for a, b in pairs]

    attended = [b for _, b in pairs if parse_entry(b).model not in ARCHS]  # bases that already have attention
    also = f", also on top of activation attention ({', '.join(attended)})" if attended else ""
    gain = "accuracy" if metric == TEST_ACC else "detection AP as a backbone"
    return Claim("aw", f"AW-convolution (attention shaped like the weights) adds {gain}{also}.", rule)


def cram_beats_spatial(spatial: str, crams: Sequence[str], equivariant: str | None, localize: bool) -> Claim:
    """Nguyen et al.: rectangular attention is more accurate, better localised and more stable across layers than
    position-wise spatial attention; the equivariance term makes the rectangle follow the object."""

    def rule(evidence: Evidence, datasets: Sequence[str]) -> list[Verdict]:
        found = []
        for d in datasets:
            for c in crams:
                found.append(pairwise(f"{c} more accurate than {spatial} on {d}", evidence, d, c, spatial, TEST_ACC))
                if localize:
                    found.append(pairwise(f"{c} localises better than {spatial} on {d}", evidence, d, c, spatial, IOU))
                    found.append(
                        pairwise(
                            f"{c} more stable across layers than {spatial} on {d}", evidence, d, c, spatial, CROSS_LAYER
                        )
                    )
            plain = next((c for c in crams if c != equivariant), None)
            if equivariant is not None and plain is not None:
                found.append(
                    pairwise(
                        f"the equivariance term makes {plain} more accurate on {d}", evidence, d, equivariant, plain
                    )
                )
                if localize:
                    found.append(
                        pairwise(
                            f"the equivariance term makes {equivariant} more equivariant than {plain} on {d}",
                            evidence,
                            d,
                            equivariant,
                            plain,
                            EQUIVARIANCE_ERROR,
                        )
                    )
        return found

    statement = "Rectangular attention (CRAM) beats position-wise spatial attention in accuracy" + (
        ", localisation (IoU with the true box) and stability across layers" if localize else ""
    )
    if equivariant is not None:
        statement += "; its equivariance term makes CRAM more accurate" + (
            " and makes the rectangle follow the object" if localize else ""
        )
    return Claim("cram", statement + ".", rule)


def _each_beats(pairs: Sequence[tuple[str, str]]):
    """The rule "a beats b" (test accuracy, paired over seeds) for every pair, on every dataset."""

    def rule(evidence: Evidence, datasets: Sequence[str]) -> list[Verdict]:
        return [pairwise(f"{a} beats {b} on {d}", evidence, d, a, b) for d in datasets for a, b in pairs]

    return rule


def own_attention_helps(pairs: Sequence[tuple[str, str]]) -> Claim:
    """A network's own attention (the squeeze-excite of MobileNetV3 and EfficientNet, Hu et al.) makes it more
    accurate than the same network with that attention removed (``NAME[attention=none]``), family by family.

    Args:
        pairs: (a network with its own attention, the same network without it).
    """

    return Claim(
        "own-attention",
        "A network's own squeeze-excite gates make it more accurate than the same network without them, in each "
        "family that ships with them.",
        _each_beats(pairs),
    )


def swap_beats_own(pairs: Sequence[tuple[str, str]]) -> Claim:
    """ECA (Wang et al.), CBAM (Woo et al.) and CRAM (Nguyen et al.) are each proposed as better attention than
    squeeze-excite: swapped for a network's own SE (``NAME[attention=eca]``), each makes it more accurate than its own.

    Args:
        pairs: (the network with its attention swapped, the same network with its own).
    """

    return Claim(
        "swap-own",
        "An attention proposed as better than squeeze-excite (ECA, CBAM, CRAM), swapped for a network's own SE gates, "
        "makes the network more accurate than its own gates do.",
        _each_beats(pairs),
    )


CLAIMS = {
    c.__name__: c
    for c in (
        products_beat_addition,
        attention_weakly_consistent,
        smoother_than_plain,
        weight_attention_adds,
        cram_beats_spatial,
        own_attention_helps,
        swap_beats_own,
    )
}
"""The claim constructors a study file may name (``claims: [{claim: NAME, ...its arguments}]``)."""
