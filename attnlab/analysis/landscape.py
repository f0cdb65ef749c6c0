"""The loss landscape in parameter space: filter-normalised loss surfaces and Hessian spectrum estimates.

Surfaces follow Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018 (arXiv 1712.09913): a random
Gaussian direction d in parameter space, each *filter* of d (a conv weight's output slice, a linear weight's row)
rescaled to the norm of the matching filter of the weights, ‖d_i‖ = ‖w_i‖, so that a step of 1 moves every filter by
its own size whatever the scale symmetries of BatchNorm networks. 1-D parameters (biases, BN scales and shifts) are
left out by default (d = 0 there), as in the paper; ``ignore_bn_bias=False`` normalises each of them as one filter.
The loss is evaluated at w + α·d (+ β·e) with BatchNorm on its running statistics (eval mode); the weights are copied
back from a saved copy afterwards, so they end bit-identical.

Curvature comes from Hessian-vector products of the mean loss over the given batches, exact by double backward (as
PyHessian). Power iteration finds the eigenvalue of largest *magnitude*; where that one is negative (a trained network
need not sit at a minimum; docs/MEASUREMENTS.md has an example), a second iteration on H − λI finds the largest
eigenvalue, the sharpness the literature means. The trace comes from Hutchinson's estimator E[vᵀHv] with Rademacher v;
either can be restricted to a block of the parameters by a filter. AW-convolutions switch to their
twice-differentiable forms for it (`twice_differentiable`); a model that still cannot be differentiated twice is an
error, not a silent approximation:
``hvp="finite_difference"`` opts into central differences of gradients, Hv ≈ (∇L(w + εv) − ∇L(w − εv)) / 2ε with
ε = 1e-3·‖w‖ along the unit vector v — faster on CPU, but in float32 on a ReLU network the rounding of the gradients
and the kinks crossed within ε dominate (errors measured by `benchmarks/analysis_speed.py`). Exact products run over
few, large batches (`regrouped`, ``HVP_BATCH`` images each).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttnlabError, unknown_name
from ..layers.awconv import AWConv2d

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def twice_differentiable(model: nn.Module) -> Iterator[None]:
    """While active, every `AWConv2d` of ``model`` that would use its once-differentiable grouped form uses a plain
    autograd one instead (``"taps"`` when factorized, ``"unfold"`` when full): same numbers, exact second derivatives
    (Hessian-vector products by double backward). Each layer's ``impl`` is restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, AWConv2d) and m.impl in ("auto", "grouped")]
    saved = [m.impl for m in layers]
    try:
        for m in layers:
            m.impl = "taps" if m.generator == "factorized" else "unfold"
        yield
    finally:
        for m, impl in zip(layers, saved):
            m.impl = impl


ParamsFilter = str | Sequence[str] | Callable[[str, nn.Parameter], bool] | None
NORMS = ("filter", "layer")
FD_RELATIVE_STEP = 1e-3
WHICH_EIGENVALUE = ("largest", "magnitude")


def select_parameters(model: nn.Module, params_filter: ParamsFilter = None) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs chosen by ``params_filter``: None (all), shell patterns on the names (a list, or one
    comma-separated string such as ``"layer1.*,layer2.*"``), or a predicate ``(name, parameter) -> bool``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params_filter is None:
        chosen = named
    elif callable(params_filter):
        chosen = [(n, p) for n, p in named if params_filter(n, p)]
    else:
        patterns = params_filter.split(",") if isinstance(params_filter, str) else list(params_filter)
        chosen = [(n, p) for n, p in named if any(fnmatch.fnmatch(n, pat.strip()) for pat in patterns)]
    if not chosen:
        raise AttnlabError(f"parameter filter {params_filter!r} selects no parameter of the model")
    return chosen


def filter_normalized_direction(
    model: nn.Module,
    *,
    generator: torch.Generator | None = None,
    params_filter: ParamsFilter = None,
    ignore_bn_bias: bool = True,
    norm: str = "filter",
) -> dict[str, torch.Tensor]:
    """A random direction {name: tensor} over the selected parameters (zero elsewhere), filter-normalised.

    Args:
        generator: source of the Gaussian draws (CPU generator).
        params_filter: which parameters move (`select_parameters`).
        ignore_bn_bias: leave 1-D parameters (biases, BN) out, as Li et al.
        norm: ``"filter"`` (‖d_i‖ = ‖w_i‖ per filter, Li et al.) or ``"layer"`` (‖d‖ = ‖w‖ per tensor).
    """
    if norm not in NORMS:
        raise AttnlabError(f"direction norm must be one of {', '.join(NORMS)}, got {norm!r}")
    chosen = dict(select_parameters(model, params_filter))
    direction = {}
    for name, p in model.named_parameters():
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
        if name not in chosen or (ignore_bn_bias and p.dim() <= 1):
            direction[name] = torch.zeros_like(p)
            continue
        w = p.detach()
        if norm == "filter" and p.dim() > 1:
            scale = w.flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1).clamp_min(1e-12)
            direction[name] = d * scale.view(-1, *([1] * (p.dim() - 1)))
        else:
            direction[name] = d * (w.norm() / d.norm().clamp_min(1e-12))
    return direction


@contextlib.contextmanager
def perturbed_weights(model: nn.Module) -> Iterator[Callable[..., None]]:
    """Yields ``move(coefs, directions)`` that sets w = w₀ + Σ cᵢ·dᵢ; on exit every parameter is copied back from
    the saved w₀ (bit-identical, even after an exception)."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())

    @torch.no_grad()
    def move(coefs: Sequence[float], directions: Sequence[dict[str, torch.Tensor]]) -> None:
        for name, p in params.items():
            value = saved[name].clone()
            for c, d in zip(coefs, directions):
                value.add_(d[name], alpha=float(c))
            p.copy_(value)

    try:
        yield move
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output for a loss in at least float32: autocast's half-precision logits are upcast, a float64
    model keeps its precision (the exactness tests compare Hessian-vector products in float64)."""
    out = model(x)
    return out if out.dtype == torch.float64 else out.float()


@torch.inference_mode()
def evaluate_loss(model: nn.Module, batches: Batches, loss_fn: LossFn = F.cross_entropy) -> tuple[float, float]:
    """Mean loss and accuracy over ``batches`` (each batch weighted by its size)."""
    total, correct, count = 0.0, 0.0, 0
    for x, y in batches:
        logits = _logits(model, x)
        total += float(loss_fn(logits, y)) * len(y)
        correct += float((logits.argmax(1) == y).sum())
        count += len(y)
    return total / count, correct / count


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def loss_surface_1d(
    model: nn.Module,
    batches: Batches,
    direction: dict[str, torch.Tensor],
    alphas: Sequence[float],
    loss_fn: LossFn = F.cross_entropy,
) -> dict[str, list[float]]:
    """Loss and accuracy at w + α·d for each α; weights restored exactly afterwards."""
    losses, accs = [], []
    with _eval_mode(model), perturbed_weights(model) as move:
        for a in alphas:  # a few grid points, each one batched evaluation
            move([a], [direction])
            loss, acc = evaluate_loss(model, batches, loss_fn)
            losses.append(loss)
            accs.append(acc)
    return {"alpha": [float(a) for a in alphas], "loss": losses, "acc": accs}


def loss_surface_2d(
    model: nn.Module,
    batches: Batches,
    directions: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    alphas: Sequence[float],
    betas: Sequence[float],
    loss_fn: LossFn = F.cross_entropy,
) -> dict[str, Any]:
    """Loss (len(betas)×len(alphas) nested lists, rows = β) at w + α·d + β·e; weights restored exactly."""
    grid = []
    with _eval_mode(model), perturbed_weights(model) as move:
        for b in betas:
            row = []
            for a in alphas:
                move([a, b], list(directions))
                row.append(evaluate_loss(model, batches, loss_fn)[0])
            grid.append(row)
    return {"alpha": [float(a) for a in alphas], "beta": [float(b) for b in betas], "loss": grid}


def _gradient(model, batches, params, loss_fn, create_graph: bool) -> list[torch.Tensor]:
    count = sum(len(y) for _, y in batches)
    grads = None
    for x, y in batches:
        loss = loss_fn(_logits(model, x), y) * (len(y) / count)
        g = torch.autograd.grad(loss, params, create_graph=create_graph)
        grads = list(g) if grads is None else [a + b for a, b in zip(grads, g)]
    return grads


HVP_METHODS = ("auto", "double_backward", "finite_difference")
HVP_BATCH = (
    1000  # images per double-backward pass: fewer, larger passes are faster on CPU (benchmarks/analysis_speed.py)
)


def regrouped(batches: Batches, max_rows: int = HVP_BATCH) -> Batches:
    """The same images and labels, in order, re-cut into as few batches of at most ``max_rows`` as possible (the mean
    loss over all images is unchanged; in eval mode no sample depends on its batch)."""
    if len(batches) <= 1 or max_rows <= max(len(y) for _, y in batches):
        return batches
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return list(zip(x.split(max_rows), y.split(max_rows)))


class HessianVectorProduct:
    """v ↦ H v for the mean loss of ``model`` over ``batches`` w.r.t. ``params`` (eval mode).

    ``method``: ``"double_backward"`` or ``"auto"`` (the same: exact; a model that cannot be differentiated twice is
    an error), or ``"finite_difference"``: central differences of two gradients, about 2.5× faster on CPU but only an
    approximation, and a poor one for ReLU networks in float32 (module docstring).
    """

    def __init__(
        self, model: nn.Module, batches: Batches, params: list[nn.Parameter], loss_fn: LossFn, method: str = "auto"
    ):
        if method not in HVP_METHODS:
            raise unknown_name("Hessian-vector product method", method, HVP_METHODS)
        self.model, self.batches, self.params, self.loss_fn = model, regrouped(batches), params, loss_fn
        self.method = "double_backward" if method == "auto" else method

    def _exact(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        count = sum(len(y) for _, y in self.batches)
        out = [torch.zeros_like(p) for p in self.params]
        for x, y in self.batches:
            loss = self.loss_fn(_logits(self.model, x), y) * (len(y) / count)
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
            dot = sum((g * vi).sum() for g, vi in zip(grads, v))
            for acc, h in zip(out, torch.autograd.grad(dot, self.params)):
                acc.add_(h)
        return out

    def _finite_difference(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        v_norm = torch.sqrt(sum((vi * vi).sum() for vi in v))
        w_norm = torch.sqrt(sum((p.detach() ** 2).sum() for p in self.params))
        eps = float(FD_RELATIVE_STEP * w_norm.clamp_min(1.0) / v_norm.clamp_min(1e-12))
        saved = [p.detach().clone() for p in self.params]
        try:
            sides = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for p, w, vi in zip(self.params, saved, v):
                        p.copy_(w + sign * eps * vi)
                sides.append(_gradient(self.model, self.batches, self.params, self.loss_fn, create_graph=False))
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, saved):
                    p.copy_(w)
        return [(a - b) / (2 * eps) for a, b in zip(*sides)]

    def __call__(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.enable_grad(), _eval_mode(self.model):
            if self.method == "finite_difference":
                return [h.detach() for h in self._finite_difference(v)]
            try:
                with twice_differentiable(self.model):
                    return [h.detach() for h in self._exact(v)]
            except RuntimeError as e:
                if "backward" not in str(e).lower():
                    raise
                raise AttnlabError(
                    f"exact Hessian-vector products need double backward, which this model does not support "
                    f"({str(e).splitlines()[0]}); hvp='finite_difference' gives an approximation"
                ) from None


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def _power_iteration(hvp: HessianVectorProduct, v: list[torch.Tensor], iters: int, shift: float) -> list[float]:
    """Rayleigh quotients vᵀHv of ``iters`` steps of power iteration on H − shift·I from the unit vector ``v``."""
    history = []
    for _ in range(iters):  # each step is one batched Hessian-vector product
        hv = [h - shift * vi for h, vi in zip(hvp(v), v)]
        history.append(float(_dot(v, hv)) + shift)
        norm = torch.sqrt(_dot(hv, hv))
        if norm == 0:
            break
        v = [h / norm.to(h.dtype) for h in hv]
    return history


def hessian_top_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    params_filter: ParamsFilter = None,
    iters: int = 20,
    generator: torch.Generator | None = None,
    hvp: str = "auto",
    which: str = "largest",
) -> dict[str, Any]:
    """The top Hessian eigenvalue by ``iters`` steps of power iteration (twice as many where it must shift).

    Args:
        hvp: how Hessian-vector products are computed (`HessianVectorProduct`).
        which: ``"largest"`` (the algebraically largest eigenvalue, the sharpness) or ``"magnitude"`` (the eigenvalue
            of largest magnitude, what plain power iteration and PyHessian report; negative at a saddle).

    Returns:
        ``{"eigenvalue", "dominant" (the eigenvalue of largest magnitude), "history" (Rayleigh quotient per step, of
        the shifted iteration too where there was one), "iters", "params" (count), "hvp" (method)}``.
    """
    if which not in WHICH_EIGENVALUE:
        raise unknown_name("top eigenvalue", which, WHICH_EIGENVALUE)
    params = [p for _, p in select_parameters(model, params_filter)]
    hvp = HessianVectorProduct(model, batches, params, loss_fn, hvp)

    def start() -> list[torch.Tensor]:
        v = [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype) for p in params]
        norm = torch.sqrt(_dot(v, v))
        return [vi / norm.to(vi.dtype) for vi in v]

    history = _power_iteration(hvp, start(), iters, shift=0.0)
    dominant = history[-1]
    if which == "largest" and dominant < 0:  # H − λ_dominant·I is positive semidefinite: its top is λ_max − λ_dominant
        history += _power_iteration(hvp, start(), iters, shift=dominant)
    return {
        "eigenvalue": history[-1],
        "dominant": dominant,
        "history": history,
        "iters": len(history),
        "params": sum(p.numel() for p in params),
        "hvp": hvp.method,
    }


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    params_filter: ParamsFilter = None,
    samples: int = 20,
    generator: torch.Generator | None = None,
    hvp: str = "auto",
) -> dict[str, Any]:
    """Hutchinson's estimate of tr H, mean of vᵀHv over ``samples`` Rademacher vectors, with its standard error."""
    params = [p for _, p in select_parameters(model, params_filter)]
    hvp = HessianVectorProduct(model, batches, params, loss_fn, hvp)
    values = []
    for _ in range(samples):
        v = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.device, p.dtype) for p in params]
        values.append(float(_dot(v, hvp(v))))
    t = torch.tensor(values, dtype=torch.float64)
    stderr = float(t.std() / len(values) ** 0.5) if len(values) > 1 else float("nan")
    return {
        "trace": float(t.mean()),
        "std_error": stderr,
        "samples": len(values),
        "params": sum(p.numel() for p in params),
        "hvp": hvp.method,
    }


def _stage_filters(model: nn.Module) -> dict[str, str]:
    """Parameter filters for a ResNet's blocks: the stem, each stage, the head (whatever of these exists)."""
    names = [n for n, _ in model.named_parameters()]
    stages = sorted({n.split(".")[0] for n in names if n.startswith("layer")})
    stem = [n for n in names if n.split(".")[0] in ("conv1", "bn1")]
    head = [n for n in names if n.split(".")[0] == "fc"]
    out = {"stem": "conv1.*,bn1.*"} if stem else {}
    out.update({stage: f"{stage}.*" for stage in stages})
    return {**out, "head": "fc.*"} if head else out


def _batches(images: torch.Tensor, labels: torch.Tensor, n: int, batch_size: int) -> Batches:
    """The first ``n`` samples in batches of ``batch_size``."""
    return list(zip(images[:n].split(batch_size), labels[:n].split(batch_size)))


def _hessian_estimates(
    model, batches, iters: int, trace_samples: int, per_block: bool, generator, hvp: str, which: str, done
) -> None:
    """The top eigenvalue, Hutchinson trace (or None) and {block: top eigenvalue} of the loss Hessian on ``batches``,
    each handed to ``done(key, value)`` as soon as it is known."""
    kw = dict(generator=generator, hvp=hvp)
    with _eval_mode(model):
        done("hessian_top", hessian_top_eigenvalue(model, F.cross_entropy, batches, iters=iters, which=which, **kw))
        trace = None
        if trace_samples > 0:
            trace = hessian_trace(model, F.cross_entropy, batches, samples=trace_samples, **kw)
        done("hessian_trace", trace)
        blocks = {}
        for name, pattern in _stage_filters(model).items() if per_block else ():
            r = hessian_top_eigenvalue(
                model, F.cross_entropy, batches, params_filter=pattern, iters=iters, which=which, **kw
            )
            blocks[name] = {"eigenvalue": r["eigenvalue"], "dominant": r["dominant"], "params": r["params"]}
            done("hessian_blocks", dict(blocks))
        if not blocks:
            done("hessian_blocks", {})


def landscape(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    points: int = 21,
    span: float = 1.0,
    grid: int = 9,
    surface_images: int = 256,
    hessian_images: int | None = 250,
    hessian_iters: int = 10,
    eigenvalue: str = "largest",
    trace_samples: int = 5,
    per_block: bool = False,
    sharpness_step: float = 0.5,
    ignore_bn_bias: bool = True,
    norm: str = "filter",
    hvp: str = "auto",
    batch_size: int = 250,
    seed: int = 0,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Loss surfaces and Hessian estimates of ``model`` on ``images``/``labels`` (module docstring); weights are left
    bit-identical.

    Args:
        points: α values of the 1-D surface, evenly spaced in [−span, span] (over all images).
        span: the surfaces reach α, β = ±span (1 = each filter moved by its own norm).
        grid: α and β values per side of the 2-D surface (on the first ``surface_images`` images).
        surface_images: images of the 2-D surface (the first ones).
        hessian_images: images of the Hessian estimates (the first ones; None: all).
        hessian_iters: power-iteration steps; eigenvalue: which one is the top (``which`` of `hessian_top_eigenvalue`);
            trace_samples: Hutchinson probes (0 skips the trace).
        per_block: also the top eigenvalue of each block's Hessian (stem, each stage, head).
        sharpness_step: the loss rise sharpness_1d is the mean of L(w ± step·d) − L(w) along the 1-D direction.
        ignore_bn_bias: leave the 1-D parameters (biases, BatchNorm) out of the directions, as the paper does.
        norm: the directions' normalisation: ``filter`` (each filter to its weights' norm) or ``layer``.
        hvp: how Hessian-vector products are computed: auto, double_backward (exact) or finite_difference
            (`HessianVectorProduct`).
        batch_size: images per forward pass.
        progress: called as ``progress(part, result so far)`` after each part (a surface, an estimate) is finished.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(images, labels, len(images), batch_size)
    n_surface = min(surface_images, len(images))
    n_hessian = len(images) if hessian_images is None else min(hessian_images, len(images))
    result: dict[str, Any] = {
        "images": len(images),
        "settings": {
            "points": points,
            "span": span,
            "grid": grid,
            "surface_images": n_surface,
            "hessian_images": n_hessian,
            "hessian_iters": hessian_iters,
            "eigenvalue": eigenvalue,
            "trace_samples": trace_samples,
            "sharpness_step": sharpness_step,
            "ignore_bn_bias": ignore_bn_bias,
            "norm": norm,
            "hvp": hvp,
            "seed": seed,
        },
    }

    def done(key: str, value: Any) -> None:
        result[key] = value
        if progress is not None:
            progress(key, result)

    kw = dict(generator=generator, ignore_bn_bias=ignore_bn_bias, norm=norm)
    d1, d2, d3 = (filter_normalized_direction(model, **kw) for _ in range(3))
    alphas = torch.linspace(-span, span, points).tolist()
    done("surface_1d", loss_surface_1d(model, batches, d1, alphas))
    rise = loss_surface_1d(model, batches, d1, [0.0, sharpness_step, -sharpness_step])
    result["loss"] = rise["loss"][0]
    done("sharpness_1d", (rise["loss"][1] + rise["loss"][2]) / 2 - rise["loss"][0])
    steps = torch.linspace(-span, span, grid).tolist()
    done("surface_2d", loss_surface_2d(model, _batches(images, labels, n_surface, batch_size), (d2, d3), steps, steps))
    hessian_batches = _batches(images, labels, n_hessian, batch_size)
    _hessian_estimates(
        model, hessian_batches, hessian_iters, trace_samples, per_block, generator, hvp, eigenvalue, done
    )
    return result


HESSIAN_TOP_EIG = "hessian_top_eig"
"""Headline: the largest Hessian eigenvalue of the loss (sharpness; lower is flatter)."""
SHARPNESS_1D = "sharpness_1d"
LOSS = "loss"
METRICS = (HESSIAN_TOP_EIG, SHARPNESS_1D, LOSS)

METRIC_MEANINGS = {
    HESSIAN_TOP_EIG: "largest eigenvalue of the loss Hessian (curvature in the sharpest direction; lower is flatter)",
    SHARPNESS_1D: "mean loss rise one half-step (sharpness_step) along a random filter-normalised direction, both "
    "ways (lower is flatter)",
    LOSS: "the loss at the trained weights on the analysed images",
    "hessian_trace": "Hutchinson estimate of the Hessian's trace (total curvature; lower is flatter)",
    "hessian_top_eig_{block}": "largest Hessian eigenvalue of the parameters of {block} alone",
}
"""One line per headline metric: the legend of ``attnlab analyze`` and of the docs."""


def _largest(estimate: dict[str, Any]) -> float:
    """The largest eigenvalue of an estimate; NaN where it is not a number (a saved JSON holds null for NaN)."""
    value = estimate["eigenvalue"]
    return math.nan if value is None else value


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The few numbers a report quotes from a `landscape` result."""
    out = {
        "hessian_top_eig": _largest(result["hessian_top"]),
        "sharpness_1d": result["sharpness_1d"],
        "loss": result["loss"],
    }
    if result["hessian_trace"] is not None:
        out["hessian_trace"] = result["hessian_trace"]["trace"]
    for name, block in result["hessian_blocks"].items():
        out[f"hessian_top_eig_{name}"] = _largest(block)
    return out


__all__ = [
    "METRIC_MEANINGS",
    "HessianVectorProduct",
    "headline",
    "landscape",
    "evaluate_loss",
    "filter_normalized_direction",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "loss_surface_1d",
    "loss_surface_2d",
    "perturbed_weights",
    "select_parameters",
]
