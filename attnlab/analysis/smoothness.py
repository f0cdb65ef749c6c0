"""How smooth is a network near and in-between real samples? (FMMNet's second claim: the product makes it smoother.)

In-between: straight paths x(t) = (1 − t)·x_a + t·x_b, t on ``steps`` evenly spaced points of [0, 1], between pairs
of real test images of the same class and of different classes. Along each path (*our reading* of the metrics):

- probability curves p(t) (the whole softmax vector; plots show p of the two end labels);
- total variation TV = Σ_t ‖p(t_{i+1}) − p(t_i)‖₁ and the mean second difference ‖p(t_{i+1}) − 2p(t_i) + p(t_{i−1})‖₁
  (0 for a straight curve);
- prediction flips: how often the arg-max class changes between neighbouring points (0 for a same-class path that
  stays correct, at least 1 for a correctly classified different-class pair);
- the loss along the path against the interpolated target, ℓ(t) = (1 − t)·CE(x(t), y_a) + t·CE(x(t), y_b) — the
  mixup loss, which is the plain cross-entropy on same-class paths.

Near: at each real sample the norm of the input gradient of its loss, the Frobenius norm of the input Jacobian of the
logits (`torch.func.jacrev`, all samples and classes at once; models whose custom autograd functions torch.func cannot
transform, such as AW-convolution, fall back to one reverse pass per class), and robustness to Gaussian input noise
of standard deviation σ (in normalised-input units, i.e. multiples of the data's per-channel std): accuracy and the
rate at which the clean prediction flips, over ``draws`` noise draws per sample.

Everything runs in eval mode on whole batches (a sample's numbers do not depend on the others in its batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttnlabError
from ..stats import mean_ci

DEFAULT_SIGMAS = (0.05, 0.1, 0.2, 0.4)


def _require_eval(model: nn.Module) -> None:
    if model.training:
        raise AttnlabError("smoothness needs the model in eval mode (call model.eval())")


@torch.inference_mode()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(xb).float() for xb in x.split(batch_size)])


def sample_pairs(labels: torch.Tensor, count: int, *, same: bool, generator: torch.Generator) -> torch.Tensor:
    """``count`` random pairs of distinct indices (count×2) whose labels are equal (``same``) or different.

    Anchors are drawn uniformly from the samples that have a partner; the partner uniformly among the valid ones.
    """
    labels = labels.cpu()
    order = torch.sort(labels, stable=True).indices
    classes, counts = torch.unique(labels, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    block = torch.searchsorted(classes, labels)  # each sample's class number
    size, start = counts[block], starts[block]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(labels))
    eligible = torch.nonzero(size >= 2 if same else size < len(labels)).flatten()
    if len(eligible) == 0:
        raise AttnlabError(f"no {'same' if same else 'different'}-class pairs among {len(labels)} labels")
    a = eligible[torch.randint(len(eligible), (count,), generator=generator)]
    if same:  # another member of a's class block: a's position shifted by 1..size-1, cyclically
        shift = (torch.rand(count, generator=generator) * (size[a] - 1)).long() + 1
        b = order[start[a] + (rank[a] - start[a] + shift) % size[a]]
    else:  # a position outside a's class block
        r = (torch.rand(count, generator=generator) * (len(labels) - size[a])).long()
        b = order[torch.where(r < start[a], r, r + size[a])]
    return torch.stack([a, b], dim=1)


def path_smoothness(
    model: nn.Module,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    y_a: torch.Tensor,
    y_b: torch.Tensor,
    *,
    steps: int = 33,
    batch_size: int = 1024,
) -> dict[str, torch.Tensor]:
    """Metrics along the straight paths from each ``x_a[i]`` to ``x_b[i]`` (module docstring).

    Returns:
        ``t`` (T), ``probs`` (P×T×K), ``tv``, ``second_diff``, ``flips`` (P each), ``loss`` (P×T).
    """
    _require_eval(model)
    if steps < 3:
        raise AttnlabError(f"paths need at least 3 points, got steps={steps}")
    t = torch.linspace(0, 1, steps, device=x_a.device, dtype=x_a.dtype)
    shape = (1, steps) + (1,) * (x_a.dim() - 1)
    points = (x_a.unsqueeze(1) + t.view(shape) * (x_b - x_a).unsqueeze(1)).flatten(0, 1)  # P·T images
    logits = _logits(model, points, batch_size).view(len(x_a), steps, -1)
    probs = logits.softmax(-1)
    log_probs = logits.log_softmax(-1)
    ce_a = -log_probs.gather(2, y_a.view(-1, 1, 1).expand(-1, steps, 1)).squeeze(2)
    ce_b = -log_probs.gather(2, y_b.view(-1, 1, 1).expand(-1, steps, 1)).squeeze(2)
    tt = t.float().view(1, -1)
    first = probs.diff(dim=1)
    predicted = probs.argmax(-1)
    return {
        "t": t.float(),
        "probs": probs,
        "tv": first.abs().sum((1, 2)),
        "second_diff": first.diff(dim=1).abs().sum(2).mean(1),
        "flips": (predicted[:, 1:] != predicted[:, :-1]).sum(1).float(),
        "loss": (1 - tt) * ce_a + tt * ce_b,
    }


def input_gradient_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """‖∇ₓ CE(model(x), y)‖₂ of each sample, N."""
    _require_eval(model)
    norms = []
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        with torch.enable_grad():
            xb = xb.detach().requires_grad_(True)
            loss = F.cross_entropy(model(xb).float(), yb, reduction="sum")
            (grad,) = torch.autograd.grad(loss, xb)
        norms.append(grad.flatten(1).norm(dim=1))
    return torch.cat(norms)


def _jacobian_func(model: nn.Module, xb: torch.Tensor) -> torch.Tensor:
    # samples are independent in eval mode, so the Jacobian of the batch-summed logits holds every sample's own
    return torch.func.jacrev(lambda inp: model(inp).float().sum(0))(xb)  # K×B×C×H×W


def _jacobian_per_class(model: nn.Module, xb: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        xb = xb.detach().requires_grad_(True)
        logits = model(xb).float().sum(0)
        rows = [torch.autograd.grad(logits[k], xb, retain_graph=k + 1 < len(logits))[0] for k in range(len(logits))]
    return torch.stack(rows)


def jacobian_frobenius(
    model: nn.Module, x: torch.Tensor, *, method: str = "auto", batch_size: int = 64
) -> tuple[torch.Tensor, str]:
    """‖∂ logits / ∂x‖_F of each sample (N) and the method used.

    Args:
        method: ``"func"`` (torch.func.jacrev, vectorised over classes), ``"per_class"`` (one reverse pass per
            class), or ``"auto"``: func, falling back to per_class where torch.func cannot transform the model.
    """
    _require_eval(model)
    if method not in ("auto", "func", "per_class"):
        raise AttnlabError(f"jacobian method must be auto, func or per_class, got {method!r}")
    norms = []
    for xb in x.split(batch_size):
        if method != "per_class":
            try:
                jac = _jacobian_func(model, xb)
            except RuntimeError as e:
                if method == "func" or "autograd.Function" not in str(e):
                    raise
                method = "per_class"
        if method == "per_class":
            jac = _jacobian_per_class(model, xb)
        norms.append(jac.transpose(0, 1).flatten(1).norm(dim=1).detach())
    return torch.cat(norms), ("func" if method == "auto" else method)


@torch.inference_mode()
def noise_robustness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    *,
    draws: int = 4,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
) -> dict[float, dict[str, float]]:
    """Accuracy and flip rate (prediction ≠ clean prediction) under x + σ·ε, ε ~ N(0, 1), for each σ."""
    _require_eval(model)
    clean = _logits(model, x, batch_size).argmax(1)
    result = {}
    for sigma in sigmas:  # a handful of noise levels; each one is a batched pass over all samples and draws
        noise = torch.randn((draws, *x.shape), generator=generator).to(x.device, x.dtype)
        noisy = (x.unsqueeze(0) + float(sigma) * noise).flatten(0, 1)
        predicted = _logits(model, noisy, batch_size).argmax(1).view(draws, len(x))
        result[float(sigma)] = {
            "acc": float((predicted == y).float().mean()),
            "flip_rate": float((predicted != clean).float().mean()),
        }
    return result


def _summary(values: torch.Tensor) -> dict[str, float]:
    return mean_ci(values.detach().cpu().numpy())


def smoothness(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    pairs: int = 64,
    steps: int = 33,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    draws: int = 4,
    jacobian_images: int = 256,
    jacobian_method: str = "auto",
    seed: int = 0,
    keep_curves: bool = False,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every smoothness measure of ``model`` on ``images``/``labels`` (module docstring).

    Args:
        pairs: paths of each kind (same class, different class).
        steps: points per path.
        sigmas: noise levels in normalised-input units; draws: noise draws per sample and σ.
        jacobian_images: samples whose input Jacobian is computed (the costliest measure: one pass per class).
        jacobian_method: auto, func (torch.func, all classes at once) or per_class (one backward pass per class);
            auto falls back from func to per_class where torch.func cannot transform the model.
        seed: seed of the pairs and the noise.
        keep_curves: also return the mean probability and loss curves under ``"curves"`` (for plots).
        progress: called as ``progress(part, result so far)`` after each measure is finished.
    """

    def done(part: str) -> None:
        if progress is not None:
            progress(part, result)

    was_training = model.training
    model.eval()
    try:
        generator = torch.Generator().manual_seed(seed)
        result: dict[str, Any] = {
            "images": len(images),
            "settings": {
                "pairs": pairs,
                "steps": steps,
                "sigmas": [float(s) for s in sigmas],
                "draws": draws,
                "jacobian_images": min(jacobian_images, len(images)),
                "seed": seed,
            },
        }
        curves = {}
        for kind, same in (("same", True), ("diff", False)):
            index = sample_pairs(labels, pairs, same=same, generator=generator).to(images.device)
            a, b = index[:, 0], index[:, 1]
            path = path_smoothness(model, images[a], images[b], labels[a], labels[b], steps=steps)
            result[f"paths_{kind}"] = {m: _summary(path[m]) for m in ("tv", "second_diff", "flips")}
            result[f"paths_{kind}"]["loss_mean"] = _summary(path["loss"].mean(1))
            result[f"paths_{kind}"]["loss_max"] = _summary(path["loss"].amax(1))
            rows = torch.arange(len(a), device=path["probs"].device)
            curves[kind] = {
                "t": path["t"].cpu().numpy(),
                "p_a": path["probs"][rows, :, labels[a]].mean(0).cpu().numpy(),
                "p_b": path["probs"][rows, :, labels[b]].mean(0).cpu().numpy(),
                "loss": path["loss"].mean(0).cpu().numpy(),
            }
            done(f"paths_{kind}")
        result["input_grad_norm"] = _summary(input_gradient_norm(model, images, labels))
        done("input_grad_norm")
        n = min(jacobian_images, len(images))
        jac, used = jacobian_frobenius(model, images[:n], method=jacobian_method)
        result["jacobian_fro"] = _summary(jac)
        result["jacobian_method"] = used
        done("jacobian_fro")
        result["clean_acc"] = float((_logits(model, images, 1024).argmax(1) == labels).float().mean())
        result["noise"] = {
            str(s): v
            for s, v in noise_robustness(model, images, labels, sigmas, draws=draws, generator=generator).items()
        }
        done("noise")
        if keep_curves:
            result["curves"] = curves
        return result
    finally:
        model.train(was_training)


TV_SAME, TV_DIFF = "tv_same", "tv_diff"
"""Headline: total variation of p(true class) along same-class / different-class paths (lower is smoother)."""
SECOND_DIFF_SAME = "second_diff_same"
FLIPS_SAME, FLIPS_DIFF = "flips_same", "flips_diff"
INPUT_GRAD_NORM = "input_grad_norm"
JACOBIAN_FRO = "jacobian_fro"
NOISE_ACC_AT_0_1 = "noise_acc_at_0.1"
"""Headline: accuracy under Gaussian noise of σ = 0.1 (normalised units; one of `DEFAULT_SIGMAS`)."""
METRICS = (TV_SAME, TV_DIFF, SECOND_DIFF_SAME, FLIPS_SAME, FLIPS_DIFF, INPUT_GRAD_NORM, JACOBIAN_FRO, NOISE_ACC_AT_0_1)

_KINDS = "{kind} = same: paths between two images of one class; diff: of different classes"
METRIC_MEANINGS = {
    "tv_{kind}": "total variation of the softmax along straight paths between images, Σ‖Δp‖₁ (lower is smoother; "
    + _KINDS
    + ")",
    "second_diff_{kind}": "mean ‖second difference‖₁ of the softmax along the paths (0 for a straight curve; lower "
    "is smoother)",
    "flips_{kind}": "times the predicted class changes along a path (same: ideally 0; diff: at least 1)",
    "loss_path_{kind}": "mean loss along the paths against the interpolated target (the mixup loss)",
    INPUT_GRAD_NORM: "‖∇ₓ loss‖₂ at the real images: how fast the loss changes with the input (lower is smoother)",
    JACOBIAN_FRO: "‖∂ logits / ∂x‖_F at the real images (lower is smoother)",
    "clean_acc": "accuracy on the analysed images without noise",
    "noise_acc_at_{sigma}": "accuracy under Gaussian input noise of σ = {sigma} data standard deviations",
    "noise_flip_at_{sigma}": "share of predictions that change under noise of σ = {sigma} (lower is more robust)",
}
"""One line per headline metric: the legend of ``attnlab analyze`` and of the docs."""


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The few numbers a report quotes from a `smoothness` result."""
    out = {}
    for kind in ("same", "diff"):
        paths = result[f"paths_{kind}"]
        out[f"tv_{kind}"] = paths["tv"]["mean"]
        out[f"second_diff_{kind}"] = paths["second_diff"]["mean"]
        out[f"flips_{kind}"] = paths["flips"]["mean"]
        out[f"loss_path_{kind}"] = paths["loss_mean"]["mean"]
    out["input_grad_norm"] = result["input_grad_norm"]["mean"]
    out["jacobian_fro"] = result["jacobian_fro"]["mean"]
    out["clean_acc"] = result["clean_acc"]
    for sigma, values in result["noise"].items():
        out[f"noise_acc_at_{sigma}"] = values["acc"]
        out[f"noise_flip_at_{sigma}"] = values["flip_rate"]
    return out


__all__ = [
    "METRIC_MEANINGS",
    "DEFAULT_SIGMAS",
    "headline",
    "input_gradient_norm",
    "jacobian_frobenius",
    "noise_robustness",
    "path_smoothness",
    "sample_pairs",
    "smoothness",
]
