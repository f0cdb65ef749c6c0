"""torch.compile (inductor) computes what eager mode computes, for every attention prefix.

One small module chains every prefix's layer (SE, ECA, CBAM, spatial, CRAM, the FMM merge, AW factorized and full,
as ``impl="auto"`` picks them for these shapes: the tap-wise form and the grouped convolution) so that a single
compilation covers them all; its outputs and the gradients of its input and every parameter must match the eager
module's within float tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attnlab.layers import AWConv2d, create_attn, create_merge
from attnlab.layers.merge import DEFAULT_FMM_MERGE


class EveryPrefix(nn.Module):
    def __init__(self, channels: int = 16):
        super().__init__()
        self.attns = nn.ModuleList(create_attn(n, channels) for n in ("se", "eca", "cbam", "spatial", "cram"))
        self.merge = create_merge(DEFAULT_FMM_MERGE, channels)
        self.aws = nn.ModuleList(
            AWConv2d(channels, channels, 3, padding=1, generator=g) for g in ("factorized", "full")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn in self.attns:
            x = attn(x)
        x = self.merge(x.tanh(), x)
        for aw in self.aws:
            x = aw(x)
        return x


@pytest.mark.slow
def test_compiled_every_prefix_matches_eager():
    torch.manual_seed(0)
    eager = EveryPrefix()
    with torch.no_grad():  # away from the identity-like init, so that every gate depends on the input
        for name, p in eager.named_parameters():
            if "attn_expand" in name or p.dim() == 1:
                p.normal_(0, 0.3) if "attn_expand" in name else p.uniform_(0.5, 1.5)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module)
    x = torch.randn(4, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    assert [aw.path(x) for aw in eager.aws] == ["taps", "grouped"]
    outs, grads = [], []
    for model, params in ((eager, list(eager.parameters())), (compiled, list(compiled_module.parameters()))):
        inp = x.clone().requires_grad_()
        out = model(inp)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append([inp.grad, *(p.grad for p in params)])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    names = ["input", *(n for n, _ in eager.named_parameters())]
    for name, got, want in zip(names, grads[1], grads[0]):
        assert want is not None, name
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5, msg=name)
