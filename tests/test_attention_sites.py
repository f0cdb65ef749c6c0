"""capture_attention on the attention modules people run: exact gate values against references computed by hand from
each module's weights, site counts on real timm and torchvision networks, the docs' table of them, registration."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import CecaModule, EcaModule, EffectiveSEModule, GatherExcite, GlobalContext, SEModule
from timm.layers.cbam import CbamModule, LightCbamModule
from timm.layers.coord_attn import CoordAttn
from timm.models.hgnet import EseModule as HGNetEseModule
from timm.models.senet import SEModule as LegacySEModule
from torch import nn
from torchvision.ops import SqueezeExcitation

import attnlab
from attnlab import AttnlabError, capture_attention, register_attention
from attnlab._compat import EfficientNetSqueezeExcite as SqueezeExcite
from attnlab.analysis.importance import ablation_importance
from attnlab.analysis.sites import gate_sites, gate_values
from attnlab.models.capture import AttentionWarning

TABLE = Path(__file__).resolve().parents[1] / "docs" / "_generated" / "attention_sites.md"
C = 16


def _conv(x, conv):
    return F.conv2d(x, conv.weight, conv.bias)


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _ln2d(x, ln):
    """timm's LayerNorm2d: layer norm over channels at every position."""
    return F.layer_norm(x.permute(0, 2, 3, 1), ln.normalized_shape, ln.weight, ln.bias, ln.eps).permute(0, 3, 1, 2)


def _eca(x, conv):
    y = x.mean((2, 3)).unsqueeze(1)  # B×1×C
    k = conv.weight.shape[-1]
    return torch.sigmoid(F.conv1d(y, conv.weight, padding=(k - 1) // 2)).view(x.shape[0], -1, 1, 1)


def _ceca(x, module):
    y = x.mean((2, 3)).unsqueeze(1)
    y = F.pad(y, (module.padding, module.padding), mode="circular")
    return torch.sigmoid(F.conv1d(y, module.conv.weight)).view(x.shape[0], -1, 1, 1)


def _cbam_channel(x, m):
    mlp = lambda p: _conv(F.relu(_conv(p, m.fc1)), m.fc2)  # noqa: E731
    return torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))


def _cbam_spatial(x, m):
    pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
    return torch.sigmoid(_bn(F.conv2d(pooled, m.conv.conv.weight, padding=m.conv.conv.padding), m.conv.bn))


def _coord(m, x):
    h, w = x.shape[-2:]
    y = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(-1, -2)], 2)
    y = m.act(_bn(_conv(y, m.conv1), m.bn1))
    y_h, y_w = torch.split(y, [h, w], 2)
    return {"[h]": torch.sigmoid(_conv(y_h, m.conv_h)), "[w]": torch.sigmoid(_conv(y_w.transpose(-1, -2), m.conv_w))}


# module, its input, {record key suffix: gate computed by hand from the module's weights}
CASES = {
    "timm SEModule": (
        lambda: SEModule(C),
        lambda m, x: {"": torch.sigmoid(_conv(F.relu(_conv(x.mean((2, 3), keepdim=True), m.fc1)), m.fc2))},
    ),
    "timm EffectiveSEModule": (
        lambda: EffectiveSEModule(C),
        lambda m, x: {"": F.hardsigmoid(_conv(x.mean((2, 3), keepdim=True), m.fc))},
    ),
    "timm EcaModule": (lambda: EcaModule(C), lambda m, x: {"": _eca(x, m.conv)}),
    "timm CecaModule": (lambda: CecaModule(C), lambda m, x: {"": _ceca(x, m)}),
    "timm CbamModule": (
        lambda: CbamModule(C),
        lambda m, x: {
            ".channel": _cbam_channel(x, m.channel),
            ".spatial": _cbam_spatial(x * _cbam_channel(x, m.channel), m.spatial),
        },
    ),
    "timm LightCbamModule (gate recomputed)": (
        lambda: LightCbamModule(C),
        lambda m, x: {
            ".channel": (
                g := torch.sigmoid(
                    _conv(
                        F.relu(
                            _conv(
                                0.5 * x.mean((2, 3), keepdim=True) + 0.5 * x.amax((2, 3), keepdim=True), m.channel.fc1
                            )
                        ),
                        m.channel.fc2,
                    )
                )
            ),
            ".spatial": torch.sigmoid(
                _bn(
                    F.conv2d(
                        0.5 * (x * g).mean(1, keepdim=True) + 0.5 * (x * g).amax(1, keepdim=True),
                        m.spatial.conv.conv.weight,
                        padding=3,
                    ),
                    m.spatial.conv.bn,
                )
            ),
        },
    ),
    "timm GatherExcite": (  # use_mlp=False: timm 1.0.31 cannot build its MLP (ConvMlp gets act_layer twice)
        lambda: GatherExcite(C, use_mlp=False),
        lambda m, x: {"": torch.sigmoid(x.mean((2, 3), keepdim=True))},
    ),
    "timm GatherExcite, local extent": (
        lambda: GatherExcite(C, extent=2, use_mlp=False),
        lambda m, x: {"": torch.sigmoid(F.interpolate(F.avg_pool2d(x, 3, 2, 1, count_include_pad=False), (6, 5)))},
    ),
    "timm GlobalContext": (
        lambda: GlobalContext(C),
        lambda m, x: {
            "": torch.sigmoid(
                _conv(
                    F.relu(
                        _ln2d(
                            _conv(
                                (
                                    x.flatten(2) @ F.softmax(_conv(x, m.conv_attn).flatten(2), -1).transpose(1, 2)
                                ).unsqueeze(-1),
                                m.mlp_scale.fc1,
                            ),
                            m.mlp_scale.norm,
                        )
                    ),
                    m.mlp_scale.fc2,
                )
            )
        },
    ),
    "timm CoordAttn (gate run twice)": (lambda: CoordAttn(C), _coord),
    "timm EfficientNet/MobileNetV3 SqueezeExcite": (
        lambda: SqueezeExcite(C),
        lambda m, x: {
            "": torch.sigmoid(_conv(F.relu(_conv(x.mean((2, 3), keepdim=True), m.conv_reduce)), m.conv_expand))
        },
    ),
    "timm legacy senet SEModule": (
        lambda: LegacySEModule(C, 4),
        lambda m, x: {"": torch.sigmoid(_conv(F.relu(_conv(x.mean((2, 3), keepdim=True), m.fc1)), m.fc2))},
    ),
    "timm hgnet EseModule": (
        lambda: HGNetEseModule(C),
        lambda m, x: {"": torch.sigmoid(_conv(x.mean((2, 3), keepdim=True), m.conv))},
    ),
    "torchvision SqueezeExcitation": (
        lambda: SqueezeExcitation(C, 4, scale_activation=nn.Hardsigmoid),
        lambda m, x: {"": F.hardsigmoid(_conv(F.relu(_conv(x.mean((2, 3), keepdim=True), m.fc1)), m.fc2))},
    ),
}


def _randomised(module: nn.Module) -> nn.Module:
    """Random weights and batch-norm statistics (the defaults make many gates constant) in eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return module.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_captured_gate_equals_the_gate_computed_by_hand(case):
    build, reference = CASES[case]
    model = nn.Sequential()
    model.add_module("attn", _randomised(build()))
    x = torch.randn(3, C, 6, 5)
    with torch.no_grad():
        plain = model(x)
        with capture_attention(model) as record:
            observed = model(x)
        expected = {f"attn{k}": v for k, v in reference(model.attn, x).items()}
    assert torch.equal(plain, observed)
    assert set(record) == set(expected) == set(record.kinds)
    for key, value in expected.items():
        torch.testing.assert_close(record[key], value, rtol=1e-5, atol=1e-6)
        assert record.sites[key].module is model.attn or record.sites[key].module in model.attn.children()


def test_coord_attention_keys_both_gates_and_the_analyses_read_them_per_channel():
    model = nn.Sequential(_randomised(CoordAttn(C)))
    x = torch.randn(2, C, 6, 5)
    with torch.no_grad(), capture_attention(model) as record:
        model(x)
    assert record.kinds == {"0[h]": "element", "0[w]": "element"}
    assert record["0[h]"].shape == (2, C, 6, 1) and record["0[w]"].shape == (2, C, 1, 5)
    sites = gate_sites(model)
    assert [s.path for s in sites] == ["0[h]", "0[w]"] and all(s.module is model[0] for s in sites)
    torch.testing.assert_close(gate_values(sites[0], record["0[h]"], grid=None), record["0[h]"].mean((2, 3)))


def test_capture_keeps_the_graph_when_asked():
    model = nn.Sequential(_randomised(LightCbamModule(C)).train())
    with capture_attention(model, detach=False) as record:
        model(torch.randn(2, C, 4, 4))
    assert record["0.channel"].requires_grad and record["0.spatial"].requires_grad


def _site_counts(model: nn.Module, size: int = 64) -> tuple[int, Counter, Counter, list[str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AttentionWarning)
        with torch.no_grad(), capture_attention(model.eval()) as record:
            model(torch.randn(1, 3, size, size))
    assert set(record) == set(record.kinds)  # every site was filled by the forward
    kinds = Counter(record.kinds.values())
    mechanisms = Counter(s.mechanism for s in record.sites.values())
    return len(record), kinds, mechanisms, record.unread


FAMILIES = {
    "seresnet18": ("timm", lambda: timm.create_model("seresnet18", num_classes=10)),
    "ecaresnet26t": ("timm", lambda: timm.create_model("ecaresnet26t", num_classes=10)),
    "efficientnet_b0": ("timm", lambda: timm.create_model("efficientnet_b0", num_classes=10)),
    "mobilenetv3_large_100": ("timm", lambda: timm.create_model("mobilenetv3_large_100", num_classes=10)),
    "regnety_002": ("timm", lambda: timm.create_model("regnety_002", num_classes=10)),
    "legacy_seresnet18": ("timm", lambda: timm.create_model("legacy_seresnet18", num_classes=10)),
    "eca_resnext26ts": ("timm (ByobNet)", lambda: timm.create_model("eca_resnext26ts", num_classes=10)),
    "gcresnext26ts": ("timm (ByobNet)", lambda: timm.create_model("gcresnext26ts", num_classes=10)),
    "gc_efficientnetv2_rw_t": ("timm", lambda: timm.create_model("gc_efficientnetv2_rw_t", num_classes=10)),
    "skresnet18": ("timm", lambda: timm.create_model("skresnet18", num_classes=10)),
    "botnet26t_256": ("timm (ByobNet)", lambda: timm.create_model("botnet26t_256", num_classes=10, img_size=64)),
    "mobilenet_v3_small": ("torchvision", lambda: torchvision.models.mobilenet_v3_small(num_classes=10)),
    "efficientnet_b0 ": ("torchvision", lambda: torchvision.models.efficientnet_b0(num_classes=10)),
    "regnet_y_400mf": ("torchvision", lambda: torchvision.models.regnet_y_400mf(num_classes=10)),
    "squeezenet1_0": ("torchvision", lambda: torchvision.models.squeezenet1_0(num_classes=10)),
    "cbam_resnet20": ("attnlab", lambda: attnlab.create_model("cbam_resnet20")),
    "cram_resnet20": ("attnlab", lambda: attnlab.create_model("cram_resnet20")),
    "aw_se_resnet20": ("attnlab", lambda: attnlab.create_model("aw_se_resnet20")),
}


def _table() -> str:
    lines = [
        "| network | from | sites | kinds | mechanisms | unread |",
        "|---|---|---:|---|---|---:|",
    ]
    for name, (source, build) in FAMILIES.items():
        torch.manual_seed(0)
        n, kinds, mechanisms, unread = _site_counts(build(), 32 if source == "attnlab" else 64)
        fmt = lambda c: ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "–"  # noqa: E731
        lines.append(f"| `{name.strip()}` | {source} | {n} | {fmt(kinds)} | {fmt(mechanisms)} | {len(unread)} |")
    return (
        "<!-- generated by tests/test_attention_sites.py (ATTNLAB_REGENERATE=1 rewrites it); do not edit -->\n\n"
        "Attention sites `attnlab.capture_attention` finds in each network (random weights, one forward at 64 px; "
        "attnlab's own at 32 px). *unread*: modules that look like attention but have no readable gate "
        "(listed by name in `record.unread` and in a warning).\n\n" + "\n".join(lines) + "\n"
    )


@pytest.mark.slow
def test_the_docs_table_of_attention_sites_is_what_capture_finds():
    table = _table()
    if os.environ.get("ATTNLAB_REGENERATE"):
        TABLE.parent.mkdir(parents=True, exist_ok=True)
        TABLE.write_text(table, encoding="utf-8")
    assert TABLE.read_text(encoding="utf-8") == table, "regenerate with ATTNLAB_REGENERATE=1"


@pytest.mark.parametrize(
    "name, sites, kinds",
    [
        ("seresnet18", 8, {"channel"}),
        ("mobilenetv3_large_100", 8, {"channel"}),
        ("mobilenet_v3_small", 9, {"channel"}),
        ("cram_resnet20", 9, {"rectangle"}),
    ],
)
def test_site_counts_per_family(name, sites, kinds):
    source, build = FAMILIES[name]
    n, found, _, unread = _site_counts(build(), 32 if source == "attnlab" else 64)
    assert (n, set(found), unread) == (sites, kinds, [])


def test_a_cram_site_says_it_is_cram():
    model = attnlab.create_model("cram_resnet20")
    with torch.no_grad(), capture_attention(model.eval()) as record:
        model(torch.randn(1, 3, 32, 32))
    assert record.sites["layer1.0.se"].mechanism == "CRAM" and record.kinds["layer1.0.se"] == "rectangle"
    assert {s.mechanism for s in gate_sites(model)} == {"CRAM"}


def test_additive_global_context_is_reported_not_skipped():
    model = timm.create_model("gcresnext26ts", num_classes=10).eval()
    with pytest.warns(
        AttentionWarning,
        match=r"8 module\(s\) look like attention but cannot be read: stages.0.0.attn "
        r"\(GlobalContext: context added \(fuse_scale=False\), no multiplicative gate\)",
    ):
        with capture_attention(model) as record:
            pass
    assert len(record.unread) == 8 and not record.kinds


class MyGate(nn.Module):
    """A user's own attention: a learned per-channel gate, σ computed inline (nothing to hook)."""

    def __init__(self, channels: int):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(channels))

    def forward(self, x):
        return x * torch.sigmoid(self.logits).view(1, -1, 1, 1)


class MyHookableGate(MyGate):
    def __init__(self, channels: int):
        super().__init__(channels)
        self.squash = nn.Sigmoid()

    def forward(self, x):
        return x * self.squash(self.logits.view(1, -1, 1, 1).expand(len(x), -1, -1, -1))


def test_a_users_module_is_reported_until_registered_then_read():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), MyGate(4))
    with pytest.warns(AttentionWarning, match=r"cannot be read: 1 \(MyGate: no registered reading\)"):
        with capture_attention(model) as record:
            model(torch.randn(2, 3, 8, 8))
    assert not record and record.unread == ["1 (MyGate: no registered reading)"]
    register_attention(
        MyGate, kind="channel", read=lambda m, inputs, out: torch.sigmoid(m.logits).expand(len(inputs[0]), -1)
    )
    register_attention(MyHookableGate, kind="channel", gate="squash")
    model.append(MyHookableGate(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttentionWarning)
        with capture_attention(model) as record:
            model(torch.randn(2, 3, 8, 8))
    assert record.kinds == {"1": "channel", "2": "channel"} and record.unread == []
    torch.testing.assert_close(record["1"], torch.sigmoid(model[1].logits).view(1, 4, 1, 1).expand(2, -1, -1, -1))
    torch.testing.assert_close(record["2"], torch.sigmoid(model[2].logits).view(1, 4, 1, 1).expand(2, -1, -1, -1))


def test_a_model_without_attention_warns():
    with pytest.warns(AttentionWarning, match="no attention found in ResNet"):
        with capture_attention(timm.create_model("resnet10t", num_classes=2)):
            pass


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "channel"}, r"give exactly one of gate= \(a submodule name\) or read="),
        ({"kind": "chanel", "gate": "g"}, "kind must be one of channel, element, spatial, rectangle, weight"),
        ({"kind": "channel", "gate": "g", "calls": ("a", "a")}, "calls must be distinct names"),
    ],
)
def test_register_attention_refuses_bad_readings(kwargs, message):
    with pytest.raises(AttnlabError, match=message):
        register_attention(MyGate, **kwargs)


@pytest.mark.parametrize(
    "build, path",
    [
        (lambda: timm.create_model("mobilenetv3_small_050", num_classes=5), "blocks.2.1.se"),
        (lambda: torchvision.models.mobilenet_v3_small(num_classes=5), "features.5.block.2"),
    ],
)
def test_ablation_importance_on_a_network_without_merge_modules_equals_zeroing_each_channel(build, path):
    """timm's and torchvision's inverted residuals add their shortcut inline: the ablation repeats the input of the
    enclosing block instead of the shortcut, and must equal the loss rise of zeroing each channel of the SE's output,
    one forward per channel."""
    torch.manual_seed(0)
    model = build()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    with torch.no_grad():  # BN statistics of this batch: a fresh network's activations otherwise vanish with depth
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1.0
        model.train()(torch.randn(16, 3, 32, 32))
    model.eval().double()  # float64: the expanded batch and the per-channel forwards round alike
    x = x.double()
    site = next(s for s in gate_sites(model) if s.path == path)
    found = ablation_importance(model, x, y, site, grid=None)
    base = F.cross_entropy(model(x), y, reduction="none")
    expected = []
    for u in range(24):  # the first channels, one forward each
        handle = site.module.register_forward_hook(lambda m, i, out, u=u: out.index_fill(1, torch.tensor([u]), 0))
        with torch.no_grad():
            expected.append(F.cross_entropy(model(x), y, reduction="none") - base)
        handle.remove()
    torch.testing.assert_close(found[:, :24], torch.stack(expected, 1), rtol=1e-4, atol=1e-5)
    assert found[:, :24].abs().max() > 1e-3  # the channels matter: the comparison is not between zeros


def test_fmm_merges_are_known_and_not_attention_sites():
    model = attnlab.create_model("fmm_resnet20")  # its default merge gates the residual branch by the shortcut
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with capture_attention(model) as record:
            pass
    assert record.unread == [] and not record.kinds
    assert [str(w.message) for w in seen] == [
        "capture_attention: no attention found in CifarResNet "
        "(attnlab.register_attention makes your own attention class readable)"
    ]


def test_unread_attention_is_named_once_at_the_innermost_module():
    _, unread = attnlab.models.gates.attention_sites(timm.create_model("botnet26t_256", num_classes=2))
    assert unread == [
        f"stages.{s}.{b}.self_attn (BottleneckAttn: no registered reading)" for s, b in [(2, 1), (3, 0), (3, 1)]
    ]
