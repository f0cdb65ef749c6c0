"""Parameter-space landscape: Hessian estimates against the exact Hessian of a small model, filter normalisation,
and weights that come back bit-identical."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from aw_reference import reference_awconv
from torch import nn

from attnlab import AttnlabError, create_model
from attnlab.analysis import (
    filter_normalized_direction,
    hessian_top_eigenvalue,
    hessian_trace,
    landscape,
    loss_surface_1d,
    loss_surface_2d,
)
from attnlab.analysis.landscape import (
    HessianVectorProduct,
    evaluate_loss,
    headline,
    perturbed_weights,
    select_parameters,
)
from attnlab.layers import AWConv2d

COMMITTED = Path(__file__).resolve().parents[1] / "studies" / "results"


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    with torch.no_grad():  # BN statistics that are not the identity, so eval mode matters
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 1, 6, 6, generator=g), torch.randint(0, 3, (20,), generator=g)
    return x, y, [(x[:7], y[:7]), (x[7:], y[7:])]  # uneven batches: the mean must weight them by size


def _exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> torch.Tensor:
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().flatten() for n in names])

    def loss(v):
        parts = {n: t.view(s) for n, t, s in zip(names, v.split([s.numel() for s in shapes]), shapes)}
        return F.cross_entropy(torch.func.functional_call(model, {**params, **parts}, (x,)), y)

    model.eval()
    return torch.autograd.functional.hessian(loss, flat).double()


def _top(h: torch.Tensor) -> float:
    values = torch.linalg.eigvalsh(h)
    return values[values.abs().argmax()].item()


def test_top_eigenvalue_matches_the_exact_hessian_whole_and_per_block():
    model = _small_model().train()  # the estimate must switch BN to eval mode itself
    x, y, batches = _data()
    names = [n for n, _ in model.named_parameters()]
    exact = _exact_hessian(model, x, y, names)
    model.train()
    got = hessian_top_eigenvalue(model, F.cross_entropy, batches, iters=300, generator=torch.Generator().manual_seed(0))
    assert model.training  # mode restored
    assert got["hvp"] == "double_backward" and got["params"] == len(exact)
    assert got["eigenvalue"] == pytest.approx(_top(exact), rel=1e-4)
    block = ["4.weight", "4.bias"]
    got = hessian_top_eigenvalue(
        model, F.cross_entropy, batches, params_filter="4.*", iters=300, generator=torch.Generator().manual_seed(0)
    )
    assert got["eigenvalue"] == pytest.approx(_top(_exact_hessian(model, x, y, block)), rel=1e-4)


def test_the_top_eigenvalue_is_the_largest_even_where_a_negative_one_is_larger_in_magnitude():
    """At a saddle whose negative curvature is the strongest, plain power iteration returns that negative eigenvalue;
    the sharpness is the largest one, which the shifted iteration finds. Reference: a linear model under a loss with
    curvature +1 along one output and −3 along the other has the eigenvalues m and −3m for each eigenvalue m of
    E[zzᵀ], z = (x, 1)."""
    torch.manual_seed(0)
    model, x = nn.Linear(4, 2), torch.randn(30, 4)
    y = torch.zeros(30, dtype=torch.long)

    def saddle(out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return (0.5 * out[:, 0] ** 2 - 1.5 * out[:, 1] ** 2).mean()

    z = torch.cat([x, torch.ones(30, 1)], dim=1).double()
    m = torch.linalg.eigvalsh(z.T @ z / len(z)).max().item()
    batches = [(x[:11], y[:11]), (x[11:], y[11:])]
    kw = dict(iters=200, generator=torch.Generator().manual_seed(0))
    largest = hessian_top_eigenvalue(model, saddle, batches, **kw)
    assert largest["eigenvalue"] == pytest.approx(m, rel=1e-4)
    assert largest["dominant"] == pytest.approx(-3 * m, rel=1e-4) and largest["iters"] == 400
    magnitude = hessian_top_eigenvalue(model, saddle, batches, which="magnitude", **kw)
    assert magnitude["eigenvalue"] == magnitude["dominant"] == pytest.approx(-3 * m, rel=1e-4)
    assert magnitude["iters"] == 200
    with pytest.raises(AttnlabError, match="unknown top eigenvalue 'smallest'"):
        hessian_top_eigenvalue(model, saddle, batches, which="smallest")


def test_the_headline_of_a_saved_json_quotes_the_largest_eigenvalue_never_the_dominant_one():
    """A saved JSON holds null for a number that was not finite: the headline reads it back as NaN."""
    saved = {"sharpness_1d": 0.1, "loss": 0.2, "hessian_trace": None}
    blocks = {"head": {"eigenvalue": None, "dominant": -1.0, "params": 3}}
    got = headline({**saved, "hessian_top": {"eigenvalue": 12.5, "dominant": -368.7}, "hessian_blocks": blocks})
    assert got["hessian_top_eig"] == 12.5 and math.isnan(got["hessian_top_eig_head"])


@pytest.mark.parametrize(
    "path", sorted(COMMITTED.glob("**/landscape.json")), ids=lambda p: p.relative_to(COMMITTED).as_posix()
)
def test_committed_landscape_json_holds_the_estimates_the_library_writes(path):
    """Every estimate has its ``dominant``; the largest eigenvalue is at least the dominant one, or null where it was
    never estimated."""
    estimates = [
        estimate
        for result in json.loads(path.read_text())["results"].values()
        for estimate in (result["hessian_top"], *result["hessian_blocks"].values())
    ]
    assert estimates and all("dominant" in e for e in estimates)
    assert all(e["eigenvalue"] is None or e["eigenvalue"] >= e["dominant"] for e in estimates)


def test_hutchinson_trace_is_the_mean_of_exact_quadratic_forms():
    model = _small_model()
    x, y, batches = _data()
    exact = _exact_hessian(model, x, y, [n for n, _ in model.named_parameters()])
    got = hessian_trace(model, F.cross_entropy, batches, samples=300, generator=torch.Generator().manual_seed(5))
    # the same Rademacher probes through the exact Hessian give the same estimate...
    g = torch.Generator().manual_seed(5)
    forms = []
    for _ in range(300):
        v = torch.cat([(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).flatten() for p in model.parameters()])
        forms.append(v.double() @ exact @ v.double())
    assert got["trace"] == pytest.approx(torch.stack(forms).mean().item(), rel=1e-4, abs=1e-6)
    # ...and the estimate is unbiased: the exact trace lies within a few standard errors
    assert abs(got["trace"] - exact.trace().item()) < 4 * got["std_error"]


def test_finite_difference_products_approximate_the_exact_ones():
    model = _small_model().eval()
    _, _, batches = _data()
    params = [p for _, p in select_parameters(model)]
    hvp = HessianVectorProduct(model, batches, params, F.cross_entropy)
    v = [torch.randn_like(p) for p in params]
    exact = torch.cat([h.flatten() for h in hvp(v)])
    before = [p.detach().clone() for p in params]
    approx = torch.cat([h.flatten() for h in hvp._finite_difference(v)])
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert (approx - exact).norm() < 1e-2 * exact.norm()
    x, y, _ = _data()
    top = _top(_exact_hessian(model, x, y, [n for n, _ in model.named_parameters()]))
    got = hessian_top_eigenvalue(
        model, F.cross_entropy, batches, iters=300, hvp="finite_difference", generator=torch.Generator().manual_seed(0)
    )
    assert got["hvp"] == "finite_difference" and got["eigenvalue"] == pytest.approx(top, rel=1e-2)
    with pytest.raises(AttnlabError, match="Hessian-vector product method"):
        HessianVectorProduct(model, batches, params, F.cross_entropy, "exact")


def test_filter_normalised_direction_has_the_weights_filter_norms():
    model = create_model("se_resnet20", num_classes=3, in_chans=1)
    d = filter_normalized_direction(model, generator=torch.Generator().manual_seed(0))
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            assert not d[name].any(), name  # biases and BN excluded
        else:
            torch.testing.assert_close(d[name].flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1))
            assert not torch.allclose(d[name], p.detach())
    layer = filter_normalized_direction(
        model, generator=torch.Generator().manual_seed(0), norm="layer", ignore_bn_bias=False, params_filter="layer2.*"
    )
    for name, p in model.named_parameters():
        if name.startswith("layer2.") and p.detach().norm() > 0:
            assert layer[name].norm().item() == pytest.approx(p.detach().norm().item(), rel=1e-5)
        elif not name.startswith("layer2."):
            assert not layer[name].any()
    with pytest.raises(AttnlabError, match="selects no parameter"):
        filter_normalized_direction(model, params_filter="nothing.*")


def test_surfaces_evaluate_the_moved_weights_and_restore_them_bit_identically():
    model = _small_model()
    x, y, batches = _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    d, e = (filter_normalized_direction(model, generator=g) for _ in range(2))
    one = loss_surface_1d(model, batches, d, [-0.5, 0.0, 0.7])
    two = loss_surface_2d(model, batches, (d, e), [0.0, 0.3], [-0.2, 0.0])
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k
    assert one["loss"][1] == pytest.approx(evaluate_loss(model.eval(), batches)[0], rel=1e-6)
    moved = _small_model()
    with torch.no_grad():
        for name, p in moved.named_parameters():
            p.add_(0.3 * d[name] - 0.2 * e[name])
    assert two["loss"][0][1] == pytest.approx(evaluate_loss(moved.eval(), batches)[0], rel=1e-5)
    with pytest.raises(RuntimeError, match="boom"), perturbed_weights(model) as move:
        move([1.0], [d])
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_landscape_runs_end_to_end_and_keeps_the_weights():
    model = create_model("fmm_resnet20", num_classes=3, in_chans=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 3, (12,))
    result = landscape(model, x, y, points=3, grid=2, hessian_iters=2, trace_samples=2, per_block=True, batch_size=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(result["surface_1d"]["loss"]) == 3 and len(result["surface_2d"]["loss"]) == 2
    assert {"stem", "layer1", "layer2", "layer3", "head"} == set(result["hessian_blocks"])
    assert result["loss"] == pytest.approx(result["surface_1d"]["loss"][1], rel=1e-6)


class _OnceDifferentiable(torch.autograd.Function):
    """x ↦ x², with a backward that refuses to be differentiated (like a fused kernel without double backward)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("this backward cannot differentiate twice")
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _Squared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return _OnceDifferentiable.apply(self.fc(x.flatten(1)[:, :4]))


@pytest.mark.parametrize("generator", ["full", "factorized"])
def test_aw_models_get_exact_hessian_vector_products(generator):
    """AW layers switch to a twice-differentiable form for the HVP: the same Hv as with the slow per-sample loop."""
    torch.manual_seed(0)
    model = create_model("aw_resnet20", num_classes=3, in_chans=1, aw={"generator": generator}).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
        if hasattr(m, "attn_expand_weight"):
            nn.init.normal_(m.attn_expand_weight, std=0.3)
    model.double()  # in float32 the two orders of summation differ by rounding (~2e-5 on some seeds), not by method
    batches = [(torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2]))]
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    got = HessianVectorProduct(model, batches, params, F.cross_entropy)(v)
    assert all(m.impl == "auto" for m in model.modules() if isinstance(m, AWConv2d))  # restored afterwards
    for m in model.modules():
        if isinstance(m, AWConv2d):
            m.forward = functools.partial(reference_awconv, m)  # the per-sample loop of plain convolutions
    want = HessianVectorProduct(model, batches, params, F.cross_entropy)(v)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_a_model_without_double_backward_is_an_error_unless_differences_are_asked_for():
    model = _Squared().eval()
    batches = [(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(AttnlabError, match="need double backward.*finite_difference"):
        hessian_top_eigenvalue(model, F.cross_entropy, batches, iters=2)
    got = hessian_top_eigenvalue(model, F.cross_entropy, batches, iters=2, hvp="finite_difference")
    assert got["hvp"] == "finite_difference" and len(got["history"]) == 2


def test_hessian_vector_products_over_regrouped_batches_equal_the_per_batch_sum():
    """The HVP re-cuts the caller's batches into few large ones: the same Hv as summing batch by batch."""
    from attnlab.analysis.landscape import regrouped

    torch.manual_seed(0)
    model = create_model("se_resnet20", num_classes=3, in_chans=1).eval()
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 3, (10,))
    small = list(zip(x.split(3), y.split(3)))
    assert [len(b[1]) for b in regrouped(small, 4)] == [4, 4, 2] and regrouped(small)[0][0].shape[0] == 10
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    merged = HessianVectorProduct(model, small, params, F.cross_entropy)
    separate = HessianVectorProduct(model, small, params, F.cross_entropy)
    separate.batches = small
    assert len(merged.batches) == 1
    for got, want in zip(merged(v), separate(v)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
