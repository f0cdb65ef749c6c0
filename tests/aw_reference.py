"""The slow, independent reading of AW-convolution that the tests compare the layer against: each gate from its
definition, the attention of one sample at a time, and a Python loop over samples with a plain ``F.conv2d`` of A ⊙ W.
Test-only: the library keeps the fast forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnlab.layers.awconv import AWConv2d


def reference_gate(z: torch.Tensor, gate: str) -> torch.Tensor:
    """Each gate written out from its definition, independently of the module's code."""
    if gate == "sigmoid2":
        return 2 / (1 + torch.exp(-z))
    if gate == "sigmoid":
        return 1 / (1 + torch.exp(-z))
    if gate == "softmax_kernel":
        e = torch.exp(z - z.amax(dim=(-2, -1), keepdim=True))
        return z.shape[-1] * z.shape[-2] * e / e.sum(dim=(-2, -1), keepdim=True)
    return 1 + z


def reference_attention(layer: AWConv2d, xi: torch.Tensor) -> torch.Tensor:
    """A for ONE sample (1×C×H×W): pool to k×k, 1×1 conv, ReLU, 1×1 conv, gate; C_out × C_in/g × k × k."""
    kh, kw = layer.kernel_size
    pooled = F.adaptive_avg_pool2d(xi, (kh, kw))
    hidden = torch.relu(F.conv2d(pooled, layer.attn_reduce.weight, layer.attn_reduce.bias))
    z = F.conv2d(hidden, layer.attn_expand_weight, layer.attn_expand_bias)[0]  # n_logits × kh × kw
    cin = layer.in_channels // layer.groups
    if layer.generator == "full":
        return reference_gate(z.reshape(layer.out_channels, cin, kh, kw), layer.gate)
    a_out = reference_gate(z[: layer.out_channels], layer.gate)  # C_out × kh × kw
    a_in = reference_gate(z[layer.out_channels :], layer.gate)  # C_in/g × kh × kw
    return a_out[:, None] * a_in[None, :]


def reference_awconv(layer: AWConv2d, x: torch.Tensor) -> torch.Tensor:
    """The slow reading: a Python loop over samples, each with its own A and a plain F.conv2d with A ⊙ W."""
    outs = []
    for xi in x.split(1):
        weight = reference_attention(layer, xi) * layer.weight
        outs.append(F.conv2d(xi, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outs)
