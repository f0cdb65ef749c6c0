"""create_model builds any timm or torchvision network with attnlab's conventions; load_weights reads the weight files
people have (safetensors, timm's and torchvision's checkpoints), all saved here by the tests (never downloaded)."""

from __future__ import annotations

import argparse
import urllib.error
import warnings

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from timm.models import adapt_input_conv

from attnlab import AttnlabError, create_model
from attnlab.models import check_model_name, load_weights
from attnlab.models.weights import WeightsNotice


def _seeded(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, **kwargs).eval()


def _equal_states(a: torch.nn.Module, b: torch.nn.Module, skip: str = "~") -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if not key.startswith(skip):
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    "name, classifier",
    [("efficientnet_b0", "classifier"), ("regnety_002", "head.fc"), ("torchvision:mobilenet_v3_small", "classifier.3")],
)
def test_timm_and_torchvision_networks_take_num_classes_and_in_chans(name, classifier):
    model = _seeded(name, num_classes=7, in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert model.get_submodule(classifier).out_features == 7
    assert (model.num_classes, model.in_chans) == (7, 1)


def test_torchvision_input_convolution_is_adapted_as_timm_adapts_it():
    rgb = _seeded("torchvision:mobilenet_v3_small", num_classes=5)
    grey = _seeded("torchvision:mobilenet_v3_small", num_classes=5, in_chans=1)
    conv = grey.features[0][0]
    assert conv.in_channels == 1
    torch.testing.assert_close(conv.weight, rgb.features[0][0].weight.sum(1, keepdim=True))
    torch.testing.assert_close(
        _seeded("torchvision:mobilenet_v3_small", num_classes=5, in_chans=5).features[0][0].weight,
        adapt_input_conv(5, rgb.features[0][0].weight),
    )


@pytest.mark.parametrize(
    "name, message",
    [
        ("efficientnet_b9", "unknown model 'efficientnet_b9'; did you mean"),
        (
            "torchvision:mobilenet_v3_smal",
            "unknown torchvision model 'mobilenet_v3_smal'; did you mean mobilenet_v3_small",
        ),
        ("torchvision:fasterrcnn_resnet50_fpn", "unknown torchvision model 'fasterrcnn_resnet50_fpn'"),
        # resnet32 is attnlab's and timm's: suggested once
        ("resnet21", r"unknown model 'resnet21'; did you mean resnet32, resnet26, resnet20\?$"),
    ],
)
def test_unknown_names_are_one_line_with_close_matches(name, message):
    with pytest.raises(AttnlabError, match=message):
        create_model(name)
    with pytest.raises(AttnlabError, match=message):
        check_model_name(name)


def test_every_kind_of_name_is_known():
    for name in ("se_resnet20", "resnet50", "efficientnet_b0", "efficientnet_b0.ra_in1k", "torchvision:resnet18"):
        check_model_name(name)


def test_a_network_that_cannot_take_the_image_size_says_so():
    with pytest.raises(AttnlabError, match=r"^vit_tiny_patch16_224 cannot take 32×32 images: Input height \(32\)"):
        create_model("vit_tiny_patch16_224", image_size=32)
    with pytest.raises(AttnlabError, match="input 4×4 is too small"):
        create_model("resnet20", image_size=4)
    model = create_model("efficientnet_b0", image_size=(32, 48)).train()
    create_model("vit_tiny_patch16_224", image_size=32, img_size=32)  # the builder's own option fixes it
    assert model.training  # the dry forward leaves the mode as it was


def test_pretrained_offline_is_one_line_naming_a_weights_file(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    for name in ("resnet18", "torchvision:resnet18", "se_resnet18"):
        with pytest.raises(
            AttnlabError,
            match=r"pretrained weights could not be downloaded \(.*name resolution.*\); "
            r"offline, pass a weights file instead \(weights=FILE; the CLI's --weights FILE\)",
        ):
            create_model(name, pretrained=True)
    with pytest.raises(AttnlabError, match="resnet20: attnlab's CIFAR networks have no pretrained weights"):
        create_model("resnet20", pretrained=True)


# --- weights files ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet10t", "torchvision:mobilenet_v3_small", "cram_resnet20"])
def test_safetensors_round_trip(name, tmp_path):
    source = _seeded(name, num_classes=6)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    torch.manual_seed(1)
    target = create_model(name, num_classes=6, weights=tmp_path / "w.safetensors").eval()
    _equal_states(source, target)


@pytest.mark.parametrize(
    "layout",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3, "args": argparse.Namespace(lr=0.1)},  # timm's train.py
        lambda sd: {"model": sd, "optimizer": {"state": {}}, "epoch": 3, "args": argparse.Namespace(lr=0.1)},  # tv
        lambda sd: {f"module.{k}": v for k, v in sd.items()},  # saved from DDP
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},  # saved from torch.compile
        lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}},  # a Lightning module's attribute
    ],
    ids=["plain", "timm", "torchvision", "ddp", "compiled", "lightning"],
)
@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_torch_save_layouts_are_unwrapped(layout, suffix, tmp_path):
    source = _seeded("resnet20")
    torch.save(layout(source.state_dict()), tmp_path / f"w{suffix}")
    torch.manual_seed(1)
    target = create_model("resnet20")
    load_weights(target, tmp_path / f"w{suffix}")
    _equal_states(source, target.eval())


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path, capsys):
    torch.save({"weight": torch.zeros(1), "payload": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(AttnlabError, match=r"evil.pth: not a readable state dict \("):
        load_weights(create_model("resnet20"), tmp_path / "evil.pth")
    assert "pickled code ran" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"not weights"), r"w.pth: not a readable state dict"),
        (lambda p: None, r"weights file not found: .*w.pth"),
    ],
)
def test_unreadable_files_are_one_line(make, message, tmp_path):
    make(tmp_path / "w.pth")
    with pytest.raises(AttnlabError, match=message):
        create_model("resnet20", weights=tmp_path / "w.pth")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(AttnlabError, match=r"weights must be a .safetensors, .pth, .pt, .bin, .ckpt file"):
        create_model("resnet20", weights=tmp_path / "w.npz")


def test_a_classifier_of_another_size_is_reinitialised_with_a_notice(tmp_path):
    source = _seeded("torchvision:mobilenet_v3_small", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    torch.manual_seed(1)
    fresh = create_model("torchvision:mobilenet_v3_small", num_classes=7)
    head = fresh.classifier[3].weight.clone()
    with pytest.warns(
        WeightsNotice,
        match=r"w.pth: classifier classifier.3 re-initialised for 7 classes \(the "
        r"weights' classifier has another size\)",
    ):
        report = load_weights(fresh, tmp_path / "w.pth")
    assert report.reinitialised == ["classifier.3.weight", "classifier.3.bias"]
    assert torch.equal(fresh.classifier[3].weight, head)
    _equal_states(source, fresh, skip="classifier.3")


def test_three_channel_weights_into_one_channel_network_adapt_the_input_convolution(tmp_path):
    source = _seeded("resnet10t", num_classes=4)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    with pytest.warns(WeightsNotice, match=r"input convolution conv1.0 adapted from 3 to 1 channels"):
        target = create_model("resnet10t", num_classes=4, in_chans=1, weights=tmp_path / "w.safetensors")
    torch.testing.assert_close(target.conv1[0].weight, source.conv1[0].weight.sum(1, keepdim=True))


def test_missing_and_unexpected_keys_name_the_first_few(tmp_path):
    save_file(_seeded("resnet18").state_dict(), tmp_path / "resnet18.safetensors")
    save_file(_seeded("seresnet18").state_dict(), tmp_path / "seresnet18.safetensors")
    with pytest.raises(
        AttnlabError,
        match=r"32 key\(s\) of the model are missing: layer1.0.se.fc1.weight, "
        r"layer1.0.se.fc1.bias, .* \(and 27 more\)$",
    ):
        create_model("seresnet18", weights=tmp_path / "resnet18.safetensors")
    with pytest.raises(AttnlabError, match=r"32 key\(s\) the model does not have: layer1.0.se.fc1.bias, "):
        create_model("resnet18", weights=tmp_path / "seresnet18.safetensors")
    save_file(_seeded("resnet34").state_dict(), tmp_path / "resnet34.safetensors")
    with pytest.raises(AttnlabError, match=r"96 key\(s\) the model does not have: layer1.2.bn1.bias, "):
        create_model("resnet18", weights=tmp_path / "resnet34.safetensors")


@pytest.mark.parametrize("variant, base", [("aw_se_resnet18", "resnet18"), ("cbam_resnet20", "resnet20")])
def test_an_attnlab_variant_loads_every_tensor_of_its_base_and_lists_its_new_modules(variant, base, tmp_path):
    source = _seeded(base, num_classes=10)
    save_file(source.state_dict(), tmp_path / "base.safetensors")
    model = create_model(variant, num_classes=10)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        report = load_weights(model, tmp_path / "base.safetensors")
    own = model.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(own[key], value), key
    added = {k for k in own.keys() - source.state_dict().keys() if not k.endswith("num_batches_tracked")}
    assert report.loaded == len(source.state_dict()) and set(report.new) == added
    assert any(".se." in k for k in report.new)
    [notice] = [str(w.message) for w in seen if w.category is WeightsNotice]
    assert f"{len(report.new)} tensor(s) of modules the weights lack, left initialised: layer1.0." in notice
