"""AW-convolution's fused autograd functions: the batch folded into the groups of ONE convolution, with the
weight-shaped memory kept down.

``conv(x_b, A_b ⊙ W)`` for every sample b runs as one grouped convolution (input 1×(B·C_in)×H×W, per-sample weights
(B·C_out)×C_in×k×k, groups=B). Plain autograd would keep the per-sample weights A ⊙ W alive for backward, one
weight-shaped tensor per layer; these functions keep only A (the full generator, gated in place in the logits'
memory) or only its two factors (the factorized one) and rebuild the rest in backward. They are once differentiable
and refuse double backward loudly (`awconv`'s plain forms are the ones for second derivatives).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._compat import convolution_backward, softmax_backward_data


def gate_spec(gate: str, kernel_size: list[int]) -> tuple[str, float]:
    """A gate as (elementwise base, constant scale): A = scale · base(z)."""
    return {
        "sigmoid2": ("sigmoid", 2.0),
        "sigmoid": ("sigmoid", 1.0),
        "softmax_kernel": ("softmax", float(kernel_size[0] * kernel_size[1])),
        "linear": ("linear", 1.0),
    }[gate]


def _gate_(z: torch.Tensor, base: str, scale: float) -> torch.Tensor:
    """A = scale · base(z), in z's memory where the gate allows (no autograd: inside the fused function)."""
    if base == "sigmoid":
        return z.sigmoid_() if scale == 1 else z.sigmoid_().mul_(scale)
    if base == "softmax":
        taps = z.flatten(-2)
        taps.sub_(taps.amax(-1, keepdim=True)).exp_()
        taps.mul_(scale / taps.sum(-1, keepdim=True))
        return z
    return z.add_(1)


def _gate_backward_(grad: torch.Tensor, attn: torch.Tensor, base: str, scale: float) -> torch.Tensor:
    """d(loss)/dz from d(loss)/dA and A alone; overwrites ``grad``."""
    if base == "sigmoid":  # dA/dz = A (1 - A / scale)
        return grad.mul_(attn).addcmul_(grad, attn, value=-1 / scale)
    if base == "softmax":
        y = (attn / scale).flatten(-2)
        return softmax_backward_data(grad.mul_(scale).flatten(-2), y, -1, y.dtype).view_as(attn)
    return grad


def _refuse_double_backward() -> None:
    """Backward runs with grad mode on only under ``create_graph=True``; our backward is not differentiable, and
    ``once_differentiable`` would let second derivatives through AW silently drop out instead of failing."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "AWConv2d cannot differentiate twice (create_graph=True): its backward is once differentiable"
        )


def grouped_conv(x: torch.Tensor, weights: torch.Tensor, geometry: tuple) -> torch.Tensor:
    """conv(x_b, weights_b) for every sample b as ONE convolution: the batch folded into the groups."""
    stride, padding, dilation, groups = geometry
    b = x.shape[0]
    # the folded batch runs in NCHW; the result goes back to the input's layout, so that a channels-last network
    # stays channels-last around this layer (mixed layouts downstream cost more than this copy)
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    x, weights = x.contiguous(), weights.contiguous()
    out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), weights.flatten(0, 1), None, stride, padding, dilation, b * groups)
    out = out.view(b, -1, *out.shape[2:])
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _grouped_conv_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, geometry: tuple, need_x: bool, need_weights: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of `grouped_conv` for x (B×C_in×H×W) and the per-sample weights (B×C_out×C_in/groups×k×k)."""
    stride, padding, dilation, groups = geometry
    dtype = grad_out.dtype  # under autocast the convolution ran in grad_out's dtype
    grad_out, x, weights = grad_out.contiguous(), x.contiguous(), weights.contiguous()
    grad_x, grad_weights, _ = convolution_backward(
        grad_out.reshape(1, -1, *grad_out.shape[2:]),
        x.reshape(1, -1, *x.shape[2:]).to(dtype),
        weights.to(dtype).flatten(0, 1),
        None,
        list(stride),
        list(padding),
        list(dilation),
        False,
        [0, 0],
        x.shape[0] * groups,
        [need_x, need_weights, False],
    )
    grad_x = grad_x.view(x.shape) if need_x else None
    grad_weights = grad_weights.view(weights.shape).to(weights.dtype) if need_weights else None
    return grad_x, grad_weights


class AWConvFunction(torch.autograd.Function):
    """(x, z, W) ↦ (conv(x_b, A_b ⊙ W) for every sample b, A) with A = gate(z) computed in z's memory.

    z is the full generator's output, B × C_out·C_in/groups × k × k. Saves x, A and W only: A ⊙ W is rebuilt in
    backward and the gate's derivative is taken from A, so one weight-shaped tensor per layer outlives the forward.
    """

    @staticmethod
    def forward(ctx, x, logits, weight, gate, geometry):
        attn = _gate_(logits, *gate)
        ctx.mark_dirty(logits)
        out = grouped_conv(x, weight * attn.view(-1, *weight.shape), geometry)
        ctx.save_for_backward(x, attn, weight)
        ctx.gate, ctx.geometry = gate, geometry
        ctx.set_materialize_grads(False)
        return out, attn

    @staticmethod
    def backward(ctx, grad_out, grad_attn_seen):
        _refuse_double_backward()
        x, attn_as_output, weight = ctx.saved_tensors
        attn = attn_as_output.view(-1, *weight.shape)
        need_x, need_logits, need_weight = ctx.needs_input_grad[:3]
        grad_x = grad_weight = grad_attn = None
        if grad_out is not None:  # None when only the attention itself was used downstream
            weights = weight * attn
            grad_x, grad_weights = _grouped_conv_backward(
                grad_out, x, weights, ctx.geometry, need_x, need_logits or need_weight
            )
            if need_weight:  # the per-sample weights are no longer needed: reuse their memory
                grad_weight = torch.mul(grad_weights, attn, out=weights).sum(0)
            if need_logits:
                grad_attn = grad_weights.mul_(weight)
        if need_logits and grad_attn_seen is not None:  # a loss on A itself (through the probe)
            grad_attn_seen = grad_attn_seen.reshape(attn.shape)
            grad_attn = grad_attn_seen.clone() if grad_attn is None else grad_attn.add_(grad_attn_seen)
        grad_logits = None
        if grad_attn is not None:
            grad_logits = _gate_backward_(grad_attn, attn, *ctx.gate).reshape(attn_as_output.shape)
        return grad_x, grad_logits, grad_weight, None, None


class FactorizedAWConvFunction(torch.autograd.Function):
    """(x, a_out, a_in, W) ↦ conv(x_b, (a_out_b ⊗ a_in_b) ⊙ W) for every sample b, with gated factors
    a_out (B × C_out × k × k) and a_in (B × C_in/groups × k × k).

    Saves only x, the factors and W: no weight-shaped tensor outlives the forward.
    """

    @staticmethod
    def forward(ctx, x, attn_out, attn_in, weight, geometry):
        ctx.save_for_backward(x, attn_out, attn_in, weight)
        ctx.geometry = geometry
        return grouped_conv(x, _factorized_weights(weight, attn_out, attn_in), geometry)

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward()
        x, attn_out, attn_in, weight = ctx.saved_tensors
        need_x, need_out, need_in, need_weight = ctx.needs_input_grad[:4]
        weights = _factorized_weights(weight, attn_out, attn_in)
        attn_out, attn_in = attn_out.unsqueeze(2), attn_in.unsqueeze(1)
        grad_x, grad_weights = _grouped_conv_backward(
            grad_out, x, weights, ctx.geometry, need_x, need_out or need_in or need_weight
        )
        grad_factor_out = grad_factor_in = grad_weight = None
        buffer = weights  # reused for every weight-shaped temporary below
        if need_weight:
            grad_weight = torch.mul(grad_weights, attn_out, out=buffer).mul_(attn_in).sum(0)
        if need_out or need_in:
            grad_attn = grad_weights.mul_(weight)
            if need_out:
                grad_factor_out = torch.mul(grad_attn, attn_in, out=buffer).sum(2)
            if need_in:
                grad_factor_in = torch.mul(grad_attn, attn_out, out=buffer).sum(1)
        return grad_x, grad_factor_out, grad_factor_in, grad_weight, None


def _factorized_weights(weight: torch.Tensor, attn_out: torch.Tensor, attn_in: torch.Tensor) -> torch.Tensor:
    """Per-sample weights (a_out ⊗ a_in) ⊙ W, B × C_out × C_in/groups × k × k, with one allocation."""
    return (weight * attn_out.unsqueeze(2)).mul_(attn_in.unsqueeze(1))


__all__ = ["AWConvFunction", "FactorizedAWConvFunction", "gate_spec", "grouped_conv"]
