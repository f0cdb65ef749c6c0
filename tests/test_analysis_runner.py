"""`attnlab analyze` end to end on runs trained by the engine: files, headline numbers, seed groups, bad input."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from attnlab.analysis import ANALYSES, analysis_options, run_analysis
from attnlab.analysis.runner import _groups, group_means, headlines
from attnlab.cli import main
from attnlab.data import Source, Split, register_dataset
from attnlab.train import TrainConfig, train

SYNTH = {"shape": [1, 16, 16], "size": 192, "test_size": 32, "num_classes": 4}
BOXES = "analysis-test-boxes"


def _boxes_split(n: int, seed: int) -> Split:
    """Bright rectangles on dim noise; the class says whether the rectangle is wider than tall."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 40, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
    x0, y0 = torch.randint(0, 8, (n,), generator=g), torch.randint(0, 8, (n,), generator=g)
    w, h = torch.randint(3, 9, (n,), generator=g), torch.randint(3, 9, (n,), generator=g)
    for i in range(n):  # building the fixture images
        images[i, 0, y0[i] : y0[i] + h[i], x0[i] : x0[i] + w[i]] = 255
    boxes = torch.stack([x0, y0, x0 + w, y0 + h], 1).float()
    return Split(images, (w > h).long(), boxes)


def load_boxes_dataset() -> Source:
    return Source(_boxes_split(160, 0), _boxes_split(32, 1), ["tall", "wide"], crop_padding=0, hflip=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    register_dataset(BOXES, load_boxes_dataset)
    common = dict(epochs=1, batch_size=64, val_size=32, augment=False)
    for name, model, seed, data in (
        ("se0", "se_resnet20", 0, "synthetic"),
        ("se1", "se_resnet20", 1, "synthetic"),
        ("cbam", "cbam_resnet20", 0, "synthetic"),
        ("cram", "cram_resnet20", 0, BOXES),
    ):
        options = SYNTH if data == "synthetic" else {}
        train(
            TrainConfig(model=model, dataset=data, dataset_options=options, seed=seed, out=str(root / name), **common),
            log=lambda _: None,
        )
    return root


def _run(argv: list[str]) -> int:
    return main(["analyze", *argv])


def test_seeds_trained_under_stop_and_skip_are_one_recipe_and_another_lr_is_not():
    configs = {
        "stop": TrainConfig(model="se_resnet20", seed=0),
        "skip": TrainConfig(model="se_resnet20", seed=1, nonfinite="skip", compile=True),
        "lr": TrainConfig(model="se_resnet20", seed=2, lr=0.05),
    }
    (group,) = _groups(configs).values()
    assert group == {"members": ["stop", "skip"], "seeds": [0, 1]}


def test_consistency_writes_json_plots_and_seed_groups(runs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "consistency",
        "--checkpoint",
        str(runs / "se0"),
        "--checkpoint",
        str(runs / "se1"),
        "--checkpoint",
        str(runs / "cbam"),
        "--out",
        str(out),
        "--images",
        "12",
        "--option",
        "control_images=6",
        "--option",
        "captum_images=4",
        "--option",
        "captum_steps=2",
    ]
    assert _run(argv) == 0
    report = json.loads((out / "consistency.json").read_text())
    assert "headline" not in report  # derived from the results, never stored beside them
    numbers_of = headlines(report)
    assert set(numbers_of) == {"se0", "se1", "cbam"}
    for numbers in numbers_of.values():
        assert {
            "spearman_ablation",
            "spearman_ablation_ci_low",
            "spearman_ablation_ci_high",
            "null_spearman",
            "random_gate_spearman",
        } <= set(numbers)
    (group,) = report["groups"].values()  # the two se_resnet20 seeds, not the cbam run
    assert group["members"] == ["se0", "se1"] and group["seeds"] == [0, 1]
    values = [numbers_of[m]["spearman_ablation"] for m in ("se0", "se1")]
    (means,) = group_means(report).values()
    assert means["spearman_ablation"]["mean"] == pytest.approx(sum(values) / 2)
    assert report["images"] == {"se0": 12, "se1": 12, "cbam": 12}
    assert "consistency_layers.png" in report["plots"] and len(report["plots"]) == 4
    for name in report["plots"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert f"se_resnet20@synthetic, mean over seeds 0, 1: spearman_ablation {sum(values) / 2:.4g}" in printed
    assert "wrote" in printed


def test_smoothness_and_landscape_compare_checkpoints(runs, tmp_path):
    out = tmp_path / "out"
    both = ["--checkpoint", str(runs / "se0"), "--checkpoint", str(runs / "cbam"), "--out", str(out), "--images", "16"]
    assert (
        _run(
            [
                "smoothness",
                *both,
                "--option",
                "pairs=4",
                "--option",
                "steps=5",
                "--option",
                "sigmas=0.1,0.3",
                "--option",
                "jacobian_images=4",
                "--label",
                "SE",
                "--label",
                "CBAM",
            ]
        )
        == 0
    )
    report = json.loads((out / "smoothness.json").read_text())
    assert set(headlines(report)) == {"SE", "CBAM"}
    assert {"tv_same", "tv_diff", "flips_diff", "input_grad_norm", "jacobian_fro", "noise_acc_at_0.3"} <= set(
        headlines(report)["SE"]
    )
    assert report["plots"] == ["smoothness_curves.png"] and (out / "smoothness_curves.png").exists()
    assert (
        _run(
            [
                "landscape",
                *both,
                "--option",
                "points=3",
                "--option",
                "grid=2",
                "--option",
                "hessian_iters=2",
                "--option",
                "trace_samples=2",
            ]
        )
        == 0
    )
    report = json.loads((out / "landscape.json").read_text())
    assert {"hessian_top_eig", "hessian_trace", "sharpness_1d"} <= set(headlines(report)["se0"])
    assert len(report["plots"]) == 5 and all((out / p).exists() for p in report["plots"])


def test_localization_on_a_dataset_with_boxes(runs, tmp_path):
    out = tmp_path / "out"
    report = run_analysis("localization", [runs / "cram"], out, images=8, transforms=["hflip", "shift"])
    numbers = headlines(report)["cram"]
    assert {"iou_rect", "iou_map_rectangle", "cross_layer_iou", "equivariance_error"} <= set(numbers)
    assert 0 <= numbers["iou_rect"] <= 1
    assert set(report["results"]["cram"]["layers"][0]["equivariance_error"]) == {"hflip", "shift"}
    assert report["plots"] == ["localization_iou.png", "localization_cram_overlay.png"]
    assert all((out / p).exists() for p in report["plots"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["consistensy", "--checkpoint", "{se0}"], "unknown analysis 'consistensy'; did you mean consistency?"),
        (["consistency", "--checkpoint", "{missing}"], "no such run folder"),
        (["localization", "--checkpoint", "{se0}"], "has no ground-truth boxes"),
        (["consistency", "--checkpoint", "{se0}", "--option", "gird=4"], "unknown option 'gird'; did you mean grid?"),
        (
            ["smoothness", "--checkpoint", "{se0}", "--option", "draws=many"],
            "draws must be a 64-bit integer",
        ),
        (["consistency", "--checkpoint", "{se0}", "--label", "a", "--label", "b"], "2 labels for 1 checkpoints"),
        (["consistency", "--checkpoint", "{se0}", "--images", "0"], "images must be a positive integer"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(runs, tmp_path, capsys, argv, message):
    argv = [a.format(se0=runs / "se0", missing=runs / "missing") for a in argv]
    assert _run([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_every_analysis_lists_its_options():
    for name in ANALYSES:
        options = analysis_options(name)
        assert options and "seed" not in options
    assert analysis_options("consistency")["grid"] == 8


def test_each_analysis_has_its_own_help_with_options_defaults_and_meanings(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["analyze", "consistency", "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--control-images CONTROL_IMAGES samples the random-gate control runs on (default 128)" in text
    assert "--null, --no-null add the shuffled-importance control (default on)" in text
    assert "--methods A,B,..." in text and "--hessian-iters" not in text  # its own options only
    for name in ANALYSES:
        meanings = ANALYSES[name].option_meanings()
        assert all(meanings.values()), f"{name}: undocumented options {[k for k, v in meanings.items() if not v]}"


def test_option_flags_set_what_option_key_values_set(runs, tmp_path):
    out = tmp_path / "out"
    flags = ["--points", "3", "--grid", "2", "--hessian-iters", "2", "--trace-samples", "0", "--no-ignore-bn-bias"]
    assert _run(["landscape", "--checkpoint", str(runs / "se0"), "--out", str(out), "--images", "8", *flags]) == 0
    options = json.loads((out / "landscape.json").read_text())["options"]
    assert options == {"points": 3, "grid": 2, "hessian_iters": 2, "trace_samples": 0, "ignore_bn_bias": False}
    sigmas = ["--sigmas", "0.1,0.3", "--pairs", "2", "--steps", "3", "--jacobian-images", "2"]
    assert _run(["smoothness", "--checkpoint", str(runs / "se0"), "--out", str(out), "--images", "8", *sigmas]) == 0
    assert json.loads((out / "smoothness.json").read_text())["options"]["sigmas"] == [0.1, 0.3]


def test_an_interrupted_analysis_keeps_its_finished_parts(runs, tmp_path, monkeypatch):
    landscape = sys.modules["attnlab.analysis.landscape"]  # the module (the package's `landscape` is the function)
    real, calls = landscape.hessian_top_eigenvalue, []

    def interrupted_in_the_second_checkpoint(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(landscape, "hessian_top_eigenvalue", interrupted_in_the_second_checkpoint)
    out = tmp_path / "out"
    options = dict(points=3, grid=2, hessian_iters=2, trace_samples=0)
    with pytest.raises(KeyboardInterrupt):
        run_analysis("landscape", [runs / "se0", runs / "cbam"], out, images=8, **options)
    saved = json.loads((out / "landscape.json").read_text())
    assert saved["complete"] is False and saved["plots"] == []
    assert set(saved["results"]) == {"se0"} and "hessian_top_eig" in headlines(saved)["se0"]  # a whole checkpoint
    unfinished = saved["unfinished"]["cbam"]  # and the finished parts of the next
    assert len(unfinished["surface_1d"]["loss"]) == 3 and "surface_2d" in unfinished and "hessian_top" not in unfinished


def test_the_printout_explains_every_headline_metric(runs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["consistency", "--checkpoint", str(runs / "se0"), "--out", str(out), "--images", "8"]
    assert _run([*argv, "--control-images", "4", "--methods", "ablation,grad_x_act"]) == 0
    printed = capsys.readouterr().out
    legend = printed.split("\nwhere\n")[1]
    for metric in headlines(json.loads((out / "consistency.json").read_text()))["se0"]:
        assert f"  {metric} " in legend
    assert "(see the docs)" not in legend
    assert "Spearman ρ between each gate and the grad_x_act importance" in legend


@pytest.mark.parametrize(
    ("name", "metric", "meaning"),
    [
        ("smoothness", "noise_acc_at_0.05", "accuracy under Gaussian input noise of σ = 0.05 data standard deviations"),
        ("landscape", "hessian_top_eig_layer2", "largest Hessian eigenvalue of the parameters of layer2 alone"),
        ("localization", "iou_map_rectangle", "IoU of the thresholded rectangle maps' box with the true box"),
        ("consistency", "spearman_captum_ci_low", "lower end of the 95% Student-t interval of spearman_captum"),
        ("consistency", "spearman_captum", "Spearman ρ between each gate and the captum importance"),
    ],
)
def test_templated_metric_meanings(name, metric, meaning):
    assert ANALYSES[name].meaning(metric).startswith(meaning)


def test_a_model_at_chance_level_is_warned_about(runs, tmp_path, monkeypatch, capsys):
    from attnlab.analysis import runner

    assert runner.chance_margin(10, 1000) == pytest.approx(0.1 + 3 * (0.09 / 1000) ** 0.5)
    monkeypatch.setattr(runner, "_accuracy", lambda model, x, y: 0.25)  # 4 classes: chance
    out = tmp_path / "out"
    argv = ["smoothness", "--checkpoint", str(runs / "se0"), "--out", str(out), "--images", "8", "--pairs", "2"]
    assert _run([*argv, "--steps", "3", "--jacobian-images", "2"]) == 0
    (warning,) = json.loads((out / "smoothness.json").read_text())["warnings"]
    assert warning.startswith("se0 is at chance level on the analysed images (25.0% correct; chance 25.0% for 4")
    assert f"attnlab: WARNING: {warning}" in capsys.readouterr().err


def test_localization_says_how_its_best_layer_was_chosen(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(["localization", "--checkpoint", str(runs / "cram"), "--out", str(out), "--images", "8"]) == 0
    printed = capsys.readouterr().out
    chosen = json.loads((out / "localization.json").read_text())["results"]["cram"]["selected_layer"]
    assert (
        f"best layer: {chosen['path']} ({chosen['index'] + 1} of" in printed
        and "chosen by mean map IoU on 8 held-out validation images, not the scored test images" in printed
    )
