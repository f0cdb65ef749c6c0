"""Any network through the CLI and the run engine: timm names and ``torchvision:NAME`` train, evaluate and are compared
and benchmarked; ``--weights`` (saved here, never downloaded) and ``--pretrained`` start them; ``NAME[attention=X]``
converts them; folder names of ``torchvision:NAME``. Tiny synthetic data at the size the networks are asked to take."""

from __future__ import annotations

import json
import re
import urllib.error
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import EcaModule

from attnlab import AttnlabError, create_model
from attnlab.analysis.runner import _load
from attnlab.cli import main
from attnlab.detection import DetectConfig
from attnlab.detection.backbone import backbone
from attnlab.models.gates import attention_sites
from attnlab.train import TrainConfig
from attnlab.train.classify import build_model, run_data
from attnlab.train.config import first_difference
from attnlab.train.cost import benchmark_models
from attnlab.train.entry import parse_entry

SYNTH = {"shape": [1, 28, 28], "size": 96, "test_size": 32, "num_classes": 4}
SMALL = "mobilenetv3_small_050"


def train_args(model: str, out: Path, *more: str) -> list[str]:
    args = ["train", "--model", model, "--dataset", "synthetic", "--epochs", "1", "--batch-size", "32"]
    args += ["--val-size", "32", "--out", str(out), "--no-progress", "--precision", "fp32"]
    return [*args, *[f"--data-arg={k}={json.dumps(v)}" for k, v in SYNTH.items()], *more]


@pytest.mark.parametrize("model", ["efficientnet_b0", "torchvision:mobilenet_v3_small"])
def test_a_timm_and_a_torchvision_network_train_and_evaluate(model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(model, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == model and 0 <= summary["test_acc"] <= 1
    assert main(["eval", "--checkpoint", str(out)]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["acc"] == pytest.approx(summary["test_acc"])


def test_weights_start_the_run_and_each_notice_is_one_line(tmp_path, capsys):
    torch.manual_seed(1)
    source = create_model(SMALL, num_classes=10, in_chans=1)  # another classifier size than the data's 4 classes
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    cfg = TrainConfig(model=SMALL, dataset="synthetic", dataset_options=SYNTH, weights=str(tmp_path / "w.safetensors"))
    model = build_model(cfg, run_data(cfg))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"attnlab: {tmp_path / 'w.safetensors'}: classifier classifier re-initialised for 4 classes "
        "(the weights' classifier has another size)"
    ]
    loaded, saved = model.state_dict(), source.state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved if not k.startswith("classifier."))
    assert loaded["classifier.weight"].shape == (4, saved["classifier.weight"].shape[1])

    out = tmp_path / "run"
    assert main(train_args(SMALL, out, "--weights", str(tmp_path / "w.safetensors"))) == 0
    assert "re-initialised for 4 classes" in capsys.readouterr().err
    assert (out / "model.safetensors").is_file()


def test_pretrained_offline_is_one_line_naming_weights_and_both_are_refused(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    assert main(train_args(SMALL, tmp_path / "run", "--pretrained")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pretrained weights could not be downloaded" in err[0] and "--weights FILE" in err[0]
    assert not (tmp_path / "run").exists()  # a run that fails before writing leaves no folder
    assert main(train_args(SMALL, tmp_path / "run", "--pretrained", "--weights", "w.pth")) == 2
    assert "pretrained and weights exclude each other" in capsys.readouterr().err
    analyze = ["analyze", "consistency", "--model", SMALL, "--pretrained", "--dataset", "synthetic"]
    analyze += [f"--data-arg={k}={json.dumps(v)}" for k, v in SYNTH.items()]
    assert main([*analyze, "--out", str(tmp_path / "analysis")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pretrained weights could not be downloaded" in err[0] and "--weights FILE" in err[0]


def test_runs_that_predate_weights_and_pretrained_are_resumable_and_reusable():
    wanted = TrainConfig().to_dict()
    saved = {k: v for k, v in wanted.items() if k not in ("weights", "pretrained")}
    assert first_difference(saved, wanted, frozenset(), TrainConfig) is None
    assert first_difference(saved, {**wanted, "pretrained": True}, frozenset(), TrainConfig) == (
        "pretrained",
        False,
        True,
    )


def test_entry_names_and_folder_slugs_of_every_kind_of_network():
    entry = parse_entry("torchvision:mobilenet_v3_small")
    assert (entry.model, entry.slug) == ("torchvision:mobilenet_v3_small", "torchvision-mobilenet_v3_small")
    entry = parse_entry("efficientnet_b0[attention=eca,attention_args.k_size=5,lr=0.05]")
    assert entry.model_kwargs == {"attention": "eca", "attention_args": {"k_size": 5}}
    assert entry.train == {"lr": 0.05}
    assert entry.slug == "efficientnet_b0-attention=eca-attention_args.k_size=5-lr=0.05"
    with pytest.raises(AttnlabError, match="unknown torchvision model 'mobilenet_v3_smal'.*mobilenet_v3_small"):
        parse_entry("torchvision:mobilenet_v3_smal")
    with pytest.raises(AttnlabError, match="unknown model 'efficientnet_b9'"):
        parse_entry("efficientnet_b9[attention=eca]")


def test_attention_option_converts_the_network_after_its_weights(tmp_path):
    torch.manual_seed(0)
    original = create_model(SMALL, num_classes=4, in_chans=1)
    save_file(original.state_dict(), tmp_path / "w.safetensors")
    converted = create_model(
        SMALL, num_classes=4, in_chans=1, weights=tmp_path / "w.safetensors", attention="eca", image_size=28
    )
    gates = [p for p, m in original.named_modules() if type(m).__name__ == "SqueezeExcite"]
    assert gates and all(isinstance(converted.get_submodule(p), EcaModule) for p in gates)
    kept = {k: v for k, v in converted.state_dict().items() if ".se." not in k}
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in kept.items())
    with pytest.raises(AttnlabError, match="attention_args needs attention=NAME"):
        create_model(SMALL, attention_args={"k_size": 3})


def test_compare_a_network_with_its_converted_self(tmp_path, capsys):
    out = tmp_path / "cmp"
    models = f"{SMALL},{SMALL}[attention=eca]"
    args = ["compare", "--models", models, "--seeds", "1", "--dataset", "synthetic", "--epochs", "1"]
    args += ["--batch-size", "32", "--val-size", "32", "--out", str(out), "--no-progress", "--analyses", "none"]
    args += [f"--data-arg={k}={json.dumps(v)}" for k, v in SYNTH.items()]
    assert main(args) == 0
    runs = sorted(p.parent.parent.name for p in out.glob("runs/*/*/seed0/summary.json"))
    assert runs == [SMALL, f"{SMALL}-attention=eca"]
    converted = load_file(out / "runs" / "synthetic" / f"{SMALL}-attention=eca" / "seed0" / "model.safetensors")
    assert any(".se.conv." in k for k in converted)  # ECA's 1-D convolution where the SE's two were


def test_bench_measures_a_converted_network_beside_its_original(tmp_path, capsys):
    rows = benchmark_models([SMALL, f"{SMALL}[attention=eca]"], input_size=(1, 32, 32), batch_size=4, repeats=1)
    assert [r["model"] for r in rows] == [SMALL, f"{SMALL}[attention=eca]"]
    assert rows[1]["params"] < rows[0]["params"]  # ECA's k weights per site against SE's two linear maps
    args = ["bench", "--models", f"{SMALL}[attention=eca],torchvision:mobilenet_v3_small", "--input-size", "1,32,32"]
    assert main([*args, "--batch-size", "4", "--repeats", "1", "--csv", str(tmp_path / "b.csv")]) == 0
    assert f"{SMALL}[attention=eca]" in (tmp_path / "b.csv").read_text()
    assert main(["bench", "--models", f"{SMALL},torchvision:mobilenet_v3_smal"]) == 2
    assert "unknown torchvision model 'mobilenet_v3_smal'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnety_002", "seresnet18"])
def test_timm_networks_are_detection_backbones(name):
    body = backbone(name, in_chans=1, out_channels=8)
    levels = body(torch.zeros(1, 1, 64, 64))
    assert [v.shape[1] for v in levels.values()] == [8] * len(levels)
    assert [64 // v.shape[-1] for k, v in levels.items() if k != "pool"] == [f["reduction"] for f in body.feature_info]


def test_torchvision_networks_are_refused_as_detection_backbones():
    message = "torchvision:resnet18: torchvision's classifiers declare no feature levels for a detection backbone"
    with pytest.raises(AttnlabError, match=message):
        DetectConfig(model="torchvision:resnet18")
    with pytest.raises(AttnlabError, match=message):
        backbone("torchvision:resnet18")


@pytest.mark.parametrize("name", [SMALL, "se_resnet20"])
def test_a_backbone_starts_from_a_weights_file_of_its_classifier(name, tmp_path, capsys):
    torch.manual_seed(2)
    classifier = create_model(name, num_classes=10, in_chans=1)
    save_file(classifier.state_dict(), tmp_path / "w.safetensors")
    body = backbone(name, in_chans=1, out_channels=8, weights_file=tmp_path / "w.safetensors").body
    saved = classifier.state_dict()
    for key, value in body.state_dict().items():
        assert torch.equal(value, saved[key if key in saved else key.replace("_", ".", 1)]), key


def test_analyze_a_network_with_its_weights_and_no_run_folder(tmp_path, capsys):
    torch.manual_seed(0)
    source = create_model(SMALL, num_classes=4, in_chans=1)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    out = tmp_path / "analysis"
    argv = ["analyze", "consistency", "--model", SMALL, "--weights", str(tmp_path / "w.safetensors")]
    argv += ["--dataset", "synthetic", *[f"--data-arg={k}={json.dumps(v)}" for k, v in SYNTH.items()]]
    argv += ["--images", "8", "--methods", "grad_x_act", "--no-null", "--no-random-gate", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "consistency.json").read_text())
    assert report["complete"] and report["models"] == {SMALL: SMALL} and report["datasets"] == {SMALL: "synthetic"}
    assert report["checkpoints"] == {SMALL: f"{SMALL} (weights {tmp_path / 'w.safetensors'})"}
    layers = report["results"][SMALL]["layers"]
    assert [(site["mechanism"], site["kind"]) for site in layers] == [("SqueezeExcite", "channel")] * 9  # its SE gates
    assert "spearman_grad_x_act" in capsys.readouterr().out
    cfg = TrainConfig(model=SMALL, dataset="synthetic", dataset_options=SYNTH, weights=str(tmp_path / "w.safetensors"))
    model, _, _ = _load(cfg, "cpu", {})  # what the analysis ran on: the file's weights, in eval mode
    assert not model.training
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("more", "message"),
    [
        (["--checkpoint", "run"], "give --checkpoint RUN or --model M (with --dataset D), not both"),
        ([], "--model mobilenetv3_small_050 needs --dataset D"),
        (["--dataset", "synthetic", "--weights", "w.pt", "--pretrained"], "not allowed with argument"),
        (["--dataset", "synthetic", "--model", f"{SMALL}[epochs=2]"], "epochs is a training setting"),
    ],
)
def test_analyze_a_network_refuses_mixed_or_missing_sources_in_one_line(more, message, tmp_path, capsys):
    assert main(["analyze", "consistency", "--model", SMALL, *more, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def _merges(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Merge")}


@pytest.mark.parametrize(
    ("entry", "converted"),
    [
        ("torchvision:resnet18[insert=se,insert_args.rd_ratio=0.5]", lambda m: len(attention_sites(m)[0]) == 8),
        ("resnet18[merge=gate]", lambda m: _merges(m) == {"GateMerge"}),
    ],
)
def test_conversion_keys_of_the_entry_grammar_build_train_and_reload(entry, converted, tmp_path, capsys):
    parsed = parse_entry(entry)
    model = create_model(parsed.model, num_classes=4, in_chans=1, image_size=28, **parsed.model_kwargs)
    assert converted(model)
    out = tmp_path / "run"
    assert main(train_args(entry, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert main(["eval", "--checkpoint", str(out)]) == 0  # rebuilt converted from the run's model options
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["acc"] == pytest.approx(summary["test_acc"])


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("resnet18", {"aw_args": {"gate": "linear"}}, "resnet18: aw_args needs aw=3x3|GLOB (what they configure)"),
        ("resnet18", {"aw": True}, "resnet18: aw must be a string"),
        ("torchvision:resnet18", {"insert_args": {}}, "insert_args needs insert=NAME"),
        (
            "resnet20",
            {"aw_args": {}},
            "resnet20: aw_args converts a timm or torchvision network",
        ),
    ],
)
def test_conversion_keys_out_of_place_are_one_line(name, options, message):
    with pytest.raises(AttnlabError, match=re.escape(message)):
        create_model(name, num_classes=4, **options)


def test_attnlab_names_keep_aw_and_merge_as_their_block_options():
    model = create_model("fmm_resnet20", merge="gate", aw=True)
    assert _merges(model) == {"GateMerge"}
    assert any(type(m).__name__ == "AWConv2d" for m in model.modules())
