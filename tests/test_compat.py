"""Every private torch/timm API of `attnlab._compat` still exists and still means what we use it for: an upgrade that
moves one fails here, in one place, instead of deep inside a layer or a training run."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnlab import _compat


def test_timm_feature_take_indices_resolves_negative_and_count_indices():
    assert _compat.feature_take_indices(4, None) == ([0, 1, 2, 3], 3)
    assert _compat.feature_take_indices(4, 2) == ([2, 3], 3)
    assert _compat.feature_take_indices(4, [-1, 0]) == ([3, 0], 3)


def test_timm_resnet_cfg_gives_a_pretrained_config():
    cfg = _compat.timm_resnet_cfg(url="", license=None)
    assert {"num_classes", "input_size", "mean", "std", "first_conv", "classifier"} <= set(cfg)


def test_softmax_backward_data_is_the_softmax_derivative():
    z = torch.randn(3, 5, requires_grad=True)
    y = torch.softmax(z, -1)
    grad = torch.randn(3, 5)
    (want,) = torch.autograd.grad(y, z, grad)
    torch.testing.assert_close(_compat.softmax_backward_data(grad, y.detach(), -1, y.dtype), want)


def test_convolution_backward_gives_the_convolution_gradients():
    x, w = torch.randn(2, 3, 6, 6, requires_grad=True), torch.randn(4, 3, 3, 3, requires_grad=True)
    out = F.conv2d(x, w, None, 1, 1)
    grad = torch.randn_like(out)
    want = torch.autograd.grad(out, (x, w), grad)
    got = _compat.convolution_backward(grad, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_dynamo_config_patch_is_scoped():
    config = _compat.dynamo_config()
    before = (config.recompile_limit, config.skip_nnmodule_hook_guards)
    with _compat.dynamo_config_patch(recompile_limit=before[0] + 1, skip_nnmodule_hook_guards=not before[1]):
        assert (config.recompile_limit, config.skip_nnmodule_hook_guards) == (before[0] + 1, not before[1])
    assert (config.recompile_limit, config.skip_nnmodule_hook_guards) == before


def test_compiled_call_is_what_module_compile_installs():
    model = nn.Linear(2, 2)
    assert _compat.compiled_call(model) is None
    model.compile(backend="eager")
    assert callable(_compat.compiled_call(model))
    _compat.set_compiled_call(model, None)
    assert _compat.compiled_call(model) is None


def test_has_forward_hooks_sees_own_and_process_wide_hooks():
    module = nn.Identity()
    assert not _compat.has_forward_hooks(module)
    for register in (module.register_forward_hook, module.register_forward_pre_hook):
        handle = register(lambda *_: None)
        assert _compat.has_forward_hooks(module)
        handle.remove()
    for register in (
        nn.modules.module.register_module_forward_hook,
        nn.modules.module.register_module_forward_pre_hook,
    ):
        handle = register(lambda *_: None)
        try:
            assert _compat.has_forward_hooks(module)
        finally:
            handle.remove()
    assert not _compat.has_forward_hooks(module)


def test_conv_padding_resolves_same_and_uneven():
    assert _compat.conv_padding(nn.Conv2d(1, 1, 3, padding=1)) == (1, 1, 1, 1)
    assert _compat.conv_padding(nn.Conv2d(1, 1, (2, 3), padding="same")) == (1, 1, 0, 1)


def test_efficientnet_squeeze_excite_is_the_se_of_timms_efficientnet_blocks():
    import timm

    model = timm.create_model("efficientnet_b0", num_classes=2)
    assert type(model.blocks[1][0].se) is _compat.EfficientNetSqueezeExcite


def test_timm_efficientnet_blocks_hold_the_block_classes_convert_knows():
    blocks = _compat.timm_efficientnet_blocks
    names = ("DepthwiseSeparableConv", "InvertedResidual", "CondConvResidual", "EdgeResidual", "ConvBnAct")
    for name in (*names, "UniversalInvertedResidual"):
        assert issubclass(getattr(blocks, name), nn.Module), name
    assert _compat.EfficientNetSqueezeExcite is blocks.SqueezeExcite
