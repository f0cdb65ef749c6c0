"""How much each unit after a gate matters for the true class: ablation, gradient × activation, captum.

All three measure the same thing, the rise of the true-class loss −log p_y when a unit's gated features are removed,
and are positive for units that help:

- `ablation_importance`: the exact rise. Every (sample, unit) pair is one row of an expanded batch: the network runs
  normally up to the site, the site's output is repeated once per unit with that unit zeroed (many masks per forward
  pass), and only the rest of the network runs on the expanded batch. In our residual blocks the shortcut joins the
  gated branch at the block's ``merge``, so the shortcut is repeated there too.
- `gradient_x_activation`: the first-order Taylor estimate of the same rise, −Σ_unit a·∂ℓ/∂a, for every site at once
  from one backward pass.
- `captum_importance`: captum's `LayerIntegratedGradients` of log p_y at the site's output (optional dependency),
  summed per unit; it integrates from the activation of an all-zero input (captum's baseline) to the real one.

The model must be in eval mode (BatchNorm on running statistics), so every sample's numbers are independent of the
batch it is computed in.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttnlabError
from .sites import GateSite, keep_masks, unit_sums

DEFAULT_MAX_ROWS = 4096  # expanded rows (samples × units) per forward pass of the ablation


def _require_eval(model: nn.Module) -> None:
    if model.training:
        raise AttnlabError("importance needs the model in eval mode (model.eval()): BatchNorm must not mix samples")


def _enclosing_merge(model: nn.Module, site: GateSite) -> nn.Module | None:
    """The ``merge`` module of the nearest residual block around ``site`` (None outside such a block)."""
    parts = site.path.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        parent = model.get_submodule(".".join(parts[:depth])) if depth else model
        merge = getattr(parent, "merge", None)
        if isinstance(merge, nn.Module):
            return merge
    return None


def _enclosing(model: nn.Module, module: nn.Module) -> list[nn.Module]:
    """The modules enclosing ``module`` (its parent first), ending with ``model``."""
    path = next(p for p, m in model.named_modules() if m is module)
    parts = path.split(".") if path else []
    return [model.get_submodule(".".join(parts[:depth])) for depth in range(len(parts) - 1, -1, -1)]


@contextlib.contextmanager
def _expanded_at(
    model: nn.Module, site: GateSite, masks: torch.Tensor, batch: int, at: nn.Module | None = None
) -> Iterator[None]:
    """While active, ``site``'s output (``batch`` samples) is replaced by batch·U rows, row (n, u) = sample n with
    ``masks[u]`` applied; the enclosing block's shortcut is repeated to match. ``at``: an enclosing module (or the
    model) whose input is repeated instead, every row computed from there, for blocks with no ``merge`` module to
    repeat the shortcut at (timm's and torchvision's own blocks)."""
    units = masks.shape[0]
    if at is not None:

        def mask_rows(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            rows = out.view(batch, units, *out.shape[1:]) * masks.to(out.dtype).unsqueeze(0)
            return rows.flatten(0, 1)

        def repeat_input(_module: nn.Module, args: tuple) -> tuple:
            return tuple(
                a.repeat_interleave(units, 0) if isinstance(a, torch.Tensor) and a.shape[0] == batch else a
                for a in args
            )

        handles = [at.register_forward_pre_hook(repeat_input), site.module.register_forward_hook(mask_rows)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        return

    def expand_output(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        return (out.unsqueeze(1) * masks.to(out.dtype).unsqueeze(0)).flatten(0, 1)

    def expand_shortcut(_module: nn.Module, args: tuple) -> tuple:
        return tuple(
            a.repeat_interleave(units, 0) if isinstance(a, torch.Tensor) and a.shape[0] == batch else a for a in args
        )

    handles = [site.module.register_forward_hook(expand_output)]
    merge = _enclosing_merge(model, site)
    if merge is not None and units > 1:
        handles.append(merge.register_forward_pre_hook(expand_shortcut))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _foldable(conv: object, bn: object) -> bool:
    """A plain Conv2d (not a subclass such as AWConv2d) followed by a BatchNorm2d with running statistics."""
    return type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.running_mean is not None


def inference_copy(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True) -> nn.Module:
    """A copy of ``model`` (eval mode) that runs the ablation faster on CPU and computes the same function up to float
    rounding: every BatchNorm right after a plain convolution (``convN``/``bnN`` pairs of a block, ``(conv, bn)`` in a
    Sequential such as a downsample) folded into that convolution (~1.3×), and channels-last memory layout (~1.6×).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    work = copy.deepcopy(model).eval()
    if fold_bn:
        for module in list(work.modules()):
            for i in (1, 2, 3):
                conv, bn = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
                if _foldable(conv, bn):
                    setattr(module, f"conv{i}", fuse_conv_bn_eval(conv, bn))
                    setattr(module, f"bn{i}", nn.Identity())
            if isinstance(module, nn.Sequential):
                for i in range(len(module) - 1):
                    if _foldable(module[i], module[i + 1]):
                        module[i] = fuse_conv_bn_eval(module[i], module[i + 1])
                        module[i + 1] = nn.Identity()
    return work.to(memory_format=torch.channels_last) if channels_last else work


def _site_shape(model: nn.Module, site: GateSite, x: torch.Tensor) -> tuple[int, ...]:
    shape: list[tuple[int, ...]] = []
    handle = site.module.register_forward_hook(lambda _m, _i, out: shape.append(tuple(out.shape[1:])))
    try:
        with torch.inference_mode():
            model(x[:1])
    finally:
        handle.remove()
    return shape[0]


@torch.inference_mode()
def true_class_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Per-sample cross-entropy −log p_y, N."""
    return torch.cat(
        [F.cross_entropy(model(xb), yb, reduction="none") for xb, yb in zip(x.split(batch_size), y.split(batch_size))]
    )


def ablation_importance(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    site: GateSite,
    *,
    grid: int | None = 8,
    max_rows: int = DEFAULT_MAX_ROWS,
    base_loss: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rise of −log p_y when each unit of ``site`` is zeroed after its gate, N×U.

    Args:
        model: in eval mode.
        x: N input images; y: their labels.
        site: from `gate_sites`.
        grid: cells per side for position units (see `attnlab.analysis.sites`).
        max_rows: expanded rows (samples × units) per forward pass; bounds memory.
        base_loss: −log p_y of the unablated model (computed if not given).
    """
    _require_eval(model)
    masks = keep_masks(site, _site_shape(model, site, x), grid).to(x.device)
    units = masks.shape[0]
    if base_loss is None:
        base_loss = true_class_loss(model, x, y)
    step = max(1, max_rows // units)
    rises = []
    # where the expanded rows start: at the site (its block's merge repeats the shortcut), else at the input of the
    # nearest enclosing module that runs (a shortcut taken outside it fails on the batch size), up to the model's
    levels, level = [None, *_enclosing(model, site.module)], 0
    with torch.inference_mode():
        for xb, yb, lb in zip(x.split(step), y.split(step), base_loss.split(step)):
            while True:
                with _expanded_at(model, site, masks, len(xb), at=levels[level]):
                    try:
                        logits = model(xb)
                        break
                    except RuntimeError as e:
                        if level == len(levels) - 1:
                            raise AttnlabError(
                                f"cannot ablate {site.path}: its output does not reach the loss as one batch "
                                f"({str(e).splitlines()[0]})"
                            ) from None
                        level += 1
            if logits.shape[0] != len(xb) * units:
                raise AttnlabError(f"cannot ablate {site.path}: expected {len(xb) * units} rows, got {logits.shape[0]}")
            loss = F.cross_entropy(logits.float(), yb.repeat_interleave(units), reduction="none")
            rises.append(loss.view(len(xb), units) - lb[:, None])
    return torch.cat(rises)


def gradient_x_activation(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sites: list[GateSite],
    *,
    grid: int | None = 8,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """First-order estimate of the ablation rise, −Σ_unit a ⊙ ∂(−log p_y)/∂a, for every site: {path: N×U}."""
    _require_eval(model)
    if not sites:
        return {}
    result: dict[str, list[torch.Tensor]] = {s.path: [] for s in sites}
    outputs: dict[str, torch.Tensor] = {}

    def keep(site: GateSite):
        def hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            if not out.requires_grad:  # nothing before the site learns (a hand-built gate): differentiate from here
                out = out.detach().requires_grad_()
            outputs[site.path] = out
            return out.clone()  # later in-place ops (ReLU) must not alter the tensor we differentiate against

        return hook

    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        handles = [s.module.register_forward_hook(keep(s)) for s in sites]
        try:
            with torch.enable_grad():
                loss = F.cross_entropy(model(xb), yb, reduction="sum")
                grads = torch.autograd.grad(loss, [outputs[s.path] for s in sites])
        finally:
            for h in handles:
                h.remove()
        for site, grad in zip(sites, grads):
            result[site.path].append(unit_sums(-(outputs[site.path].detach() * grad), site, grid))
    return {path: torch.cat(parts) for path, parts in result.items()}


def captum_available() -> bool:
    """Whether the optional captum package can be imported."""
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        return False
    return True


def captum_importance(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    site: GateSite,
    *,
    grid: int | None = 8,
    steps: int = 8,
    batch_size: int = 64,
) -> torch.Tensor:
    """captum's layer integrated gradients of log p_y at ``site``'s output, summed per unit: N×U."""
    _require_eval(model)
    from captum.attr import LayerIntegratedGradients

    def log_probs(inputs: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model(inputs), dim=1)

    method = LayerIntegratedGradients(log_probs, site.module)
    parts = []
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        attributions = method.attribute(xb, target=yb, n_steps=steps, internal_batch_size=batch_size * steps)
        parts.append(unit_sums(attributions.detach().float(), site, grid))
    return torch.cat(parts)


__all__ = [
    "DEFAULT_MAX_ROWS",
    "inference_copy",
    "ablation_importance",
    "captum_available",
    "captum_importance",
    "gradient_x_activation",
    "true_class_loss",
]
