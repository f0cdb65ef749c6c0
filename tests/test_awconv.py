"""AW-convolution: the batched grouped convolution against a per-sample reference, the weight/input identity, init,
`from_conv`, the stand-alone AW module, bad arguments, and the aw_ ResNets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from aw_reference import reference_attention, reference_awconv
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import attnlab
from attnlab.errors import AttnlabError
from attnlab.layers import create_attn
from attnlab.layers.awconv import GATES, IMPLS, AWConv2d, AWModule, auto_path

GATE_AT_ZERO = {"sigmoid2": 1.0, "sigmoid": 0.5, "softmax_kernel": 1.0, "linear": 1.0}


def randomize_generator(layer: AWConv2d, std: float = 0.5) -> AWConv2d:
    """At init A is constant; give the generator's last layer random values so A depends on the input."""
    with torch.no_grad():
        layer.attn_expand_weight.normal_(0, std)
        layer.attn_expand_bias.normal_(0, std)
    return layer


def grads(out: torch.Tensor, grad_out: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, grad_out)


@st.composite
def layer_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2]))
    in_channels = groups * draw(st.integers(1, 4))
    out_channels = groups * draw(st.integers(1, 3))
    k = draw(st.sampled_from([1, 3]))
    gate = draw(st.sampled_from([g for g in GATES if not (g == "softmax_kernel" and k == 1)]))
    geometry = dict(
        stride=draw(st.sampled_from([1, 2])), padding=draw(st.integers(0, 2)), dilation=draw(st.sampled_from([1, 2]))
    )
    reach = geometry["dilation"] * (k - 1) + 1 - 2 * geometry["padding"]  # the input must cover the kernel
    h, w = draw(st.integers(max(reach, 1), 9)), draw(st.integers(max(reach, 1), 9))
    layer_kw = dict(
        groups=groups,
        bias=draw(st.booleans()),
        gate=gate,
        generator=draw(st.sampled_from(["full", "factorized"])),
        min_hidden=draw(st.integers(1, 4)),
        **geometry,
    )
    layer_kw["impl"] = draw(st.sampled_from([i for i in IMPLS if i != "taps" or layer_kw["generator"] == "factorized"]))
    return in_channels, out_channels, k, layer_kw, (draw(st.integers(1, 3)), in_channels, h, w), draw(st.integers())


@given(layer_cases())
def test_batched_matches_per_sample_reference(case):
    in_channels, out_channels, k, layer_kw, shape, seed = case
    torch.manual_seed(seed % 2**31)
    layer = randomize_generator(AWConv2d(in_channels, out_channels, k, **layer_kw))
    x = torch.randn(shape, requires_grad=True)
    out, ref = layer(x), reference_awconv(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    inputs = [x, *layer.parameters()]
    for got, want in zip(grads(out, grad_out, inputs), grads(ref, grad_out, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("generator", ["full", "factorized"])
@pytest.mark.parametrize("gate", GATES)
def test_gradcheck_float64(gate, generator):
    torch.manual_seed(0)
    layer = randomize_generator(AWConv2d(4, 3, 3, stride=2, padding=1, gate=gate, generator=generator)).double()
    x = torch.randn(2, 4, 5, 6, dtype=torch.double, requires_grad=True)
    params = (layer.weight, layer.attn_reduce.weight, layer.attn_expand_weight, layer.attn_expand_bias)
    assert torch.autograd.gradcheck(lambda x, *_: layer(x), (x, *params))


def test_output_of_a_sample_ignores_its_batch_neighbours():
    torch.manual_seed(0)
    layer = randomize_generator(AWConv2d(5, 6, 3, padding=1))
    x = torch.randn(4, 5, 7, 7)
    changed = x.clone()
    changed[1:] = torch.randn(3, 5, 7, 7) * 3
    torch.testing.assert_close(layer(x)[0], layer(changed)[0], rtol=0, atol=1e-6)
    x.requires_grad_(True)
    layer(x)[0].sum().backward()
    assert x.grad[0].abs().sum() > 0
    assert torch.equal(x.grad[1:], torch.zeros_like(x.grad[1:]))  # no path from other samples to sample 0


@pytest.mark.parametrize("generator", ["full", "factorized"])
def test_attention_on_weight_equals_attention_on_input_patches(generator):
    """conv(x, A ⊙ W) = conv(x ⊙ A, W): unfold x into k×k patches, scale every (c_in, offset) entry of the patch
    by A (filter by filter), then a matmul with W."""
    torch.manual_seed(1)
    layer = randomize_generator(AWConv2d(3, 4, 3, stride=2, padding=1, dilation=2, generator=generator))
    x = torch.randn(2, 3, 9, 8)
    attn = layer.attention(x)  # B × C_out × C_in × k × k
    patches = F.unfold(x, 3, dilation=2, padding=1, stride=2)  # B × (C_in·k·k) × L
    attended = attn.flatten(2)[..., None] * patches[:, None]  # B × C_out × (C_in·k·k) × L: x ⊙ A per filter
    out = torch.einsum("oj,bojl->bol", layer.weight.flatten(1), attended)
    out = out.view(2, 4, *layer(x).shape[2:])
    torch.testing.assert_close(layer(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("generator", ["full", "factorized"])
@pytest.mark.parametrize("gate", GATES)
def test_init_is_the_plain_conv_times_a_constant(gate, generator):
    torch.manual_seed(2)
    layer = AWConv2d(6, 5, 3, stride=2, padding=1, bias=True, gate=gate, generator=generator)
    x = torch.randn(3, 6, 8, 8)
    constant = GATE_AT_ZERO[gate] ** (2 if generator == "factorized" else 1)
    assert torch.allclose(layer.attention(x), torch.full((3, 5, 6, 3, 3), constant))
    plain = F.conv2d(x, layer.weight * constant, layer.bias, 2, 1)
    torch.testing.assert_close(layer(x), plain, rtol=1e-5, atol=1e-6)


def test_probe_sees_the_weight_attention():
    torch.manual_seed(3)
    layer = randomize_generator(AWConv2d(4, 6, 3, padding=1, groups=2))
    x = torch.randn(2, 4, 6, 6)
    seen = []
    layer.probe.register_forward_hook(lambda mod, inputs, output: seen.append(output))
    layer(x)
    assert layer.probe.kind == "weight"
    assert seen[0].shape == (2, 6, 2, 3, 3)  # B × C_out × C_in/groups × k × k
    torch.testing.assert_close(seen[0], torch.stack([reference_attention(layer, xi) for xi in x.split(1)]))
    with attnlab.capture_attention(layer) as record:
        layer(x)
    (captured,) = record.values()
    torch.testing.assert_close(captured, seen[0])


def test_factorized_attention_is_built_only_for_observers():
    torch.manual_seed(3)
    layer = randomize_generator(AWConv2d(4, 6, 3, padding=1, generator="factorized"))
    x = torch.randn(2, 4, 6, 6)
    assert not layer.probe.observed
    with attnlab.capture_attention(layer) as record:
        assert layer.probe.observed
        layer(x)
    assert not layer.probe.observed
    torch.testing.assert_close(record[next(iter(record))], layer.attention(x))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)  # a global hook sees it too
    assert layer.probe.observed
    handle.remove()


def test_loss_on_the_attention_alone_backpropagates():
    """When only A is used downstream (an attention loss), its gradient still reaches the generator."""
    torch.manual_seed(4)
    layer = randomize_generator(AWConv2d(3, 4, 3, padding=1))
    x = torch.randn(2, 3, 5, 5)
    with attnlab.capture_attention(layer, detach=False) as record:
        layer(x)
    (attn,) = record.values()
    (got,) = torch.autograd.grad(attn.square().sum(), layer.attn_expand_weight)
    (want,) = torch.autograd.grad(layer.attention(x).square().sum(), layer.attn_expand_weight)
    torch.testing.assert_close(got, want)


@given(layer_cases(), st.data())
def test_every_implementation_equals_the_grouped_form(case, data):
    """The implementations are one function: outputs and gradients agree with the grouped convolution (≤ 1e-5)."""
    in_channels, out_channels, k, layer_kw, shape, seed = case
    torch.manual_seed(seed % 2**31)
    layer = randomize_generator(AWConv2d(in_channels, out_channels, k, **{**layer_kw, "impl": "grouped"}))
    other = copy.deepcopy(layer)
    other.impl = data.draw(st.sampled_from([i for i in IMPLS if i != "taps" or layer.generator == "factorized"]))
    memory_format = data.draw(st.sampled_from([torch.contiguous_format, torch.channels_last]))
    x = torch.randn(shape).contiguous(memory_format=memory_format).requires_grad_()
    out, want = other(x), layer(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    for got, ref in zip(
        grads(out, grad_out, [x, *other.parameters()]), grads(want, grad_out, [x, *layer.parameters()])
    ):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("generator", "impl"), [("factorized", "taps"), ("full", "unfold")])
def test_plain_autograd_paths_differentiate_twice(generator, impl):
    """taps and unfold are plain autograd ops: second derivatives are exact (gradgradcheck in float64, in its fast mode:
    along random directions, which catches any wrong term at a fraction of the full Jacobians' cost)."""
    torch.manual_seed(0)
    layer = randomize_generator(AWConv2d(4, 3, 3, stride=2, padding=1, groups=1, generator=generator, impl=impl))
    layer = layer.double()
    x = torch.randn(2, 4, 5, 6, dtype=torch.double, requires_grad=True)
    params = (layer.weight, layer.attn_reduce.weight, layer.attn_expand_weight)
    assert torch.autograd.gradgradcheck(lambda x, *_: layer(x), (x, *params), fast_mode=True)


def test_taps_keeps_channels_last_and_groups():
    torch.manual_seed(1)
    layer = randomize_generator(AWConv2d(6, 4, 3, padding=1, groups=2, generator="factorized", impl="taps"))
    x = torch.randn(2, 6, 7, 5).contiguous(memory_format=torch.channels_last)
    out = layer(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference_awconv(layer, x), rtol=1e-5, atol=1e-5)


def test_auto_path_is_the_measured_rule():
    """benchmarks/aw_paths.py: taps beats the grouped convolution only where the per-sample weights outweigh the
    activations (64 channels on 8×8 maps), the grouped convolution is kept for the full generator."""
    wide, narrow = torch.empty(8, 64, 8, 8), torch.empty(8, 16, 32, 32)
    layer = AWConv2d(64, 64, 3, padding=1, generator="factorized")
    assert auto_path(layer, wide) == "taps" and auto_path(layer, narrow[:, :1].expand(8, 64, 32, 32)) == "grouped"
    assert auto_path(AWConv2d(16, 16, 3, padding=1, generator="factorized"), narrow) == "grouped"
    assert auto_path(AWConv2d(64, 64, 3, padding=1), wide) == "grouped"
    assert AWConv2d(4, 4, 3, impl="unfold").path(torch.empty(1, 4, 5, 5)) == "unfold"


@pytest.mark.parametrize("generator", ["full", "factorized"])
def test_double_backward_is_refused_loudly(generator):
    """Second derivatives must fail, not silently lose the AW terms (the landscape analysis then falls back)."""
    layer = AWConv2d(2, 2, 3, padding=1, generator=generator, impl="grouped")
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(layer(x).square().sum(), [x, *layer.parameters()], create_graph=True)
    torch.autograd.grad(layer(x).square().sum(), [x, *layer.parameters()])  # first order is fine


def test_autocast_bfloat16_runs_and_matches_float32_loosely():
    torch.manual_seed(5)
    layer = randomize_generator(AWConv2d(4, 4, 3, padding=1), std=0.1)
    x = torch.randn(2, 4, 6, 6)
    want_out = layer(x)
    (want,) = torch.autograd.grad(want_out.sum(), layer.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    (got,) = torch.autograd.grad(out.float().sum(), layer.weight)
    assert out.dtype == torch.bfloat16 and got.dtype == torch.float32
    torch.testing.assert_close(out.float(), want_out, rtol=0.05, atol=0.05)
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.2)


@pytest.mark.parametrize("padding", [1, (2, 0), "same", "valid"])
def test_from_conv_copies_geometry_and_weights(padding):
    torch.manual_seed(6)
    conv = nn.Conv2d(6, 4, 3, stride=1 if padding == "same" else 2, padding=padding, dilation=2, groups=2, bias=True)
    aw = AWConv2d.from_conv(conv, gate="softmax_kernel", generator="factorized", reduction=2)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(aw, name) == getattr(conv, name), name
    assert (aw.gate, aw.generator, aw.hidden) == ("softmax_kernel", "factorized", 8)
    assert torch.equal(aw.weight, conv.weight) and torch.equal(aw.bias, conv.bias)
    assert aw.weight.data_ptr() != conv.weight.data_ptr()  # a copy, not shared
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(aw(x), conv(x), rtol=1e-5, atol=1e-6)  # the default-init AW conv is the conv itself
    assert AWConv2d.from_conv(nn.Conv2d(3, 5, 1)).bias is not None


def test_aw_module_is_shape_preserving_and_the_identity_at_init():
    torch.manual_seed(7)
    module = create_attn("aw", 8)
    assert isinstance(module, AWModule) and module.conv.groups == 8  # depthwise by default
    x = torch.randn(2, 8, 5, 7)
    assert torch.equal(module(x), x)
    full = AWModule(8, depthwise=False, generator="factorized")
    assert full.conv.groups == 1 and full.conv.generator == "factorized"
    with torch.no_grad():
        full.bn.weight.fill_(1.0)
    randomize_generator(full.conv)
    out = full(x)
    assert out.shape == x.shape and not torch.allclose(out, x)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in full.parameters())


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: AWConv2d(4, 4, 3, padding_mode="reflect"), "padding_mode"),
        (lambda: AWConv2d(4, 4, 3, gate="sigmod"), "did you mean sigmoid"),
        (lambda: AWConv2d(4, 4, 3, generator="ful"), "unknown AW generator 'ful'"),
        (lambda: AWConv2d(4, 6, 3, groups=4), "divisible by groups"),
        (lambda: AWConv2d(0, 4, 3), "positive channel counts"),
        (lambda: AWConv2d(4, 4, 1, gate="softmax_kernel"), "kernel_size > 1"),
        (lambda: AWConv2d(4, 4, 2, padding="same"), "symmetric padding"),
        (lambda: AWConv2d(4, 4, 3, reduction=0), "reduction >= 1"),
        (lambda: AWConv2d(4, 4, 3, impl="tap"), "unknown AW implementation 'tap'"),
        (lambda: AWConv2d(4, 4, 3, impl="taps"), "needs generator='factorized'"),
        (lambda: AWConv2d.from_conv(nn.Linear(3, 3)), "needs an nn.Conv2d, got Linear"),
        (lambda: AWModule(4, kernel_size=2), "odd"),
        (lambda: AWConv2d(3, 4, 3)(torch.randn(1, 5, 6, 6)), r"B×3×H×W input, got shape \(1, 5, 6, 6\)"),
        (lambda: AWConv2d(3, 4, 3)(torch.randn(3, 6, 6)), "B×3×H×W input"),
    ],
)
def test_bad_arguments_raise_one_clear_error(build, message):
    with pytest.raises(AttnlabError, match=message) as info:
        build()
    assert "\n" not in str(info.value)


# --- the aw_ ResNets (built by attnlab.models through AWConv2d.from_conv) ------------------------------------------


def test_aw_resnet20_forward_backward_reaches_every_parameter():
    torch.manual_seed(8)
    model = attnlab.create_model("aw_resnet20", num_classes=10)
    aw_layers = [m for m in model.modules() if isinstance(m, AWConv2d)]
    assert len(aw_layers) == 9  # conv2 of each of the 3×3 basic blocks
    x = torch.randn(2, 3, 32, 32)
    model(x).logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with attnlab.capture_attention(model) as record:
        model(x)
    weights = {path: a for path, a in record.items() if record.kinds[path] == "weight"}
    assert sorted(w.shape for w in weights.values()) == sorted((2, *m.weight.shape) for m in aw_layers)


def test_aw_resnet20_with_resnet20_weights_is_resnet20_at_init():
    """The identity-preserving init: copying resnet20's weights into aw_resnet20 gives the same function."""
    torch.manual_seed(9)
    plain, aw = attnlab.create_model("resnet20"), attnlab.create_model("aw_resnet20")
    for layer in (m for m in aw.modules() if isinstance(m, AWConv2d)):  # the network's conv init kept the zero
        assert not layer.attn_expand_weight.any() and not layer.attn_expand_bias.any()
    missing, unexpected = aw.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".conv2.attn_" in k for k in missing)
    for module in plain.modules():  # non-zero BN scales so the AW branches matter
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
    aw.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(aw(x), plain(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["aw_se_resnet20", "aw_cbam_resnet20"])
def test_aw_stacks_on_channel_attention(name):
    model = attnlab.create_model(name)
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 10)
    assert sum(isinstance(m, AWConv2d) for m in model.modules()) == 9


@pytest.mark.parametrize("generator", ["full", "factorized"])
def test_channels_last_model_gives_the_same_outputs_and_gradients(generator):
    """The trainer runs models in channels-last memory format by default: AW must give the same numbers there."""
    torch.manual_seed(0)
    dense = attnlab.create_model("aw_resnet20", num_classes=4, in_chans=1, aw={"generator": generator})
    last = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    x = torch.randn(3, 1, 12, 12)
    for model, inp in ((dense, x), (last, x.contiguous(memory_format=torch.channels_last))):
        model(inp).square().mean().backward()
    for (name, p), q in zip(dense.named_parameters(), last.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
