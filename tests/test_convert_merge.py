"""attnlab.convert(merge=...) on every residual block family besides ResNet: timm's EfficientNet / MobileNet, RegNet,
ByobNet and ConvNeXt blocks, torchvision's MobileNetV2 / V3, EfficientNet, RegNet and ConvNeXt blocks.

Each family once, on the smallest network that has its blocks (a real timm / torchvision name where one is small, else
the library's own class at tiny widths), at 32 px: ``add`` computes what the network did, a product computes
merge(F, S) with F and S taken from the library's own forward, every trained weight keeps its key, every parameter
learns, and blocks without a skip are left alone.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from test_convert import UserBlock, _logits, _shift, _trained_like
from timm.models.byobnet import BasicBlock, ByoBlockCfg, ByobNet, ByoModelCfg, RepVggBlock
from timm.models.efficientnet import EfficientNet
from timm.models.regnet import RegNet, RegNetCfg
from torch import nn
from torchvision.models import convnext as tv_convnext
from torchvision.models import efficientnet as tv_effnet

from attnlab import AttnlabError, convert, create_model
from attnlab.layers.merge import MERGES, FixedBiasBatchNorm2d, GateMerge
from attnlab.models import merged_blocks as mb
from attnlab.models.blocks import find_blocks
from attnlab.models.insert import Blended
from attnlab.models.merged_blocks import MERGED_BASES


def _timm_efficientnet() -> nn.Module:  # one of each: DS, edge, inverted, CondConv, universal inverted residual
    from timm.models._efficientnet_builder import decode_arch_def

    arch = [["ds_r1_k3_s1_c16"], ["er_r2_k3_s2_e4_c24"], ["ir_r2_k3_s2_e4_c32_se0.25"], ["ir_r2_k3_s1_e4_c32_cc2"]]
    arch.append(["uir_r2_a3_k5_s1_e4_c32"])
    return EfficientNet(decode_arch_def(arch), num_features=64, stem_size=16, num_classes=5)


def _timm_byobnet() -> nn.Module:  # one stage of each: basic, bottleneck, edge, dark
    stages = [("basic", 16, 1), ("bottle", 24, 2), ("edge", 32, 2), ("dark", 32, 1)]
    blocks = tuple(ByoBlockCfg(kind, d=2, c=c, s=s, br=0.5 if kind != "basic" else 1.0) for kind, c, s in stages)
    return ByobNet(ByoModelCfg(blocks=blocks, stem_chs=16, stem_type="tiered", num_features=64), num_classes=5)


def _timm_preact_regnet() -> nn.Module:
    cfg = RegNetCfg(depth=8, w0=8, wa=8.0, wm=2.0, group_size=8, se_ratio=0.25, preact=True, stem_width=16)
    return RegNet(cfg, num_classes=5)


def _tv_efficientnet() -> nn.Module:  # FusedMBConv and MBConv stages (EfficientNetV2's layout), no stochastic depth
    setting = [tv_effnet.FusedMBConvConfig(1, 3, 1, 16, 16, 2), tv_effnet.FusedMBConvConfig(4, 3, 2, 16, 24, 2)]
    setting.append(tv_effnet.MBConvConfig(4, 3, 2, 24, 32, 2, 1.0, 1.0))
    return tv_effnet.EfficientNet(setting, dropout=0.0, stochastic_depth_prob=0.0, last_channel=64, num_classes=5)


def _tv_convnext() -> nn.Module:
    setting = [tv_convnext.CNBlockConfig(16, 32, 2), tv_convnext.CNBlockConfig(32, None, 2)]
    return tv_convnext.ConvNeXt(setting, stochastic_depth_prob=0.0, num_classes=5)


FAMILIES = {  # name: (build, blocks merged, blocks left alone: no skip)
    "timm efficientnet ds/er/ir/cc/uir": (_timm_efficientnet, 7, 2),
    "timm mobilenetv3_small_050": (lambda: create_model("mobilenetv3_small_050", num_classes=5), 7, 4),
    "timm regnety_002": (lambda: create_model("regnety_002", num_classes=5), 13, 0),
    "timm pre-activation regnet": (_timm_preact_regnet, 8, 0),
    "timm convnext_atto": (lambda: create_model("convnext_atto", num_classes=5), 12, 0),
    "timm byobnet basic/bottle/edge/dark": (_timm_byobnet, 8, 0),
    "torchvision mobilenet_v2 0.25": (lambda: torchvision.models.MobileNetV2(num_classes=5, width_mult=0.25), 11, 6),
    "torchvision mobilenet_v3_small": (lambda: create_model("torchvision:mobilenet_v3_small", num_classes=5), 6, 5),
    "torchvision efficientnet fused/mbconv": (_tv_efficientnet, 4, 2),
    "torchvision regnet_y_400mf": (lambda: create_model("torchvision:regnet_y_400mf", num_classes=5), 16, 0),
    "torchvision convnext": (_tv_convnext, 4, 0),
}


POST_ACT = {  # the families that activate after their addition, and the activation's attribute
    mb.MergedRegNetBottleneck: "act3",
    mb.MergedByobBasicBlock: "act",
    mb.MergedByobBottleneckBlock: "act",
    mb.MergedByobDarkBlock: "act",
    mb.MergedByobEdgeBlock: "act",
    mb.MergedResBottleneckBlock: "activation",
}
SHORTCUTS = {  # S of the families whose shortcut is not the input itself
    mb.MergedRegNetBottleneck: lambda b, x: b.downsample(x),
    mb.MergedRegNetPreBottleneck: lambda b, x: b.downsample(b.norm1(x)),
    mb.MergedConvNeXtBlock: lambda b, x: b.shortcut(x),
    mb.MergedResBottleneckBlock: lambda b, x: x if b.proj is None else b.proj(x),
    **{c: (lambda b, x: b.shortcut(x)) for c in POST_ACT if c.__name__.startswith("MergedByob")},
}


def _branches(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """(F, S, act) of a merged block by the library's own forward: with its activation after the addition swapped for
    the identity, the library class's forward gives F + S."""
    shortcut = SHORTCUTS.get(type(block), lambda b, x: x)(block, x)
    name = POST_ACT.get(type(block))
    act = getattr(block, name) if name else nn.Identity()
    if name:
        setattr(block, name, nn.Identity())
    try:
        total = MERGED_BASES[type(block)].forward(block, x)
    finally:
        if name:
            setattr(block, name, act)
    return total - shortcut, shortcut, act


GATE_SHIFTS: dict[str, float] = {}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_replaces_the_addition_of_every_block_with_a_skip(family, tmp_path):
    build, merged, left = FAMILIES[family]
    torch.manual_seed(0)
    model = _trained_like(build()).eval()
    before = _logits(model)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    blocks = find_blocks(model, "test")

    convert(model, merge="add")
    assert torch.equal(_logits(model), before)  # F + S, as the library computed it
    merges = [m for m in model.modules() if isinstance(m, tuple(MERGES.values()))]
    assert (len(merges), len(blocks) - len(merges)) == (merged, left)  # blocks without a skip are left alone

    convert(model, merge="gate")  # a merged block takes another merge
    assert sum(isinstance(m, GateMerge) for m in model.modules()) == merged
    model.load_state_dict(torch.load(tmp_path / "weights.pth", weights_only=True))  # every key kept, nothing added
    shift = _shift(before, _logits(model))
    GATE_SHIFTS[family] = shift  # docs/guides/your-network.md quotes these (pytest -s prints them)
    print(f"merge shift {family} gate: {shift:.3f}")
    assert 0.01 < shift < 10  # another function, at a finite distance

    inputs = {}
    block = next(m for m in model.modules() if type(m) in MERGED_BASES)
    handle = block.register_forward_pre_hook(lambda m, args: inputs.setdefault("x", args[0].clone()))
    _logits(model)
    handle.remove()
    with torch.no_grad():
        f, s, act = _branches(block, inputs["x"])
        expected = act((torch.sigmoid(f) + 0.5) * s)  # GateMerge by hand
        torch.testing.assert_close(block(inputs["x"]), expected, rtol=1e-5, atol=1e-5)

    model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []  # every parameter learns


@pytest.mark.parametrize("build", [_tv_convnext, _timm_byobnet])
def test_an_attention_inserted_into_merged_blocks_starts_as_the_identity(build):
    torch.manual_seed(0)
    model = convert(_trained_like(build()), merge="mul_residual")
    before = _logits(model)
    convert(model, insert="eca")
    assert torch.equal(_logits(model), before)
    assert sum(isinstance(m, Blended) for m in model.modules()) == len(find_blocks(model, "test"))


def test_a_residual_bias_is_fixed_on_the_last_norm_of_an_inverted_residual():
    model = _timm_efficientnet()
    convert(model, merge="gate_shortcut", merge_kwargs={"residual_bias": 1.0})
    assert isinstance(model.blocks[0][0].bn2, FixedBiasBatchNorm2d)  # DS
    assert isinstance(model.blocks[2][1].bn3, FixedBiasBatchNorm2d)  # IR with skip
    assert not isinstance(model.blocks[2][0].bn3, FixedBiasBatchNorm2d)  # no skip: left alone
    tv = convert(_tv_efficientnet(), attention="none", insert="eca")  # the last BN wrapped by an insert
    convert(tv, merge="mul_bn", merge_kwargs={"residual_bias": 1.0})
    fixed = tv.features[2][1].block[1][1][0]
    assert isinstance(fixed, FixedBiasBatchNorm2d) and torch.equal(fixed.bias, torch.ones(24))
    tv(torch.randn(2, 3, 32, 32)).sum().backward()


@pytest.mark.parametrize(
    "build, kwargs, message",
    [
        (
            lambda: nn.Sequential(RepVggBlock(8, 8)),
            {"merge": "gate"},
            r"convert\(merge='gate'\): 0 is a RepVggBlock \(timm ByobNet\); no merge goes into it: "
            r"its shortcut is a BN added to two convolution branches",
        ),
        (
            _tv_convnext,
            {"merge": "mul_bn", "merge_kwargs": {"residual_bias": 1.0}},
            r"features.1.0 is a CNBlock \(torchvision ConvNeXt\), whose residual branch does not end in a BatchNorm",
        ),
        (
            lambda: create_model("torchvision:efficientnet_b0"),  # stochastic_depth_prob 0.2 by default
            {"merge": "mul"},
            r"features.2.1 has stochastic depth, which zeroes F; for merge 'mul' that zeroes the whole block .*"
            r"\(torchvision: stochastic_depth_prob=0\)",
        ),
        (
            lambda: nn.Sequential(UserBlock(), nn.Flatten()),
            {"merge": "gate"},
            r"convert\(merge='gate'\): 0 is a test_convert.UserBlock, a block class convert does not know; known: ",
        ),
        (
            lambda: nn.Sequential(BasicBlock(4, 8, downsample="")),
            {"merge": "gate"},
            r"convert\(merge='gate'\): Sequential has no residual block with a skip to merge",
        ),
    ],
)
def test_merge_refuses_in_one_line(build, kwargs, message):
    with pytest.raises(AttnlabError, match=message):
        convert(build(), **kwargs)


def test_train_and_eval_a_merged_efficientnet_from_the_command_line(tmp_path, capsys):
    import json

    from test_any_network_runs import train_args

    from attnlab.cli import main

    out = tmp_path / "run"
    assert main(train_args("efficientnet_b0[merge=gate]", out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert main(["eval", "--checkpoint", str(out)]) == 0  # rebuilt, merged, from the run's own files
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["acc"] == pytest.approx(summary["test_acc"])
