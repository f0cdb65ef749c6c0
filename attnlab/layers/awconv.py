"""AW-convolution: attention shaped like the convolution weight, computed per sample from the input.

Zhu et al., "An Attention Module for Convolutional Neural Networks", ICANN 2021, arXiv 2108.08205. The abstract says
the attention map has the shape of the weight (C_out × C_in × k × k) rather than of the activation, so that
``conv(x ⊙ A, W) = conv(x, A ⊙ W)``: every filter re-weights every (input channel, kernel offset) of its own, per
sample. Only the abstract is available; everything it does not state is *our reading*:

- Generator: average-pool the input to the kernel's k×k grid (one pooled value per kernel offset), a 1×1 conv
  C_in → hidden, ReLU, and a 1×1 map to the logits at each of the k×k offsets. ``generator="full"`` (default, the
  literal reading: one attention value per weight entry) emits C_out·C_in logits per offset; ``"factorized"`` emits a
  C_out and a C_in factor per offset, gates each, and multiplies them as an outer product — rank one over the
  channels, hidden·(C_out + C_in) parameters instead of hidden·C_out·C_in. The full map is the literal reading of "the
  shape of the weight" and of the paper's capacity argument; the factorized one is the affordable reading (see the
  memory note of `AWConv2d`; parameter counts in docs/MEASUREMENTS.md).
- Gate, logits z → A: ``"sigmoid2"`` (default) 2σ(z), in (0, 2), 1 at z = 0; ``"sigmoid"`` σ(z), SE's gate, 0.5 at
  z = 0; ``"softmax_kernel"`` k²·softmax of z over the k×k offsets of each (C_out, C_in) pair — it moves a filter's mass
  between its taps, 1 on average; ``"linear"`` 1 + z, no squashing.
- Init: the generator's last layer starts at zero, so at init A = gate(0) everywhere and the layer computes exactly the
  plain convolution times that constant — 1 for every gate except ``"sigmoid"`` (0.5, or 0.25 factorized) — so
  swapping it into a trained or freshly initialised network changes nothing until it learns.

The batch never loops over samples in Python. By default (``impl="grouped"``) it runs as ONE grouped convolution with
the samples folded into the groups, through the fused, once-differentiable functions of `awconv_fused`. The factorized
attention is rank one over the channels per kernel offset, so ``impl="taps"`` needs no per-sample weights at all (one
shared 1×1 convolution per offset, `conv_taps`); ``"unfold"`` (im2col + batched matmul) is the full generator's plain
form. ``impl="auto"`` picks per shape (`auto_path`). ``"taps"`` and ``"unfold"`` are plain autograd ops and can be
differentiated twice (the landscape analysis switches to them for Hessian-vector products).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import conv_padding
from ..errors import AttnlabError, unknown_name
from ..schema import check_call
from .awconv_fused import AWConvFunction, FactorizedAWConvFunction, gate_spec, grouped_conv
from .hooks import StepHook
from .probe import AttentionProbe

GATES = ("sigmoid2", "sigmoid", "softmax_kernel", "linear")
GENERATORS = ("full", "factorized")
IMPLS = ("auto", "grouped", "taps", "unfold")
"""How the batch is convolved: ``"grouped"`` (one convolution, samples folded into the groups; a fused,
once-differentiable function), ``"taps"`` (factorized only: one shared 1×1 convolution per kernel offset, no
per-sample weights), ``"unfold"`` (im2col and a batched matmul); ``"auto"`` picks by `auto_path`. All give the same
numbers up to float rounding; ``"taps"`` and ``"unfold"`` can be differentiated twice."""


def weight_gate(logits: torch.Tensor, gate: str) -> torch.Tensor:
    """A = gate(logits) with plain autograd ops; the last two dims of ``logits`` are the k×k kernel offsets."""
    if not torch.jit.is_scripting():  # (scripted, an unknown gate fails in the lookup below)
        if gate not in GATES:
            raise unknown_name("AW gate", gate, GATES)
    base, scale = gate_spec(gate, logits.shape[-2:])
    if base == "sigmoid":
        return scale * torch.sigmoid(logits)
    if base == "softmax":
        return scale * torch.softmax(logits.flatten(-2), dim=-1).view_as(logits)
    return 1 + logits


def _output_size(x: torch.Tensor, kernel: tuple[int, int], geometry: tuple) -> tuple[int, int]:
    stride, padding, dilation, _ = geometry
    return tuple(
        (x.shape[2 + d] + 2 * padding[d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(2)
    )


def _like_input(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` in channels-last memory when ``x`` is (so a channels-last network stays channels-last)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out


def conv_taps(
    x: torch.Tensor, attn_out: torch.Tensor, attn_in: torch.Tensor, weight: torch.Tensor, geometry: tuple
) -> torch.Tensor:
    """conv(x_b, (a_out_b ⊗ a_in_b) ⊙ W) for every sample b without per-sample weights.

    The factorized attention is rank one over the channels at each kernel offset k, so the convolution splits into
    one term per offset: shift x to offset k, scale its channels by a_in[:, :, k], apply the shared 1×1 slice
    W[:, :, k] (one convolution for the whole batch), scale the output channels by a_out[:, :, k], and sum — the way
    ODConv (Li et al., ICLR 2022) puts channel attentions around a shared kernel. Plain autograd ops throughout, so
    it can be differentiated twice.

    Args:
        x: B × C_in × H × W.
        attn_out: B × C_out × k × k; attn_in: B × C_in/groups × k × k (gated factors).
        weight: C_out × C_in/groups × k × k.
        geometry: (stride, explicit symmetric padding, dilation, groups).
    """
    stride, (pad_h, pad_w), dilation, groups = geometry
    kh, kw = weight.shape[-2:]
    ho, wo = _output_size(x, (kh, kw), geometry)
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h)) if pad_h or pad_w else x
    attn_in = attn_in.repeat(1, groups, 1, 1) if groups > 1 else attn_in  # input channel c has factor c mod C_in/g
    out = None
    for i in range(kh):
        for j in range(kw):
            top, left = i * dilation[0], j * dilation[1]
            tap = padded[
                :,
                :,
                top : top + stride[0] * (ho - 1) + 1 : stride[0],
                left : left + stride[1] * (wo - 1) + 1 : stride[1],
            ]
            y = F.conv2d(
                tap * attn_in[:, :, i, j, None, None], weight[:, :, i : i + 1, j : j + 1], None, 1, 0, 1, groups
            )
            y = y * attn_out[:, :, i, j, None, None]
            out = y if out is None else out + y
    return out


def conv_unfold(x: torch.Tensor, weights: torch.Tensor, geometry: tuple) -> torch.Tensor:
    """conv(x_b, weights_b) for every sample b as im2col (``F.unfold``) and one batched matmul; plain autograd ops.

    Args:
        x: B × C_in × H × W; weights: B × C_out × C_in/groups × k × k; geometry: as `conv_taps`.
    """
    stride, padding, dilation, groups = geometry
    b, c_out = weights.shape[:2]
    ho, wo = _output_size(x, weights.shape[-2:], geometry)
    cols = F.unfold(x, weights.shape[-2:], dilation, padding, stride).view(b, groups, -1, ho * wo)
    out = torch.matmul(weights.reshape(b, groups, c_out // groups, -1).to(cols.dtype), cols)
    return _like_input(out.view(b, c_out, ho, wo), x)


# under torch.compile the grouped form runs as plain ops (the fused functions' in-place gate and mark_dirty break the
# graph at every AW layer, and nine differently shaped breaks in resnet20 exceed dynamo's recompile limit)
_PER_SAMPLE = {"unfold": conv_unfold, "grouped": grouped_conv}


TAPS_MIN_WEIGHT_SHARE = 2.0
"""``"auto"`` takes ``"taps"`` where the per-sample weights hold at least this many times the values of the layer's
input and output activations (the crossing point `benchmarks/aw_paths.py` measured; docs/MEASUREMENTS.md)."""


def auto_path(layer: AWConv2d, x: torch.Tensor) -> str:
    """The implementation ``impl="auto"`` uses for ``layer`` on input ``x`` (`benchmarks/aw_paths.py` measures them).

    Factorized: the grouped convolution while the per-sample weights (C_out·C_in/g·k² values per sample) are small
    next to the activations; ``"taps"`` makes ~k² passes over the activations instead of building the weights, so it
    wins once the weights outweigh the activations. Full: the grouped convolution, whose fused backward keeps the
    least memory.
    """
    if layer.generator == "full":
        return "grouped"
    ho, wo = _output_size(x, layer.kernel_size, (layer.stride, layer._explicit_padding, layer.dilation, layer.groups))
    weights = layer.weight.numel()
    activations = layer.in_channels * x.shape[2] * x.shape[3] + layer.out_channels * ho * wo
    return "taps" if weights >= TAPS_MIN_WEIGHT_SHARE * activations else "grouped"


class AWConv2d(nn.Conv2d):
    """A Conv2d whose weight is re-weighted per sample by attention computed from the input: conv(x, A ⊙ W).

    Memory: the per-sample weights cost B·C_out·(C_in/groups)·k² values per layer — linear in the batch, quadratic in
    the width, independent of H×W (a 64→64 layer on 8×8 maps holds 9× more per-sample weight values than activation
    values). The full generator keeps one such tensor per layer for backward (A); the factorized one keeps only its
    factors, and its ``"taps"`` form never builds the weights. Measured costs: docs/MEASUREMENTS.md.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as `nn.Conv2d`
            (``padding_mode`` must be ``"zeros"``, and the padding symmetric).
        reduction: the generator's hidden width is ``max(in_channels // reduction, min_hidden)``.
        min_hidden: the smallest hidden width.
        gate: ``"sigmoid2"`` (default), ``"sigmoid"``, ``"softmax_kernel"`` or ``"linear"`` (module docstring).
        generator: ``"full"`` (C_out·C_in logits per kernel offset) or ``"factorized"`` (outer product of a C_out
            and a C_in factor).
        impl: how the batch is convolved, one of `IMPLS` (``"auto"``: `auto_path`).
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
        impl: str = "auto",
        device: Any = None,
        dtype: Any = None,
    ):
        if padding_mode != "zeros":
            raise AttnlabError(f"AWConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        if gate not in GATES:
            raise unknown_name("AW gate", gate, GATES)
        if generator not in GENERATORS:
            raise unknown_name("AW generator", generator, GENERATORS)
        if impl not in IMPLS:
            raise unknown_name("AW implementation", impl, IMPLS)
        if impl == "taps" and generator != "factorized":
            raise AttnlabError("AW impl 'taps' needs generator='factorized' (the full attention is not rank one)")
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
        left, right, top, bottom = conv_padding(self)
        if left != right or top != bottom:
            raise AttnlabError(f"AWConv2d needs symmetric padding; padding={padding!r} pads unevenly here")
        if gate == "softmax_kernel" and self.kernel_size == (1, 1):
            raise AttnlabError("AW gate 'softmax_kernel' needs kernel_size > 1 (over a single tap it is constant 1)")
        self._explicit_padding = (top, left)
        self.gate = gate
        self.generator = generator
        self.impl = impl
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
        kwargs = check_call(cls, kwargs, "aw")
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

    def path(self, x: torch.Tensor) -> str:
        """The implementation ``forward`` uses for input ``x``: ``impl`` unless it is ``"auto"`` (`auto_path`)."""
        return auto_path(self, x) if self.impl == "auto" else self.impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.forward_plain(x)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise AttnlabError(f"AWConv2d expects B×{self.in_channels}×H×W input, got shape {tuple(x.shape)}")
        logits = self.logits(x)
        geometry = (self.stride, self._explicit_padding, self.dilation, self.groups)
        path = self.path(x)
        if self.generator == "full":
            if path == "grouped" and not torch.compiler.is_compiling():
                out, attn = AWConvFunction.apply(
                    x, logits, self.weight, gate_spec(self.gate, self.kernel_size), geometry
                )
                self.probe(attn.view(x.shape[0], *self.weight.shape))
            else:
                attn = self.probe(weight_gate(logits.view(x.shape[0], *self.weight.shape), self.gate))
                out = _PER_SAMPLE[path](x, attn * self.weight, geometry)
        else:
            attn_out, attn_in = self._factors(logits)
            if path == "taps":
                out = conv_taps(x, attn_out, attn_in, self.weight, geometry)
            elif path == "grouped" and not torch.compiler.is_compiling():
                out = FactorizedAWConvFunction.apply(x, attn_out, attn_in, self.weight, geometry)
            else:
                out = _PER_SAMPLE[path](x, self.weight * attn_out.unsqueeze(2) * attn_in.unsqueeze(1), geometry)
            if self.probe.observed:  # the weight-shaped attention exists only for observers here: skip it otherwise
                self.probe(attn_out.unsqueeze(2) * attn_in.unsqueeze(1))
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, gate={self.gate!r}, generator={self.generator!r}, impl={self.impl!r}, "
            f"hidden={self.hidden}"
        )


class AWModule(nn.Module):
    """A stand-alone AW attention: x ↦ x + BN(AWConv2d(x)), shape-preserving and exactly the identity at init.

    Our reading of an "AW-module" that can sit where SE or CBAM sit (registry name ``"aw"``): a k×k AW convolution,
    depthwise by default so it stays cheap (C·k² per-sample weights instead of C²·k²), on a residual branch whose BN
    scale starts at zero — the identity-preserving init of a ResNet's zero-initialised last BN.

    Args:
        channels: input and output channels.
        kernel_size: odd size of the AW convolution (padded to keep H×W).
        depthwise: one filter per channel (``groups=channels``) instead of a full C → C convolution.
        device, dtype: where and in what the parameters are built (as timm's layers).
        **kwargs: AW options for `AWConv2d` (``gate``, ``generator``, ``reduction``, ``min_hidden``).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        depthwise: bool = True,
        *,
        device: Any = None,
        dtype: Any = None,
        **kwargs: Any,
    ):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise AttnlabError(f"AW module kernel_size must be odd and positive, got {kernel_size}")
        groups = channels if depthwise else 1
        dd = {"device": device, "dtype": dtype}
        self.conv = AWConv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=groups, **dd, **kwargs)
        self.bn = nn.BatchNorm2d(channels, **dd)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.conv(x))


def aw_module(channels: int, **kwargs: Any) -> AWModule:
    """Registry factory behind ``create_attn("aw", channels, **kwargs)``: an `AWModule`."""
    return AWModule(channels, **kwargs)


def aw_training(model: nn.Module, *, channels_last: bool = False) -> StepHook | None:
    """AW-convolution's training hook for ``model`` (None without AW layers): the memory layout it trains in.
    Channels-last is off by default: the batch-folded grouped convolution runs in NCHW (docs/MEASUREMENTS.md)."""
    return StepHook(channels_last=channels_last) if any(isinstance(m, AWConv2d) for m in model.modules()) else None


__all__ = [
    "GATES",
    "GENERATORS",
    "IMPLS",
    "AWConv2d",
    "AWModule",
    "auto_path",
    "aw_module",
    "aw_training",
    "conv_taps",
    "conv_unfold",
    "weight_gate",
]
