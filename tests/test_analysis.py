"""Consistency and smoothness analyses: rank statistics against scipy, batched ablation against a one-unit-at-a-time
reference, gates that are (or are not) the true importance ranking, and smoothness metrics of a linear model against
their closed forms."""

from __future__ import annotations

import importlib
import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from attnlab import AttnlabError, create_model
from attnlab.analysis import (
    consistency,
    gate_sites,
    input_gradient_norm,
    jacobian_frobenius,
    kendall_rows,
    mean_ci,
    noise_robustness,
    path_smoothness,
    spearman_rows,
    topk_overlap,
)
from attnlab.analysis.importance import (
    ablation_importance,
    gradient_x_activation,
    inference_copy,
    true_class_loss,
)
from attnlab.analysis.sites import cell_index, gate_values, keep_masks
from attnlab.analysis.smoothness import sample_pairs
from attnlab.layers.probe import AttentionProbe
from attnlab.models.capture import capture_attention


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # model initialisations and inputs drawn without an explicit generator


# ------------------------------------------------------------------------------------------------------------ stats


@given(st.integers(2, 9), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_row_correlations_equal_scipy_with_ties(units, rows, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 4, size=(rows, units)).astype(float)  # small integers: many ties
    b = rng.integers(0, 4, size=(rows, units)).astype(float)
    rho, tau = spearman_rows(a, b), kendall_rows(a, b)
    for i in range(rows):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on constant rows, where both sides give NaN
            ref_rho = scipy.stats.spearmanr(a[i], b[i]).statistic
            ref_tau = scipy.stats.kendalltau(a[i], b[i]).statistic
        np.testing.assert_allclose(rho[i], ref_rho, atol=1e-12, equal_nan=True)
        np.testing.assert_allclose(tau[i], ref_tau, atol=1e-12, equal_nan=True)


def test_topk_overlap_and_mean_ci():
    a = torch.tensor([[5.0, 4, 3, 2, 1], [1, 2, 3, 4, 5]])
    b = torch.tensor([[5.0, 1, 4, 2, 3], [5, 4, 3, 2, 1]])
    np.testing.assert_allclose(topk_overlap(a, b, 2), [0.5, 0.0])
    np.testing.assert_allclose(topk_overlap(a, b, 5), [1.0, 1.0])
    values = np.array([0.1, 0.4, 0.35, np.nan, 0.2])
    ci = mean_ci(values)
    low, high = scipy.stats.t.interval(
        0.95, 3, loc=np.mean(values[:3].tolist() + [0.2]), scale=scipy.stats.sem([0.1, 0.4, 0.35, 0.2])
    )
    assert ci["n"] == 4 and math.isclose(ci["ci_low"], low) and math.isclose(ci["ci_high"], high)
    assert mean_ci([])["n"] == 0 and math.isnan(mean_ci([])["mean"])


# --------------------------------------------------------------------------------------------------------- ablation


def _spread_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters, so that the zero-initialised last BN of each block does not silence the gates."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine:
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def _reference_ablation(model, x, y, site, grid):
    """One forward per unit, zeroing that unit of the site's output with a hook."""
    shape = []
    h = site.module.register_forward_hook(lambda _m, _i, out: shape.append(tuple(out.shape[1:])))
    with torch.no_grad():
        model(x[:1])
    h.remove()
    masks = keep_masks(site, shape[0], grid)
    base = F.cross_entropy(model(x), y, reduction="none").detach()
    out = torch.empty(len(x), len(masks))
    for u, mask in enumerate(masks):
        h = site.module.register_forward_hook(lambda _m, _i, o, mask=mask: o * mask)
        with torch.no_grad():
            out[:, u] = F.cross_entropy(model(x), y, reduction="none") - base
        h.remove()
    return out


@pytest.mark.parametrize("name", ["se_resnet20", "cbam_resnet20", "cram_resnet20", "aw_resnet20", "fmm_resnet20"])
def test_batched_ablation_equals_one_unit_at_a_time(name):
    kwargs = {"attn_layer": "spatial"} if name == "fmm_resnet20" else {}  # a product merge around a spatial map
    model = _spread_bn(create_model(name, num_classes=3, in_chans=1, attn_where="last", **kwargs))
    x, y = torch.randn(5, 1, 12, 12), torch.tensor([0, 1, 2, 0, 1])
    sites = gate_sites(model)
    assert sites
    for site in sites[:2] + sites[-1:]:
        expected = _reference_ablation(model, x, y, site, grid=4)
        got = ablation_importance(model, x, y, site, grid=4, max_rows=7)  # chunks that split a sample's units
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)  # batch-size-dependent float paths


def test_inference_copy_is_the_same_function_and_leaves_the_model_alone():
    model = _spread_bn(create_model("se_resnet20", num_classes=3, in_chans=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference_copy(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.layer1.modules())
    x = torch.randn(4, 1, 12, 12)
    torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), model(x), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gradient_x_activation_equals_per_sample_autograd():
    model = _spread_bn(create_model("cbam_resnet20", num_classes=3, in_chans=1, attn_where="last"))
    x, y = torch.randn(3, 1, 12, 12), torch.tensor([2, 0, 1])
    sites = gate_sites(model)
    got = gradient_x_activation(model, x, y, sites, grid=None)
    for site in sites:
        for n in range(len(x)):
            saved: list[torch.Tensor] = []
            h = site.module.register_forward_hook(lambda _m, _i, o, saved=saved: saved.append(o))
            loss = F.cross_entropy(model(x[n : n + 1]), y[n : n + 1])
            h.remove()
            (grad,) = torch.autograd.grad(loss, saved[0])
            term = -(saved[0] * grad)[0]
            expected = term.sum((1, 2)) if site.units == "channel" else term.sum(0).flatten()
            torch.testing.assert_close(got[site.path][n], expected, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------ hand-built gate models


class ChannelGate(nn.Module):
    """x = [gate logits ; feature logits] (B×2C×1×1) ↦ g ⊙ v with g = σ(gate logits) (or a nearly flat gate) and
    v = 1 (``exact``: the gate is the whole story) or exp(feature logits) (independent of the gate)."""

    def __init__(self, exact: bool):
        super().__init__()
        self.exact = exact
        self.probe = AttentionProbe("channel")

    def forward(self, x):
        c = x.shape[1] // 2
        gate = torch.sigmoid(x[:, :c]) if self.exact else 1 + 1e-3 * torch.tanh(x[:, :c])
        features = torch.ones_like(x[:, c:]) if self.exact else torch.exp(x[:, c:])
        return features * self.probe(gate)


class SpatialGate(nn.Module):
    """x (B×1×H×W) ↦ σ(x): a map that gates a constant feature, one position per unit."""

    def __init__(self):
        super().__init__()
        self.probe = AttentionProbe("spatial")

    def forward(self, x):
        return self.probe(torch.sigmoid(x))


class MeanHead(nn.Module):
    """Logit of class 0 = mean of everything; the other classes 0. The loss of class 0 falls as any unit grows."""

    def forward(self, x):
        total = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([total, torch.zeros_like(total), torch.zeros_like(total)], 1)


def test_gate_equal_to_ablation_ranking_gives_rho_one():
    model = nn.Sequential(ChannelGate(exact=True), MeanHead()).eval()
    x, y = torch.randn(256, 16, 1, 1, generator=torch.Generator().manual_seed(0)), torch.zeros(256, dtype=torch.long)
    result = consistency(model, x, y, methods=["ablation", "grad_x_act"], random_gate=False)
    (layer,) = result["layers"]
    for method in ("ablation", "grad_x_act"):
        assert layer["spearman"][method]["mean"] == pytest.approx(1.0, abs=1e-12)
        assert layer["kendall"][method]["mean"] == pytest.approx(1.0, abs=1e-12)
        assert layer["topk"][method]["mean"] == pytest.approx(1.0)
    null = result["summary"]["null_spearman"]  # the shuffled control sits at chance
    assert null["ci_low"] < 0 < null["ci_high"] and abs(null["mean"]) < 0.1


def test_spatial_cells_rank_like_their_mean_gate():
    model = nn.Sequential(SpatialGate(), MeanHead()).eval()
    x, y = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(16, dtype=torch.long)
    result = consistency(model, x, y, methods=["ablation"], grid=4, random_gate=False, null=False)
    (layer,) = result["layers"]
    assert layer["n_units"] == 16 and layer["spearman"]["ablation"]["mean"] == pytest.approx(1.0, abs=1e-12)


def test_random_gate_gives_rho_near_zero():
    model = nn.Sequential(ChannelGate(exact=False), MeanHead()).eval()
    x, y = torch.randn(400, 32, 1, 1, generator=torch.Generator().manual_seed(0)), torch.zeros(400, dtype=torch.long)
    result = consistency(model, x, y, methods=["ablation"], random_gate=False)
    rho = result["layers"][0]["spearman"]["ablation"]
    assert rho["ci_low"] < 0 < rho["ci_high"] and abs(rho["mean"]) < 0.05


def test_consistency_on_a_resnet_reports_every_gate_and_control():
    model = _spread_bn(create_model("cbam_resnet20", num_classes=3, in_chans=1, attn_where="last"))
    x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 3, (8,))
    result = consistency(model, x, y, control_images=4, captum_images=3, captum_steps=2, keep_values=True)
    assert [layer["path"] for layer in result["layers"]] == [s.path for s in gate_sites(model)]
    assert {"spearman_ablation", "spearman_grad_x_act", "null_spearman", "random_gate_spearman"} <= set(
        result["summary"]
    )
    layer = result["layers"][1]
    assert layer["kind"] == "spatial" and result["values"][layer["path"]]["ablation"].shape == (8, layer["n_units"])
    with pytest.raises(AttnlabError, match="no attention"):
        consistency(create_model("resnet20", num_classes=3, in_chans=1).eval(), x, y)
    with pytest.raises(AttnlabError, match="importance method"):
        consistency(model, x, y, methods=["ablaton"])


def test_gate_values_and_cells():
    index = cell_index(7, 5, 3)
    assert index.max() == 8 and index[0, 0] == 0 and index[6, 4] == 8  # 7 rows into 3 cells: 3, 2, 2
    assert (index[:, 0] // 3).tolist() == [0, 0, 0, 1, 1, 2, 2]
    model = _spread_bn(create_model("aw_resnet20", num_classes=3, in_chans=1, attn_where="last"), seed=1)
    site = gate_sites(model)[0]
    with torch.no_grad(), capture_attention(model) as record:
        model(torch.randn(2, 1, 12, 12))
    attn = record[site.path]
    torch.testing.assert_close(gate_values(site, attn, None), attn.mean((2, 3, 4)))
    w = site.module.weight
    effective = gate_values(site, attn, None, aw_reduce="effective")
    torch.testing.assert_close(effective[1, 3], (attn[1, 3] * w[3]).norm() / w[3].norm())


# ------------------------------------------------------------------------------------------------------ smoothness


class Linear2(nn.Module):
    """Two classes, logits (0, w·x + b): everything about it has a closed form."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(torch.tensor(b))

    def forward(self, x):
        s = x.flatten(1) @ self.w.flatten() + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


def _linear_model(seed: int = 0) -> tuple[Linear2, torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    return Linear2(torch.randn(1, 3, 3, generator=g), 0.3).eval(), g


def test_path_metrics_of_a_linear_model_equal_their_closed_forms():
    model, g = _linear_model()
    x_a, x_b = torch.randn(20, 1, 3, 3, generator=g) * 2, torch.randn(20, 1, 3, 3, generator=g) * 2
    y_a, y_b = torch.randint(0, 2, (20,), generator=g), torch.randint(0, 2, (20,), generator=g)
    path = path_smoothness(model, x_a, x_b, y_a, y_b, steps=41)
    with torch.no_grad():
        s_a, s_b = model(x_a)[:, 1], model(x_b)[:, 1]
    # p₁(t) = σ(s(t)) with s linear in t: monotone, so the L1 variation of (p₀, p₁) is 2|σ(s_b) − σ(s_a)|
    torch.testing.assert_close(path["tv"], 2 * (torch.sigmoid(s_b) - torch.sigmoid(s_a)).abs(), atol=1e-5, rtol=0)
    # the prediction flips once exactly when the end points disagree
    assert torch.equal(path["flips"], ((s_a > 0) != (s_b > 0)).float())
    t = torch.linspace(0, 1, 41)
    s = s_a[:, None] + t * (s_b - s_a)[:, None]
    ce = {0: F.softplus(s), 1: F.softplus(-s)}
    loss = (1 - t) * torch.where(y_a[:, None] == 1, ce[1], ce[0]) + t * torch.where(y_b[:, None] == 1, ce[1], ce[0])
    torch.testing.assert_close(path["loss"], loss, atol=1e-5, rtol=1e-5)
    # a path orthogonal to w keeps the logits constant: no variation, no curvature
    w = model.w.detach().flatten()
    d = torch.randn(9, generator=g)
    d -= (d @ w) / (w @ w) * w
    flat = path_smoothness(model, x_a[:1], x_a[:1] + d.view(1, 1, 3, 3), y_a[:1], y_a[:1], steps=9)
    assert flat["tv"].item() < 1e-6 and flat["second_diff"].item() < 1e-6


def test_input_gradient_and_jacobian_of_a_linear_model():
    model, g = _linear_model(1)
    x, y = torch.randn(30, 1, 3, 3, generator=g), torch.randint(0, 2, (30,), generator=g)
    w_norm = model.w.detach().norm()
    with torch.no_grad():
        p1 = model(x).softmax(1)[:, 1]
    torch.testing.assert_close(input_gradient_norm(model, x, y), (p1 - y.float()).abs() * w_norm)
    for method in ("func", "per_class"):
        norms, used = jacobian_frobenius(model, x, method=method, batch_size=7)
        assert used == method
        torch.testing.assert_close(norms, w_norm.expand(30))


def test_jacobian_methods_agree_and_auto_falls_back_for_aw():
    model = _spread_bn(create_model("se_resnet20", num_classes=3, in_chans=1, attn_where="last"))
    x = torch.randn(3, 1, 8, 8)
    a, _ = jacobian_frobenius(model, x, method="func")
    b, _ = jacobian_frobenius(model, x, method="per_class")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    aw = _spread_bn(create_model("aw_resnet20", num_classes=3, in_chans=1))
    norms, used = jacobian_frobenius(aw, x)
    reference, _ = jacobian_frobenius(aw, x, method="per_class")
    assert used in ("func", "per_class")
    torch.testing.assert_close(norms, reference, rtol=1e-4, atol=1e-6)


def test_noise_flip_rate_of_a_linear_model_matches_the_gaussian_tail():
    model, g = _linear_model(2)
    x = torch.randn(6, 1, 3, 3, generator=g) * 0.3
    y = torch.zeros(6, dtype=torch.long)
    sigma, draws = 0.5, 4000
    got = noise_robustness(model, x, y, [0.0, sigma], draws=draws, generator=g)
    with torch.no_grad():
        s = model(x)[:, 1]
    assert got[0.0]["flip_rate"] == 0.0 and got[0.0]["acc"] == float((s <= 0).float().mean())
    # the logit gets N(0, σ²‖w‖²) noise: the sign flips with probability Φ(−|s| / σ‖w‖)
    expected = torch.distributions.Normal(0, 1).cdf(-s.abs() / (sigma * model.w.detach().norm())).mean().item()
    se = math.sqrt(expected * (1 - expected) / (draws * len(x)))
    assert abs(got[sigma]["flip_rate"] - expected) < 5 * se


@given(st.lists(st.integers(0, 3), min_size=2, max_size=30), st.integers(0, 1000))
def test_sample_pairs_respect_the_labels(labels, seed):
    labels = torch.tensor(labels)
    g = torch.Generator().manual_seed(seed)
    for same in (True, False):
        possible = (labels.bincount() >= 2).any() if same else len(labels.unique()) > 1
        if not possible:
            with pytest.raises(AttnlabError):
                sample_pairs(labels, 5, same=same, generator=g)
            continue
        pairs = sample_pairs(labels, 50, same=same, generator=g)
        assert (pairs[:, 0] != pairs[:, 1]).all()
        assert ((labels[pairs[:, 0]] == labels[pairs[:, 1]]) == same).all()


def test_true_class_loss_matches_cross_entropy():
    model = _spread_bn(create_model("se_resnet20", num_classes=3, in_chans=1))
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 1, 0])
    torch.testing.assert_close(
        true_class_loss(model, x, y, batch_size=2), F.cross_entropy(model(x), y, reduction="none").detach()
    )


def test_without_captum_the_result_says_it_was_skipped(monkeypatch):
    # the package exports the function `consistency`, which shadows the module's name as an attribute
    monkeypatch.setattr(importlib.import_module("attnlab.analysis.consistency"), "captum_available", lambda: False)
    model = nn.Sequential(ChannelGate(exact=True), MeanHead()).eval()
    x, y = torch.randn(8, 8, 1, 1), torch.zeros(8, dtype=torch.long)
    result = consistency(model, x, y, random_gate=False)
    assert result["methods"] == ["ablation", "grad_x_act"] and "not installed" in result["notes"]["captum"]
    with pytest.raises(AttnlabError, match="captum is not installed"):
        consistency(model, x, y, methods=["captum"])
