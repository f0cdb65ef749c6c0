"""AW-convolution: attention shaped like the convolution weight, computed per sample from the input.

Zhu et al., "An Attention Module for Convolutional Neural Networks", ICANN 2021, arXiv 2108.08205. The abstract says
the attention map has the shape of the weight (C_out × C_in × k × k) rather than of the activation, so that
``conv(x ⊙ A, W) = conv(x, A ⊙ W)``: every filter re-weights every (input channel, kernel offset) of its own, per
sample. Only the abstract is available; everything it does not state is *our reading*:

- Generator: average-pool the input to the kernel's k×k grid (one pooled value per kernel offset), a 1×1 conv
  C_in → hidden, ReLU, and a 1×1 map to the logits at each of the k×k offsets. ``generator="full"`` (default, the
  literal reading: one attention value per weight entry) emits C_out·C_in logits per offset; ``"factorized"`` emits a
  C_out and a C_in factor per offset, gates each, and multiplies them as an outer product — rank one over the
  channels, hidden·(C_out + C_in) parameters instead of hidden·C_out·C_in (resnet20: +54% parameters with "full", +3%
  with "factorized"). The full map is the literal reading of "the shape of the weight" and of the paper's capacity
  argument; the factorized one is the affordable reading (see the memory and speed notes of `AWConv2d`).
- Gate, logits z → A: ``"sigmoid2"`` (default) 2σ(z), in (0, 2), 1 at z = 0; ``"sigmoid"`` σ(z), SE's gate, 0.5 at
  z = 0; ``"softmax_kernel"`` k²·softmax of z over the k×k offsets of each (C_out, C_in) pair — it moves a filter's mass
  between its taps, 1 on average; ``"linear"`` 1 + z, no squashing.
- Init: the generator's last layer starts at zero, so at init A = gate(0) everywhere and the layer computes exactly the
  plain convolution times that constant — 1 for every gate except ``"sigmoid"`` (0.5, or 0.25 factorized) — so
  swapping it into a trained or freshly initialised network changes nothing until it learns.

The batch runs as ONE grouped convolution with the samples folded into the groups (input 1×(B·C_in)×H×W, per-sample
weights (B·C_out)×C_in×k×k, groups=B), never as a loop over samples. Two custom autograd functions keep the
weight-shaped memory down: the full generator keeps only A for backward (A ⊙ W is rebuilt there, and the gate runs in
place on the generator's output and is differentiated from A), the factorized one keeps only its two small factors.
Double backward (``create_graph=True``) is not supported and raises.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttnlabError, unknown_name
from .hooks import StepHook, register_training_hook
from .probe import AttentionProbe

GATES = ("sigmoid2", "sigmoid", "softmax_kernel", "linear")
GENERATORS = ("full", "factorized")


def _gate_spec(gate: str, kernel_size: list[int]) -> tuple[str, float]:
    """A gate as (elementwise base, constant scale): A = scale · base(z)."""
    return {
        "sigmoid2": ("sigmoid", 2.0),
        "sigmoid": ("sigmoid", 1.0),
        "softmax_kernel": ("softmax", float(kernel_size[0] * kernel_size[1])),
        "linear": ("linear", 1.0),
    }[gate]


def weight_gate(logits: torch.Tensor, gate: str) -> torch.Tensor:
    """A = gate(logits) with plain autograd ops; the last two dims of ``logits`` are the k×k kernel offsets."""
    if not torch.jit.is_scripting():  # (scripted, an unknown gate fails in the lookup below)
        if gate not in GATES:
            raise unknown_name("AW gate", gate, GATES)
    base, scale = _gate_spec(gate, logits.shape[-2:])
    if base == "sigmoid":
        return scale * torch.sigmoid(logits)
    if base == "softmax":
        return scale * torch.softmax(logits.flatten(-2), dim=-1).view_as(logits)
    return 1 + logits


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
        return torch._softmax_backward_data(grad.mul_(scale).flatten(-2), y, -1, y.dtype).view_as(attn)
    return grad


def _refuse_double_backward() -> None:
    """Backward runs with grad mode on only under ``create_graph=True``; our backward is not differentiable, and
    ``once_differentiable`` would let second derivatives through AW silently drop out instead of failing."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "AWConv2d cannot differentiate twice (create_graph=True): its backward is once differentiable"
        )


def _grouped_conv(x: torch.Tensor, weights: torch.Tensor, geometry: tuple) -> torch.Tensor:
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
    """Gradients of `_grouped_conv` for x (B×C_in×H×W) and the per-sample weights (B×C_out×C_in/groups×k×k)."""
    stride, padding, dilation, groups = geometry
    dtype = grad_out.dtype  # under autocast the convolution ran in grad_out's dtype
    grad_out, x, weights = grad_out.contiguous(), x.contiguous(), weights.contiguous()
    grad_x, grad_weights, _ = torch.ops.aten.convolution_backward(
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


class _AWConvFunction(torch.autograd.Function):
    """(x, z, W) ↦ (conv(x_b, A_b ⊙ W) for every sample b, A) with A = gate(z) computed in z's memory.

    z is the full generator's output, B × C_out·C_in/groups × k × k. Saves x, A and W only: A ⊙ W is rebuilt in
    backward and the gate's derivative is taken from A, so one weight-shaped tensor per layer outlives the forward.
    """

    @staticmethod
    def forward(ctx, x, logits, weight, gate, geometry):
        attn = _gate_(logits, *gate)
        ctx.mark_dirty(logits)
        out = _grouped_conv(x, weight * attn.view(-1, *weight.shape), geometry)
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


class _FactorizedAWConvFunction(torch.autograd.Function):
    """(x, a_out, a_in, W) ↦ conv(x_b, (a_out_b ⊗ a_in_b) ⊙ W) for every sample b, with gated factors
    a_out (B × C_out × k × k) and a_in (B × C_in/groups × k × k).

    Saves only x, the factors and W: no weight-shaped tensor outlives the forward.
    """

    @staticmethod
    def forward(ctx, x, attn_out, attn_in, weight, geometry):
        ctx.save_for_backward(x, attn_out, attn_in, weight)
        ctx.geometry = geometry
        return _grouped_conv(x, _factorized_weights(weight, attn_out, attn_in), geometry)

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


class AWConv2d(nn.Conv2d):
    """A Conv2d whose weight is re-weighted per sample by attention computed from the input: conv(x, A ⊙ W).

    Memory: the per-sample weights cost B·C_out·(C_in/groups)·k² values per layer — linear in the batch, quadratic in
    the width, independent of H×W. In resnet20 at batch 128 the nine AW conv2 layers (three each of 16→16, 32→32,
    64→64, 3×3) come to 128·9·3·(16² + 32² + 64²) = 18.6 M values (74 MB in fp32) per weight-shaped tensor; a
    64→64 layer on 8×8 maps holds 4.7 M values of per-sample weights against 0.5 M of activation. With the full
    generator backward keeps one such tensor per layer (A): measured by ``benchmarks/aw_speed_memory.py``, aw_resnet20
    keeps 264 MB for backward against resnet20's 192 MB (1.38×); the factorized generator keeps only its factors
    (199 MB, 1.04×) and builds the per-sample weights transiently. At ImageNet widths the transient cost dominates:
    one 512→512 3×3 layer at batch 256 is 604 M values (2.4 GB) per copy, against 6.4 M for its 7×7 activation.

    Speed (same benchmark, one CPU thread): a training step of aw_resnet20 at batch 256 takes about 1.5× resnet20's
    with the factorized generator and 1.5–1.9× with the full one. The grouped convolution costs about twice the plain
    one at 64 channels; the rest is passes over weight-shaped tensors, and glibc's malloc makes each fresh tensor over
    32 MB (here 256·64·64·9 floats) page-fault anew — ``MALLOC_MMAP_MAX_=0`` or jemalloc/tcmalloc remove that part.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as `nn.Conv2d`
            (``padding_mode`` must be ``"zeros"``, and the padding symmetric).
        reduction: the generator's hidden width is ``max(in_channels // reduction, min_hidden)``.
        min_hidden: the smallest hidden width.
        gate: ``"sigmoid2"`` (default), ``"sigmoid"``, ``"softmax_kernel"`` or ``"linear"`` (module docstring).
        generator: ``"full"`` (C_out·C_in logits per kernel offset) or ``"factorized"`` (outer product of a C_out
            and a C_in factor).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        *,
        reduction: int = 16,
        min_hidden: int = 8,
        gate: str = "sigmoid2",
        generator: str = "full",
        device: Any = None,
        dtype: Any = None,
    ):
        if padding_mode != "zeros":
            raise AttnlabError(f"AWConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        if gate not in GATES:
            raise unknown_name("AW gate", gate, GATES)
        if generator not in GENERATORS:
            raise unknown_name("AW generator", generator, GENERATORS)
        if reduction < 1 or min_hidden < 1:
            raise AttnlabError(f"AWConv2d needs reduction >= 1 and min_hidden >= 1, got {reduction} and {min_hidden}")
        if min(in_channels, out_channels, groups) < 1 or in_channels % groups or out_channels % groups:
            raise AttnlabError(
                f"AWConv2d needs positive channel counts divisible by groups, got in_channels={in_channels}, "
                f"out_channels={out_channels}, groups={groups}"
            )
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, "zeros", device, dtype
        )
        left, right, top, bottom = self._reversed_padding_repeated_twice
        if left != right or top != bottom:
            raise AttnlabError(f"AWConv2d needs symmetric padding; padding={padding!r} pads unevenly here")
        if gate == "softmax_kernel" and self.kernel_size == (1, 1):
            raise AttnlabError("AW gate 'softmax_kernel' needs kernel_size > 1 (over a single tap it is constant 1)")
        self._explicit_padding = (top, left)
        self.gate = gate
        self.generator = generator
        self.hidden = max(in_channels // reduction, min_hidden)
        in_per_group = in_channels // groups
        n_logits = out_channels * in_per_group if generator == "full" else out_channels + in_per_group
        factory = {"device": device, "dtype": dtype}
        self.attn_reduce = nn.Conv2d(in_channels, self.hidden, 1, **factory)
        self.attn_act = nn.ReLU(inplace=True)
        # the last 1×1 conv starts at zero (A = gate(0)); plain parameters, not an nn.Conv2d, so that network-wide
        # conv inits (timm's ResNet, ours: kaiming on every nn.Conv2d) leave that zero alone
        self.attn_expand_weight = nn.Parameter(torch.zeros(n_logits, self.hidden, 1, 1, **factory))
        self.attn_expand_bias = nn.Parameter(torch.zeros(n_logits, **factory))
        self.probe = AttentionProbe("weight")

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **kwargs: Any) -> AWConv2d:
        """An AWConv2d with ``conv``'s geometry, device and dtype, starting from a copy of its weight and bias.

        Args:
            conv: the plain convolution to replace.
            **kwargs: AW options (``reduction``, ``min_hidden``, ``gate``, ``generator``).
        """
        if not isinstance(conv, nn.Conv2d):
            raise AttnlabError(f"AWConv2d.from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        aw = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **kwargs,
        )
        with torch.no_grad():
            aw.weight.copy_(conv.weight)
            if conv.bias is not None:
                aw.bias.copy_(conv.bias)
        return aw

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Generator output per sample and kernel offset: B × n_logits × k × k."""
        hidden = self.attn_act(self.attn_reduce(F.adaptive_avg_pool2d(x, self.kernel_size)))
        return F.conv2d(hidden, self.attn_expand_weight, self.attn_expand_bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """A per sample, B × C_out × C_in/groups × k × k, with plain autograd ops (for analysis and checks)."""
        logits = self.logits(x)
        if self.generator == "factorized":
            attn_out, attn_in = self._factors(logits)
            return attn_out.unsqueeze(2) * attn_in.unsqueeze(1)
        return weight_gate(logits.view([x.shape[0]] + list(self.weight.shape)), self.gate)

    def _factors(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_logits, in_logits = logits.split([self.out_channels, self.in_channels // self.groups], dim=1)
        return weight_gate(out_logits, self.gate), weight_gate(in_logits, self.gate)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """The same convolution with plain autograd ops: what TorchScript runs (it cannot run autograd Functions).
        Outputs equal `forward`'s; backward keeps the per-sample weights alive, the memory `forward` saves."""
        b = x.shape[0]
        weights = (self.attention(x) * self.weight).flatten(0, 1)  # (B·C_out) × C_in/groups × k × k
        folded = x.reshape(1, b * self.in_channels, x.shape[2], x.shape[3])
        out = F.conv2d(folded, weights, None, self.stride, self._explicit_padding, self.dilation, b * self.groups)
        out = out.view(b, self.out_channels, out.shape[2], out.shape[3])
        bias = self.bias  # a local, so that TorchScript refines the Optional
        return out if bias is None else out + bias.view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.forward_plain(x)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise AttnlabError(f"AWConv2d expects B×{self.in_channels}×H×W input, got shape {tuple(x.shape)}")
        logits = self.logits(x)
        geometry = (self.stride, self._explicit_padding, self.dilation, self.groups)
        if self.generator == "full":
            gate = _gate_spec(self.gate, self.kernel_size)
            out, attn = _AWConvFunction.apply(x, logits, self.weight, gate, geometry)
            self.probe(attn.view(x.shape[0], *self.weight.shape))
        else:
            attn_out, attn_in = self._factors(logits)
            out = _FactorizedAWConvFunction.apply(x, attn_out, attn_in, self.weight, geometry)
            if self.probe.observed:  # the weight-shaped attention exists only for observers here: skip it otherwise
                self.probe(attn_out.unsqueeze(2) * attn_in.unsqueeze(1))
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate={self.gate!r}, generator={self.generator!r}, hidden={self.hidden}"


class AWModule(nn.Module):
    """A stand-alone AW attention: x ↦ x + BN(AWConv2d(x)), shape-preserving and exactly the identity at init.

    Our reading of an "AW-module" that can sit where SE or CBAM sit (registry name ``"aw"``): a k×k AW convolution,
    depthwise by default so it stays cheap (C·k² per-sample weights instead of C²·k²), on a residual branch whose BN
    scale starts at zero — the identity-preserving init of a ResNet's zero-initialised last BN.

    Args:
        channels: input and output channels.
        kernel_size: odd size of the AW convolution (padded to keep H×W).
        depthwise: one filter per channel (``groups=channels``) instead of a full C → C convolution.
        **kwargs: AW options for `AWConv2d` (``gate``, ``generator``, ``reduction``, ``min_hidden``).
    """

    def __init__(self, channels: int, kernel_size: int = 3, depthwise: bool = True, **kwargs: Any):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise AttnlabError(f"AW module kernel_size must be odd and positive, got {kernel_size}")
        groups = channels if depthwise else 1
        self.conv = AWConv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=groups, **kwargs)
        self.bn = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.conv(x))


def aw_module(channels: int, **kwargs: Any) -> AWModule:
    """Registry factory behind ``create_attn("aw", channels, **kwargs)``: an `AWModule`."""
    return AWModule(channels, **kwargs)


def _aw_training(model: nn.Module, settings) -> StepHook | None:
    """AW-convolution's batch-folded grouped convolution is about 1.5× slower in channels-last on CPU."""
    return StepHook(channels_last=False) if any(isinstance(m, AWConv2d) for m in model.modules()) else None


register_training_hook("aw", _aw_training)
