"""Position-wise spatial attention: CBAM's spatial branch on its own.

Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018, arXiv 1807.06521, Sec. 3 (spatial attention
module): a map M = σ(BN(conv_k×k([mean_c(x); max_c(x)]))) of one value per position multiplies every channel.
This is the "position-wise" attention that CRAM is compared against: a free per-pixel map, no shape prior.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import register_notrace_function
from torch import nn

from ..errors import AttnlabError
from .probe import AttentionProbe


@register_notrace_function  # its dtype test is not symbolically traceable: FX keeps it as one call
def channel_pool(x: torch.Tensor) -> torch.Tensor:
    """[mean_c x; max_c x]: the two maps CBAM's spatial branch convolves, B×2×H×W.

    A half-precision max is taken in fp32 and cast back, which gives the same value and keeps a compiled network's
    bf16 backward finite where a bf16 max did not (docs/MEASUREMENTS.md; tests/test_compile_training.py).
    """
    if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
        peak = x.float().amax(dim=1, keepdim=True).to(x.dtype)
    else:
        peak = x.amax(dim=1, keepdim=True)
    return torch.cat([x.mean(dim=1, keepdim=True), peak], dim=1)


class SpatialAttention(nn.Module):
    """x ↦ x ⊙ σ(BN(conv([mean_c x, max_c x]))), one gate per position shared by all channels.

    Args:
        channels: input channels (unused by the map itself; kept so every attention takes ``channels`` first).
        kernel_size: size of the convolution over the two pooled maps (CBAM uses 7).
        device, dtype: where and in what the parameters are built (as timm's layers).
    """

    def __init__(self, channels: int, kernel_size: int = 7, device: Any = None, dtype: Any = None):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise AttnlabError(f"spatial attention kernel_size must be odd and positive, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(1, device=device, dtype=dtype)
        self.probe = AttentionProbe("spatial")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.bn(self.conv(channel_pool(x))))
        if not torch.jit.is_scripting():  # the probe's value is untyped in TorchScript (probe.py)
            gate = self.probe(gate)
        return x * gate
