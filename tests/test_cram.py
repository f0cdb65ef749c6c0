"""CRAM (attnlab.layers.cram, cram_geometry, cram_equivariance): the mask against a slow reference and its analytic
area, exact equivariance of the moments predictor, recovery of known rectangles, gradients everywhere (also at
degenerate and 1×1 maps), the apply modes, β annealing, the equivariance penalty (≈0 for an exactly equivariant model,
>0 otherwise), and cram_resnet20. CRAM's training-hook options: test_hooks.py; building on a device: test_layers.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnlab.errors import AttnlabError
from attnlab.layers import cram_equivariance as equivariance_mod
from attnlab.layers import create_attn
from attnlab.layers.cram import CRAM, anneal_beta, capture_rectangles, has_cram
from attnlab.layers.cram_equivariance import GridTransform, equivariance_penalty, random_transform
from attnlab.layers.cram_geometry import extent_matrix, pixel_centers, rectangle_from_scores, rectangle_mask
from attnlab.models import create_model

F64 = torch.float64


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_rectangles(b: int, seed: int, dtype: torch.dtype = F64) -> tuple[torch.Tensor, ...]:
    g = rng(seed)
    center = torch.rand(b, 2, generator=g, dtype=dtype) * 1.6 - 0.8
    size = torch.rand(b, 2, generator=g, dtype=dtype) * 1.5 + 0.2
    angle = (torch.rand(b, generator=g, dtype=dtype) - 0.5) * math.pi
    return center, size, angle


def captured_rectangle(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    seen = []
    handle = module.probe.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        y = module(x)
    finally:
        handle.remove()
    return y, seen[0]


# ---------------------------------------------------------------- coordinates and mask


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pixel_centers_are_affine_grid_coordinates(n):
    grid = F.affine_grid(torch.eye(2, 3, dtype=F64)[None], [1, 1, n + 1, n], align_corners=False)
    torch.testing.assert_close(pixel_centers(n, dtype=F64), grid[0, 0, :, 0], rtol=0, atol=1e-15)
    assert torch.equal(pixel_centers(n, dtype=F64), -pixel_centers(n, dtype=F64).flip(0))  # exactly antisymmetric


@settings(max_examples=15)
@given(h=st.integers(1, 9), w=st.integers(1, 9), beta=st.floats(0.5, 60), seed=st.integers(0, 10**6))
def test_mask_matches_slow_reference_and_lies_in_unit_interval(h, w, beta, seed):
    center, size, angle = random_rectangles(3, seed)
    mask = rectangle_mask(center, size, angle, h, w, beta)
    assert mask.shape == (3, 1, h, w)
    assert bool(((mask >= 0) & (mask <= 1)).all())
    ref = torch.empty(3, 1, h, w, dtype=F64)
    for b in range(3):
        (cx, cy), (sw, sh), t = center[b].tolist(), size[b].tolist(), angle[b].item()
        for i in range(h):
            for j in range(w):
                u, v = (2 * j + 1) / w - 1, (2 * i + 1) / h - 1
                along = math.cos(t) * (u - cx) + math.sin(t) * (v - cy)
                across = -math.sin(t) * (u - cx) + math.cos(t) * (v - cy)
                sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
                ref[b, 0, i, j] = sig(beta * (sw / 2 - abs(along))) * sig(beta * (sh / 2 - abs(across)))
    torch.testing.assert_close(mask, ref, rtol=1e-12, atol=1e-12)


def soft_length(side: float, beta: float) -> float:
    """∫ σ(β(side/2 − |u|)) du over the real line = (2/β)·softplus(β·side/2)."""
    return 2 / beta * math.log1p(math.exp(beta * side / 2))


@pytest.mark.parametrize("angle", [0.0, 0.4, -1.1, math.pi / 2])
@pytest.mark.parametrize("h, w", [(400, 400), (300, 440)])
def test_mask_integrates_to_the_rectangle_area(angle, h, w):
    """Σ mask over pixels = the area in pixels (normalised units are W/2 × H/2 pixels; a non-square map shears it)."""
    beta = 100.0  # an edge a few pixels wide: the Riemann sum is exact to ~1e-8, the soft excess is ~1%
    center, size = torch.tensor([[0.1, -0.15]], dtype=F64), torch.tensor([[1.0, 0.6]], dtype=F64)
    mask = rectangle_mask(center, size, torch.tensor([angle], dtype=F64), h, w, beta)
    area_px = mask.sum().item()
    pixels_per_unit_area = (w / 2) * (h / 2)
    exact = soft_length(1.0, beta) * soft_length(0.6, beta) * pixels_per_unit_area
    assert area_px == pytest.approx(exact, rel=1e-6)
    assert area_px == pytest.approx(1.0 * 0.6 * pixels_per_unit_area, rel=0.01)  # w·h in pixels, up to soft edges


# ---------------------------------------------------------------- moments predictor


def window_scores(h: int, w: int, box: tuple[int, int, int, int], seed: int, uniform: bool = False) -> torch.Tensor:
    """1×H×W float64 scores: random (or 0) inside rows y0:y1, cols x0:x1, −inf elsewhere (zero probability)."""
    y0, y1, x0, x1 = box
    scores = torch.full((1, h, w), -math.inf, dtype=F64)
    inside = torch.zeros(y1 - y0, x1 - x0, dtype=F64) if uniform else torch.randn(y1 - y0, x1 - x0, generator=rng(seed))
    scores[0, y0:y1, x0:x1] = inside.to(F64) * 2
    return scores


@st.composite
def boxes(draw, max_side: int = 10):
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
    y1, x1 = draw(st.integers(y0 + 1, h)), draw(st.integers(x0 + 1, w))
    return h, w, (y0, y1, x0, x1)


@settings(max_examples=40)
@given(
    spec=boxes(),
    flip=st.booleans(),
    turns=st.integers(0, 3),
    rotate=st.booleans(),
    seed=st.integers(0, 10**6),
    data=st.data(),
)
def test_moments_predictor_is_exactly_equivariant(spec, flip, turns, rotate, seed, data):
    h, w, box = spec
    scores = window_scores(h, w, box, seed)
    turned = GridTransform(flip, turns)(scores)
    rows, cols = torch.nonzero(turned[0].isfinite(), as_tuple=True)  # the support after flip and turns
    dy = data.draw(st.integers(-rows.min().item(), turned.shape[1] - 1 - rows.max().item()))
    dx = data.draw(st.integers(-cols.min().item(), turned.shape[2] - 1 - cols.max().item()))
    transform = GridTransform(flip, turns, (dy, dx), fill="circular")  # the support never wraps: a true translation
    center, size, angle = rectangle_from_scores(scores, rotate=rotate)
    moved_center, moved_extent = transform.move(center, extent_matrix(size, angle), turned.shape[1:], (1, 1))
    t_center, t_size, t_angle = rectangle_from_scores(transform(scores), rotate=rotate)
    torch.testing.assert_close(t_center, moved_center, rtol=0, atol=1e-12)
    torch.testing.assert_close(extent_matrix(t_size, t_angle), moved_extent, rtol=0, atol=1e-12)


@settings(max_examples=30)
@given(spec=boxes(max_side=12))
def test_uniform_scores_over_a_box_give_back_the_box(spec):
    h, w, (y0, y1, x0, x1) = spec
    center, size, angle = rectangle_from_scores(window_scores(h, w, (y0, y1, x0, x1), 0, uniform=True))
    torch.testing.assert_close(center, torch.tensor([[(x0 + x1 - w) / w, (y0 + y1 - h) / h]], dtype=F64))
    sides = torch.tensor([2 * (x1 - x0) / w, 2 * (y1 - y0) / h], dtype=F64)
    torch.testing.assert_close(size.sort(dim=1).values[0], sides.sort().values, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(extent_matrix(size, angle)[0], torch.diag(sides / 2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rotate", [True, False])
def test_moments_match_a_weighted_covariance_reference(rotate):
    """Centre = Σ p·pos; covariance = torch.cov(pos, aweights=p) + one pixel cell's; sides = 2√(3λ) of its eigh."""
    h, w = 6, 9
    scores = torch.randn(4, h, w, generator=rng(7), dtype=F64) * 2
    center, size, angle = rectangle_from_scores(scores, rotate=rotate, min_size=0.1)
    ys, xs = torch.meshgrid(pixel_centers(h, dtype=F64), pixel_centers(w, dtype=F64), indexing="ij")
    pos = torch.stack([xs.flatten(), ys.flatten()])
    for b in range(4):
        p = scores[b].flatten().softmax(0)
        cov = torch.cov(pos, aweights=p, correction=0) + torch.diag(torch.tensor([1 / w**2, 1 / h**2], dtype=F64)) / 3
        cov += torch.eye(2, dtype=F64) * 0.1**2 / 12
        torch.testing.assert_close(center[b], pos @ p, rtol=0, atol=1e-12)
        if not rotate:
            cov = torch.diag(cov.diagonal())
        lam, vecs = torch.linalg.eigh(cov)
        ref_extent = vecs @ torch.diag(torch.sqrt(3 * lam)) @ vecs.T  # R diag(w/2, h/2) Rᵀ
        torch.testing.assert_close(extent_matrix(size, angle)[b], ref_extent, rtol=0, atol=1e-12)
        sides = 2 * torch.sqrt(3 * (lam.flip(0) if rotate else cov.diagonal()))  # major axis first; else (u, v)
        torch.testing.assert_close(size[b], sides, rtol=0, atol=1e-12)


def test_whole_map_and_1x1_map_give_the_whole_map():
    for h, w in [(1, 1), (6, 6), (3, 7)]:
        center, size, angle = rectangle_from_scores(torch.zeros(2, h, w, dtype=F64))
        torch.testing.assert_close(center, torch.zeros(2, 2, dtype=F64))
        torch.testing.assert_close(size, torch.full((2, 2), 2.0, dtype=F64))


@pytest.mark.parametrize("angle", [0.35, -0.9, 1.4])
def test_moments_of_a_rotated_mask_recover_it(angle):
    """p ∝ the soft mask of a known rotated rectangle: the moments give back its centre, sides and angle."""
    center, size = torch.tensor([[0.1, -0.2]], dtype=F64), torch.tensor([[1.0, 0.4]], dtype=F64)
    mask = rectangle_mask(center, size, torch.tensor([angle], dtype=F64), 96, 96, 400.0)
    c, s, a = rectangle_from_scores(mask.log())
    torch.testing.assert_close(c, center, rtol=0, atol=1e-3)
    torch.testing.assert_close(s, size, rtol=0, atol=0.01)
    assert a.item() == pytest.approx(angle, abs=0.01)


def test_min_size_bounds_the_sides():
    scores = window_scores(16, 16, (3, 4, 5, 6), 0)  # a single pixel
    _, size, _ = rectangle_from_scores(scores, min_size=0.5)
    torch.testing.assert_close(size, torch.full((1, 2), math.hypot(2 / 16, 0.5), dtype=F64))


# ---------------------------------------------------------------- gradients and degenerate maps


def test_gradients_reach_all_five_parameters():
    center, size, angle = (t.requires_grad_() for t in random_rectangles(4, seed=1))
    target = torch.randn(4, 1, 9, 11, generator=rng(2), dtype=F64)
    (rectangle_mask(center, size, angle, 9, 11, 5.0) * target).sum().backward()
    for grad in (center.grad[:, 0], center.grad[:, 1], size.grad[:, 0], size.grad[:, 1], angle.grad):
        assert bool(grad.isfinite().all()) and bool((grad != 0).all())


def test_every_moments_output_depends_on_the_scores():
    scores = torch.randn(3, 7, 5, generator=rng(3), dtype=F64).requires_grad_()
    center, size, angle = rectangle_from_scores(scores)
    for out in (center[:, 0], center[:, 1], size[:, 0], size[:, 1], angle):
        (grad,) = torch.autograd.grad(out.sum(), scores, retain_graph=True)
        assert bool(grad.isfinite().all()) and grad.abs().amax(dim=(1, 2)).min() > 0


@pytest.mark.parametrize("shape", [(1, 1), (4, 4), (5, 5)])
def test_isotropic_scores_give_angle_zero_and_finite_gradients(shape):
    """A uniform square map has equal eigenvalues: the angle is undefined; we return 0 and a finite gradient."""
    scores = torch.zeros(2, *shape, dtype=F64, requires_grad=True)
    center, size, angle = rectangle_from_scores(scores)
    assert torch.equal(angle, torch.zeros(2, dtype=F64))
    (center.sum() + size.sum() + angle.sum()).backward()
    assert bool(scores.grad.isfinite().all())


@settings(max_examples=20)
@given(
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    predictor=st.sampled_from(["moments", "regress"]),
    apply=st.sampled_from(["mul", "residual"]),
    rotate=st.booleans(),
    score=st.sampled_from(["conv", "pool"]),
    seed=st.integers(0, 10**6),
)
def test_any_map_size_gives_finite_outputs_and_gradients(h, w, predictor, apply, rotate, score, seed):
    torch.manual_seed(seed)
    module = CRAM(6, predictor=predictor, apply=apply, rotate=rotate, score=score)
    x = torch.randn(3, 6, h, w, requires_grad=True)
    y, rect = captured_rectangle(module, x)
    assert y.shape == x.shape and bool(y.isfinite().all())
    assert rect["center"].shape == (3, 2) and rect["size"].shape == (3, 2) and rect["angle"].shape == (3,)
    assert rect["mask"].shape == (3, 1, h, w)
    y.square().sum().backward()
    assert bool(x.grad.isfinite().all())
    assert all(p.grad is not None and bool(p.grad.isfinite().all()) for p in module.parameters())


# ---------------------------------------------------------------- the module


@pytest.mark.parametrize("predictor", ["moments", "regress"])
@pytest.mark.parametrize("apply", ["mul", "residual"])
def test_module_applies_its_mask_and_every_weight_learns(predictor, apply):
    torch.manual_seed(0)
    module = create_attn("cram", 8, predictor=predictor, apply=apply)
    assert isinstance(module, CRAM)
    x = torch.randn(4, 8, 9, 7)
    y, rect = captured_rectangle(module, x)
    mask = rect["mask"]
    torch.testing.assert_close(y, x * mask if apply == "mul" else x * (1 + mask))
    torch.testing.assert_close(mask, rectangle_mask(rect["center"], rect["size"], rect["angle"], 9, 7, 10.0))
    assert bool((rect["center"].abs() < 1).all())
    if predictor == "regress":
        assert bool(((rect["size"] > 0) & (rect["size"] < 2)).all())
        assert bool((rect["angle"].abs() < math.pi / 2).all())
    (y * torch.randn_like(y)).sum().backward()
    for name, p in module.named_parameters():
        assert bool((p.grad != 0).any()), name


@pytest.mark.parametrize("score", ["conv", "pool"])
def test_moments_module_scores_with_its_conv(score):
    """The rectangle is that of sharpness·BN(conv(x)) (the 1×1 conv runs as a batched matmul: same numbers)."""
    module = CRAM(8, score=score).double().eval()
    module.score_norm.running_mean.fill_(0.3)
    module.score_norm.running_var.fill_(2.0)
    nn.init.constant_(module.score_scale, 1.7)
    x = torch.randn(3, 8, 6, 5, generator=rng(4), dtype=F64)
    _, rect = captured_rectangle(module, x)
    pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1) if score == "pool" else x
    expected = rectangle_from_scores((module.score(pooled) - 0.3) / math.sqrt(2.0 + 1e-5) * 1.7)
    for got, want in zip((rect["center"], rect["size"], rect["angle"]), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("predictor", ["moments", "regress"])
def test_bfloat16_autocast_keeps_the_activation_dtype(predictor):
    module = CRAM(8, predictor=predictor)
    x = torch.randn(2, 8, 6, 6).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, rect = captured_rectangle(module, x)
    assert y.dtype == torch.bfloat16 and rect["center"].dtype == torch.float32 and bool(y.isfinite().all())
    y.float().sum().backward()
    assert bool(x.grad.isfinite().all())


def test_module_stores_only_configuration_between_forwards():
    module = CRAM(4)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.eval()(torch.randn(2, 4, 6, 6))
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {k for k in vars(module) if isinstance(getattr(module, k), torch.Tensor)} == set()
    visited = []
    nn.Sequential(module).apply(visited.append)  # nn.Module.apply still works (no attribute shadows it)
    assert module in visited


def test_beta_is_set_annealed_and_saved():
    module = CRAM(4, beta=2.0, beta_final=32.0)
    fixed = CRAM(4, beta=5.0)
    model = nn.Sequential(module, fixed)
    for progress, expected in [(0.0, 2.0), (0.5, 8.0), (1.0, 32.0), (2.0, 32.0)]:
        anneal_beta(model, progress)
        assert module.beta.item() == pytest.approx(expected)
        assert fixed.beta.item() == 5.0  # no beta_final: fixed
    module.set_beta(12.0)
    copy = CRAM(4)
    copy.load_state_dict(module.state_dict())
    assert copy.beta.item() == 12.0
    x = torch.randn(2, 4, 5, 5)
    _, sharp = captured_rectangle(module, x)
    torch.testing.assert_close(
        sharp["mask"], rectangle_mask(sharp["center"], sharp["size"], sharp["angle"], 5, 5, 12.0)
    )


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"predictor": "moment"}, "did you mean moments"),
        ({"apply": "multiply"}, "CRAM apply mode"),
        ({"score": "pooling"}, "did you mean pool"),
        ({"beta": 0.0}, "beta must be positive"),
        ({"min_size": 2.5}, "min_size"),
        ({"kernel_size": 4}, "odd kernel_size"),
    ],
)
def test_bad_arguments_raise_one_clear_line(kwargs, words):
    with pytest.raises(AttnlabError, match=words) as info:
        CRAM(4, **kwargs)
    assert "\n" not in str(info.value)
    with pytest.raises(AttnlabError, match="beta must be positive"):
        CRAM(4).set_beta(-1.0)


# ---------------------------------------------------------------- transforms and the equivariance penalty


@settings(max_examples=30)
@given(
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    flip=st.booleans(),
    turns=st.integers(0, 3),
    shift=st.tuples(st.integers(-3, 3), st.integers(-3, 3)),
    data=st.data(),
)
def test_transform_moves_a_pixel_where_its_action_moves_its_centre(h, w, flip, turns, shift, data):
    i, j = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    image = torch.zeros(1, 1, h, w, dtype=F64)
    image[0, 0, i, j] = 1
    transform = GridTransform(flip, turns, shift, fill="circular")
    moved = transform(image)[0, 0]
    assert moved.sum() == 1
    i2, j2 = (k.item() for k in torch.nonzero(moved)[0])
    point = torch.tensor([[(2 * j + 1) / w - 1, (2 * i + 1) / h - 1]], dtype=F64)
    hh, ww = moved.shape
    center, _ = transform.move(point, torch.eye(2, dtype=F64)[None], (hh, ww), (1, 1))
    col, row = ((center[0] + 1) * torch.tensor([ww, hh], dtype=F64) / 2 - 0.5).tolist()  # back to pixel indices
    assert col == pytest.approx(round(col), abs=1e-9) and row == pytest.approx(round(row), abs=1e-9)
    assert (round(col) % ww, round(row) % hh) == (j2, i2)  # circular shift: positions modulo the map


def test_zero_fill_translation_and_random_transforms():
    x = torch.arange(1, 13, dtype=F64).view(1, 1, 3, 4)
    shifted = GridTransform(shift=(1, -2))(x)
    assert torch.equal(shifted[0, 0], torch.tensor([[0, 0, 0, 0], [3, 4, 0, 0], [7, 8, 0, 0]], dtype=F64))
    g = rng(0)
    draws = [random_transform(g, (32, 32), step=4, max_shift=0.25) for _ in range(3000)]
    assert GridTransform() not in draws  # the identity teaches nothing
    assert len(set(draws)) == 2 * 4 * 5 * 5 - 1  # every other flip × turns × shifts in {-8, -4, 0, 4, 8}²
    g = rng(0)
    assert draws[:5] == [random_transform(g, (32, 32), step=4, max_shift=0.25) for _ in range(5)]  # reproducible
    assert random_transform(rng(0), (32, 32), flips=False, rotations=False, max_shift=0.0) == GridTransform()
    only_flip = random_transform(rng(0), (32, 32), rotations=False, max_shift=0.1, step=4)
    assert only_flip == GridTransform(flip=True)


def equivariant_model(two_layers: bool) -> nn.Module:
    """CRAMs on 1×1-conv scores of a blob on a zero background: exactly equivariant (the background has no mass)."""
    crams = [CRAM(1, score="conv"), CRAM(1, score="conv", apply="residual")]
    for cram in crams:
        nn.init.ones_(cram.score.weight)
        nn.init.constant_(cram.score_scale, 1000.0)
    layers = [crams[0], nn.AvgPool2d(2), crams[1]] if two_layers else [nn.AvgPool2d(2), crams[1]]
    return nn.Sequential(*layers).double().eval()


def blob_batch(seed: int) -> torch.Tensor:
    x = torch.zeros(3, 1, 16, 16, dtype=F64)
    x[:, :, 4:12, 5:11] = torch.rand(3, 1, 8, 6, generator=rng(seed), dtype=F64) + 1
    return x


@pytest.mark.parametrize("two_layers", [False, True])
def test_penalty_vanishes_for_an_exactly_equivariant_model(two_layers):
    model = equivariant_model(two_layers)
    penalties = [equivariance_penalty(model, blob_batch(s), rng(s)).item() for s in range(12)]
    assert max(penalties) < 1e-20


def test_penalty_is_positive_and_differentiable_for_a_non_equivariant_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), CRAM(4, predictor="regress"), nn.AvgPool2d(2), CRAM(4))
    x = torch.randn(4, 1, 16, 16)
    penalty = equivariance_penalty(model, x, rng(1))
    assert penalty.dim() == 0 and penalty.item() > 1e-4
    penalty.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.isfinite().all()) and bool((p.grad != 0).any()), name


def test_penalty_reuses_the_callers_rectangles():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), CRAM(4), nn.AvgPool2d(2), CRAM(4)).eval()
    x = torch.randn(2, 1, 12, 12)
    with capture_rectangles(model) as rectangles:
        model(x)
    assert len(rectangles) == 2 and rectangles[1]["mask"].shape == (2, 1, 6, 6)
    reused = equivariance_penalty(model, x, rng(5), rectangles=rectangles)
    torch.testing.assert_close(reused, equivariance_penalty(model, x, rng(5)))
    with pytest.raises(AttnlabError, match="capture_rectangles"):
        equivariance_penalty(model, x, rng(5), rectangles=[])
    with capture_rectangles(model) as growing:  # called inside the capture (T(x)'s rectangles also land in the list)
        model(x)
        inside = equivariance_penalty(model, x, rng(5), rectangles=growing)
    torch.testing.assert_close(inside, reused)


def test_penalty_forward_on_T_x_leaves_batchnorm_running_statistics_alone():
    torch.manual_seed(0)
    model = create_model("cram_resnet20", in_chans=1).train()
    x = torch.randn(4, 1, 16, 16)
    with capture_rectangles(model) as rectangles:
        model(x)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    penalty = equivariance_penalty(model, x, rng(0), rectangles=rectangles)
    assert penalty.requires_grad
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))  # restored
    model(x)  # and a plain forward still updates them
    assert not torch.equal(before["bn1.running_mean"], model.bn1.running_mean)


def test_penalty_draws_only_the_allowed_transforms(monkeypatch):
    model = equivariant_model(False)
    x = blob_batch(0)
    seen = []
    original = equivariance_mod.random_transform
    record = lambda *a, **kw: seen.append(original(*a, **kw)) or seen[-1]  # noqa: E731
    monkeypatch.setattr(equivariance_mod, "random_transform", record)
    for s in range(30):
        equivariance_penalty(model, x, rng(s))  # default: flips and shifts, never a quarter turn
    assert all(t.turns == 0 for t in seen) and any(t.flip for t in seen) and any(t.shift != (0, 0) for t in seen)
    seen.clear()
    for s in range(30):
        equivariance_penalty(model, x, rng(s), transforms=["rot90"])
    assert all(t.turns and not t.flip and t.shift == (0, 0) for t in seen)
    with pytest.raises(AttnlabError, match="unknown equivariance transform 'rot45'"):
        equivariance_penalty(model, x, rng(0), transforms=["rot45"])


def test_penalty_is_zero_without_cram():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    assert not has_cram(model) and has_cram(nn.Sequential(model, CRAM(2)))
    penalty = equivariance_penalty(model, torch.randn(2, 1, 8, 8), rng(0))
    assert penalty.dim() == 0 and penalty.item() == 0


# ---------------------------------------------------------------- in a ResNet


@pytest.mark.parametrize("in_chans, size", [(1, (28, 28)), (3, (37, 29))])
@pytest.mark.parametrize("predictor", ["moments", "regress"])
def test_cram_resnet20_trains_every_parameter(in_chans, size, predictor):
    torch.manual_seed(0)
    model = create_model("cram_resnet20", in_chans=in_chans, zero_init_last=False, attn_kwargs={"predictor": predictor})
    crams = [m for m in model.modules() if isinstance(m, CRAM)]
    assert len(crams) == 9
    x = torch.randn(2, in_chans, *size)
    logits = model(x)
    assert logits.shape == (2, 10) and bool(logits.isfinite().all())
    logits.logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.isfinite().all()) and bool((p.grad != 0).any()), name
    model.zero_grad()
    penalty = equivariance_penalty(model, x, rng(3))
    assert penalty.dim() == 0 and bool(penalty.isfinite()) and penalty.requires_grad
    penalty.backward()
    cram_grads = [p.grad for c in crams for p in c.parameters()]
    assert all(g is not None and bool(g.isfinite().all()) for g in cram_grads)
    assert any(bool((g != 0).any()) for g in cram_grads)


@settings(max_examples=15)
@given(h=st.integers(1, 9), w=st.integers(1, 9), beta=st.floats(0.5, 60), seed=st.integers(0, 10**6))
def test_axis_aligned_mask_is_the_general_formula_at_angle_zero(h, w, beta, seed):
    """The separable form (angle=None: one sigmoid profile per axis) equals the rotated formula at θ = 0, values and
    gradients (CRAM with rotate=False uses it)."""
    center, size, _ = random_rectangles(3, seed)
    center.requires_grad_(), size.requires_grad_()
    fast = rectangle_mask(center, size, None, h, w, beta)
    plain = rectangle_mask(center, size, torch.zeros(3, dtype=F64), h, w, beta)
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(plain)
    for got, want in zip(
        torch.autograd.grad((fast * weights).sum(), (center, size)),
        torch.autograd.grad((plain * weights).sum(), (center, size)),
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
