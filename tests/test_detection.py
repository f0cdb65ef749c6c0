"""Detection: backbones over every prefix, detectors, the generated and COCO-format data, the engine and its CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_runs import after_each_checkpoint, interrupt_at
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.misc import FrozenBatchNorm2d

import attnlab
import attnlab.detection.task as task_module
from attnlab.cli import main
from attnlab.data.detection import choose_places, detection_batches, load_detection_dataset
from attnlab.detection import DetectConfig, create_detector, train_detector
from attnlab.detection.backbone import backbone
from attnlab.errors import AttnlabError
from attnlab.models import VARIANTS
from attnlab.train.checkpoint import save_tensors_atomic
from attnlab.train.cost import count_flops

IDX_STEMS = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
CIFAR_AND_IMAGENET = [f"{v}_{arch}" if v else arch for arch in ("resnet20", "resnet18") for v in VARIANTS]
TINY_DATA = {"canvas": 32, "objects": [1, 2], "scale": [0.5, 0.75], "size": 40, "test_size": 12, "patch": 4}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ATTNLAB_DATA", raising=False)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def garments(tmp_path) -> Path:
    """A Fashion-MNIST-shaped IDX folder of solid rectangles whose grey level encodes the class: 25·(label+1)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for stem_images, stem_labels, n in ((IDX_STEMS[0], IDX_STEMS[1], 120), (IDX_STEMS[2], IDX_STEMS[3], 40)):
        labels = rng.integers(0, 10, n)
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            y0, x0 = rng.integers(0, 8, 2)
            y1, x1 = rng.integers(20, 29, 2)
            images[i, y0:y1, x0:x1] = 25 * (label + 1)
        write_idx(folder / stem_images, images)
        write_idx(folder / stem_labels, labels)
    return folder


def one_line(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ------------------------------------------------------------------------------------------------------------ backbone


@pytest.mark.parametrize("name", [n for n in CIFAR_AND_IMAGENET if n != "resnet18"])  # resnet18 is timm's own
def test_backbone_levels_match_feature_info_for_every_prefix(name):
    fpn = backbone(name, in_chans=1, out_channels=8)
    assert isinstance(fpn, BackboneWithFPN)
    x = torch.randn(2, 1, 64, 64)
    levels = fpn.body(x)
    assert list(levels) == [str(i) for i in range(len(fpn.feature_info))]
    expected_strides = [1, 2, 4] if name.endswith("resnet20") else [4, 8, 16, 32]
    assert [info["reduction"] for info in fpn.feature_info] == expected_strides
    for feature, info in zip(levels.values(), fpn.feature_info):
        assert feature.shape == (2, info["num_chs"], 64 // info["reduction"], 64 // info["reduction"])
    pyramid = fpn(x)
    assert list(pyramid) == [*levels, "pool"] and all(v.shape[1] == 8 for v in pyramid.values())


def test_out_indices_pick_levels_and_bad_ones_are_refused():
    fpn = backbone("resnet18c", in_chans=1, out_channels=8, out_indices=(2, 4))
    assert [(i["num_chs"], i["reduction"]) for i in fpn.feature_info] == [(128, 2), (512, 8)]
    for bad in [(3, 2), (0, 5), ()]:
        with pytest.raises(AttnlabError) as e:
            backbone("resnet20", out_indices=bad)
        one_line(e, "out_indices")


def test_trainable_layers_and_frozen_bn_follow_torchvision():
    # [stem, layer1, layer2, layer3]: 2 trainable = layer2 and layer3
    fpn = backbone("se_resnet20", in_chans=1, out_channels=8, trainable_layers=2, frozen_bn=True)
    trainable = {n.split(".")[0] for n, p in fpn.body.named_parameters() if p.requires_grad}
    frozen = {n.split(".")[0] for n, p in fpn.body.named_parameters() if not p.requires_grad}
    assert trainable == {"layer2", "layer3"} and frozen == {"conv1", "layer1"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fpn.body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in fpn.body.modules())
    fpn.train()  # frozen statistics: an image's features do not depend on the rest of its batch
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(fpn.body(x[:1])["2"], fpn.body(x)["2"][:1])
    assert all(p.requires_grad for p in backbone("resnet20", trainable_layers=4).body.parameters())
    assert not any(p.requires_grad for p in backbone("resnet20", trainable_layers=0).body.parameters())
    with pytest.raises(AttnlabError) as e:
        backbone("resnet20", trainable_layers=5)
    one_line(e, "trainable_layers must be in [0, 4]")


def test_backbone_starts_from_a_trained_classifier(tmp_path):
    classifier = attnlab.create_model("se_resnet20", num_classes=10, in_chans=1)
    path = tmp_path / "model.safetensors"
    save_tensors_atomic(path, classifier.state_dict(), {"attnlab_model": "se_resnet20"})
    fpn = backbone("se_resnet20", in_chans=1, weights=path)
    assert torch.equal(fpn.body.layer3[2].conv2.weight, classifier.layer3[2].conv2.weight)
    with pytest.raises(AttnlabError) as e:
        backbone("resnet20", in_chans=1, weights=path)
    one_line(e, "holds a se_resnet20 model, not resnet20")


# ----------------------------------------------------------------------------------------------------------- detectors


def _targets(n: int) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[4.0, 6.0, 20.0, 24.0]]), "labels": torch.tensor([1 + i % 3])} for i in range(n)]


@pytest.mark.parametrize("name", ["aw_se_resnet20", "cram_resnet20"])
def test_faster_rcnn_trains_and_capture_attention_sees_inside_it(name):
    torch.manual_seed(0)
    model = create_detector(name, 3, in_chans=1, min_size=32, max_size=32, fpn_channels=8)
    images = [torch.rand(1, 32, 32) for _ in range(2)]
    losses = model(images, _targets(2))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("backbone.body.layer3")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    plain = model(images)
    with attnlab.capture_attention(model) as seen:
        captured = model(images)
    assert seen and all(path.startswith("backbone.body.layer") for path in seen)
    assert len(seen) == len(seen.kinds) and all(seen[p] is not None for p in seen.kinds)
    for a, b in zip(plain, captured):  # capture only reads
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_retinanet_and_bf16_autocast():
    model = create_detector(
        "se_resnet20", 3, detector="retinanet", in_chans=1, min_size=32, max_size=32, fpn_channels=8
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model([torch.rand(1, 32, 32) for _ in range(2)], _targets(2))
    assert set(losses) == {"classification", "bbox_regression"}
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(AttnlabError) as e:
        create_detector("resnet20", 3, detector="yolo")
    one_line(e, "unknown detector 'yolo'")
    with pytest.raises(AttnlabError) as e:
        create_detector("resnet20", 3, detector="retinanet", detector_kwargs={"rpn_magic": 1})
    one_line(e, "unknown RetinaNet option 'rpn_magic'")


# --------------------------------------------------------------------------------------------- detection-fashion-mnist


def test_choose_places_keeps_overlap_below_the_limit():
    g = torch.Generator().manual_seed(0)
    origins = torch.rand(200, 4, 6, 2, generator=g, dtype=torch.float64) * 40
    candidates = torch.cat([origins, origins + 16], dim=-1)
    counts = torch.randint(1, 5, (200,), generator=g)
    squares, placed = choose_places(candidates, counts, 0.2)
    assert placed[:, 0].all() and (placed.sum(1) <= counts).all()
    for boxes, used in zip(squares, placed):
        b = boxes[used]
        lt, rb = torch.maximum(b[:, None, :2], b[None, :, :2]), torch.minimum(b[:, None, 2:], b[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        iou = inter / (256 + 256 - inter)
        assert (iou.fill_diagonal_(0) <= 0.2 + 1e-9).all()


def test_canvases_are_deterministic_cached_and_seeded(garments, tmp_path, monkeypatch):
    first = load_detection_dataset("detection-fashion-mnist", garments, **TINY_DATA)
    assert list((tmp_path / "cache").glob("detection-*.safetensors"))
    again = load_detection_dataset("detection-fashion-mnist", garments, **TINY_DATA)  # from the cache
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "other"))
    fresh = load_detection_dataset("detection-fashion-mnist", garments, **TINY_DATA)  # rendered anew
    for split in ("train", "val", "test"):
        a, b, c = (getattr(d, split) for d in (first, again, fresh))
        for field in ("images", "labels", "boxes"):
            assert torch.equal(getattr(a, field), getattr(b, field)) and torch.equal(
                getattr(a, field), getattr(c, field)
            )
    other = load_detection_dataset("detection-fashion-mnist", garments, **{**TINY_DATA, "data_seed": 1})
    assert not torch.equal(first.train.images, other.train.images)
    assert (len(first.train), len(first.val), len(first.test)) == (36, 4, 12)  # 10% of 40 carved for validation
    subset = load_detection_dataset("detection-fashion-mnist", garments, subset=10, seed=3, **TINY_DATA)
    assert torch.equal(subset.val.images, first.val.images) and len(subset.train) == 10


def test_boxes_are_tight_cover_every_garment_and_carry_its_class(garments):
    data = load_detection_dataset(
        "detection-fashion-mnist", garments, **{**TINY_DATA, "clutter": 0, "objects": [1, 3], "canvas": 48}
    )
    counts = (data.train.labels >= 0).sum(1)
    assert counts.min() >= 1 and counts.max() <= 3 and len(set(counts.tolist())) > 1
    for i in range(len(data.train)):
        image, target = data.train[i]
        ink = image[0] > 0
        covered = torch.zeros_like(ink)
        for (x0, y0, x1, y1), label in zip(target["boxes"].int().tolist(), target["labels"].tolist()):
            assert x1 > x0 and y1 > y0
            region = ink[y0:y1, x0:x1]
            assert region[:, 0].any() and region[:, -1].any() and region[0].any() and region[-1].any()  # tight
            assert image[0, y0:y1, x0:x1].max() >= 25 * (label + 1)  # the garment's grey level is inside
            covered[y0:y1, x0:x1] = True
        assert not (ink & ~covered).any()  # no garment pixel outside every box
        if len(target["labels"]) == 1:  # alone, the garment's flat interior shows its class exactly
            assert image.max() == 25 * (target["labels"][0] + 1)


def test_batches_shard_and_flip_boxes_with_images(garments):
    data = load_detection_dataset("detection-fashion-mnist", garments, **{**TINY_DATA, "clutter": 0})
    seen = []
    for rank in range(2):
        for images, targets in detection_batches(data.train, 5, train=True, epoch=1, seed=2, rank=rank, world_size=2):
            for image, target in zip(images, targets):
                ink = image[0] > 0
                for x0, y0, x1, y1 in target["boxes"].int().tolist():  # flipped boxes still frame their ink
                    region = ink[y0:y1, x0:x1]
                    assert region[:, 0].any() and region[:, -1].any()
                seen.append(image)
    assert len(seen) == len(data.train)  # 36 images, 18 per rank
    flipped = sum(not any(torch.equal(s * 255, data.train.images[i].float()) for i in range(36)) for s in seen)
    assert 0 < flipped < len(seen)
    again = next(detection_batches(data.train, 5, train=True, epoch=1, seed=2, rank=0, world_size=2))
    first = next(detection_batches(data.train, 5, train=True, epoch=1, seed=2, rank=0, world_size=2))
    assert all(torch.equal(a, b) for a, b in zip(again[0], first[0]))


def test_bad_dataset_options_are_one_line(garments):
    for options, fragment in [
        ({"objects": [0, 2]}, "objects must be [min, max]"),
        ({"max_overlap": 2}, "max_overlap"),
        ({"canvas": 20}, "cannot hold"),
        ({"colour": 1}, "has no option 'colour'"),
    ]:
        with pytest.raises(AttnlabError) as e:
            load_detection_dataset("detection-fashion-mnist", garments, **{**TINY_DATA, **options})
        one_line(e, fragment)
    with pytest.raises(AttnlabError) as e:
        load_detection_dataset("detection-fashion-mnst")
    one_line(e, "detection-fashion-mnist")


# -------------------------------------------------------------------------------------------------------------- coco


def write_coco(root: Path, splits=("train", "test"), n: int = 6, images_dir: bool = True) -> dict:
    """A COCO-format folder of RGB images with one rectangle each: category 3 wide and bright (20×12 px, level 200),
    category 7 tall and dimmer (10×20, level 90); boxes in [x, y, w, h]; plus a degenerate box per image."""
    rng = np.random.default_rng(1)
    folder = root / "images" if images_dir else root
    folder.mkdir(parents=True, exist_ok=True)
    sets = {}
    for split in splits:
        images, annotations = [], []
        (folder / split).mkdir(exist_ok=True)
        for i in range(n):
            category, (w, h), level = (7, (10, 20), 90) if i % 2 else (3, (20, 12), 200)
            pixels = np.zeros((40, 48, 3), dtype=np.uint8)
            x, y = int(rng.integers(0, 48 - w)), int(rng.integers(0, 40 - h))
            pixels[y : y + h, x : x + w] = level
            name = f"{split}/{i}.png"
            Image.fromarray(pixels).save(folder / name)
            images.append({"id": 100 + i, "file_name": name, "height": 40, "width": 48})
            box = {"image_id": 100 + i, "category_id": category, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            degenerate = {"image_id": 100 + i, "category_id": 3, "bbox": [0, 0, 0, 5], "area": 0, "iscrowd": 0}
            annotations += [{"id": 2 * i + 1, **box}, {"id": 2 * i + 2, **degenerate}]
        categories = [{"id": 3, "name": "wide"}, {"id": 7, "name": "tall"}]
        sets[split] = {"images": images, "annotations": annotations, "categories": categories}
        (root / f"{split}.json").write_text(json.dumps(sets[split]))
    return sets


def test_coco_folder_loads_through_cocodetection(tmp_path):
    sets = write_coco(tmp_path)
    data = load_detection_dataset(f"coco:{tmp_path}", val_size=2)
    assert data.classes == ["wide", "tall"] and data.in_chans == 3 and data.image_size is None
    assert (len(data.train), len(data.val), len(data.test)) == (4, 2, 6)
    image, target = data.test[1]
    x, y, w, h = sets["test"]["annotations"][2]["bbox"]
    assert image.shape == (3, 40, 48) and image.dtype == torch.uint8
    assert target["boxes"].tolist() == [[x, y, x + w, y + h]] and target["labels"].tolist() == [1]
    assert image[:, y : y + h, x : x + w].min() == 90 and image.sum() == 90 * 3 * w * h


def test_coco_layouts_and_errors(tmp_path):
    write_coco(tmp_path / "carved", splits=("train",), n=10, images_dir=False)
    data = load_detection_dataset(f"coco:{tmp_path / 'carved'}", val_size=2, test_size=3)
    assert (len(data.train), len(data.val), len(data.test)) == (5, 2, 3)
    official = tmp_path / "official"
    sets = write_coco(official / "tmp", splits=("train2017", "val2017"), n=3)
    (official / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        (official / "tmp" / "images" / split).rename(official / split)
        for image in sets[split]["images"]:
            image["file_name"] = image["file_name"].split("/")[1]
        (official / "annotations" / f"instances_{split}.json").write_text(json.dumps(sets[split]))
    assert len(load_detection_dataset(f"coco:{official}", val_size=1).test) == 3
    broken = tmp_path / "broken"
    write_coco(broken)
    (broken / "images" / "test" / "2.png").unlink()
    cases = [(broken, "image test/2.png not found"), (tmp_path / "none", "no such folder"), (tmp_path, "found neither")]
    for path, fragment in cases:
        with pytest.raises(AttnlabError) as e:
            load_detection_dataset(f"coco:{path}")
        one_line(e, fragment)
    (broken / "test.json").write_text("{not json")
    with pytest.raises(AttnlabError) as e:
        load_detection_dataset(f"coco:{broken}")
    one_line(e, "test.json: not a readable COCO annotation file")


def test_coco_training_set_without_annotations_is_refused_before_training(tmp_path, capsys):
    sets = write_coco(tmp_path)
    (tmp_path / "train.json").write_text(json.dumps({**sets["train"], "annotations": []}))
    with pytest.raises(AttnlabError) as e:
        load_detection_dataset(f"coco:{tmp_path}")
    one_line(e, "train.json: the training set has images but no annotations")
    out = tmp_path / "run"
    assert main(["detect", "train", "--dataset", f"coco:{tmp_path}", "--out", str(out), "--epochs", "1"]) == 2
    assert "no annotations" in capsys.readouterr().err and not out.exists()


def test_a_nan_inside_a_coco_box_is_a_notice_naming_the_image(tmp_path):
    sets = write_coco(tmp_path)
    sets["train"]["annotations"][2]["bbox"][1] = float("nan")  # image train/1.png's real box
    sets["train"]["annotations"][4]["bbox"][2] = float("inf")
    (tmp_path / "train.json").write_text(json.dumps(sets["train"]))  # JSON as Python writes it: NaN, Infinity
    with pytest.warns(UserWarning, match=r"annotation 3 on image train/1\.png is not finite .*left out \(and 1 more\)"):
        data = load_detection_dataset(f"coco:{tmp_path}", val_size=0)
    boxes = {i: data.train[i][1]["boxes"] for i in range(len(data.train))}
    assert all(torch.isfinite(b).all() for b in boxes.values())
    assert sorted(len(b) for b in boxes.values()) == [0, 0, 1, 1, 1, 1]  # the two broken boxes are gone, said


# -------------------------------------------------------------------------------------------------------------- engine


def tiny_detect(garments: Path, out: Path, **overrides) -> DetectConfig:
    values = dict(
        model="resnet20",
        data_dir=str(garments),
        out=str(out),
        epochs=2,
        batch_size=8,
        eval_batch_size=8,
        lr=0.01,
        fpn_channels=8,
        out_indices=[2, 3],
        dataset_options=TINY_DATA,
        subset=16,
        val_size=4,
        detector_kwargs={"rpn_post_nms_top_n_train": 50, "box_batch_size_per_image": 32},
    )
    return DetectConfig(**{**values, **overrides})


def test_detect_train_eval_and_exact_resume(garments, tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    argv = [
        "detect",
        "train",
        "--model",
        "resnet20",
        "--data-dir",
        str(garments),
        "--out",
        str(whole),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--eval-batch-size",
        "8",
        "--lr",
        "0.01",
        "--fpn-channels",
        "8",
        "--out-indices",
        "2,3",
        "--subset",
        "16",
        "--val-size",
        "4",
        "--detector-arg",
        "rpn_post_nms_top_n_train=50",
        "--detector-arg",
        "box_batch_size_per_image=32",
        *[f"--data-arg={k}={json.dumps(v)}" for k, v in TINY_DATA.items()],
    ]
    assert main(argv) == 0
    assert tiny_detect(garments, whole).to_dict() == DetectConfig.from_yaml(whole / "config.yaml").to_dict()
    summary = json.loads((whole / "summary.json").read_text())
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and summary["epochs"] == 2
    assert {"val_ap", "val_ap50", "val_ap75", "val_ar100", "train_loss_objectness"} <= set(records[-1])
    assert all(0 <= summary[f"test_{k}"] <= 1 for k in ("ap", "ap50", "ap75", "ar100"))
    cfg = tiny_detect(garments, whole)  # backbone + FPN FLOPs at the canvas (32×32: the transform keeps it)
    detector = task_module.build_detector(cfg, task_module.load_data(cfg))
    assert summary["backbone_flops"] == count_flops(detector.backbone, 1, (32, 32), torch.device("cpu")) > 0
    assert summary["latency_ms"] > 0
    assert summary["precision"] == cfg.precision and "amp" not in summary  # the classifier's key, from one engine
    capsys.readouterr()
    assert main(["detect", "eval", "--checkpoint", str(whole), "--batch-size", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 12 and result["ap"] == summary["test_ap"] and result["ar100"] == summary["test_ar100"]

    # killed right after epoch 1's checkpoint, then resumed: the same weights, bit for bit
    resumed = tmp_path / "resumed"
    with after_each_checkpoint(monkeypatch, interrupt_at(1)), pytest.raises(KeyboardInterrupt):
        train_detector(tiny_detect(garments, resumed), log=lambda _: None)
    assert not (resumed / "model.safetensors").exists() and (resumed / "checkpoints" / "epoch-0001.json").exists()
    train_detector(tiny_detect(garments, resumed), resume=True, log=lambda _: None)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2  # the wall time goes on from the interrupted call's:
    assert records[1]["wall_time"] >= records[0]["wall_time"] + records[1]["epoch_time"]


def test_detect_bad_input_is_one_line_and_exit_2(garments, tmp_path, capsys):
    run = tmp_path / "run"
    train_detector(tiny_detect(garments, run, epochs=1, subset=8), log=lambda _: None)
    capsys.readouterr()
    cases = [
        (["detect", "train", "--model", "resnet21", "--out", str(tmp_path / "a")], "unknown model 'resnet21'"),
        (
            ["detect", "train", "--dataset", "coco:" + str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")],
            "no such folder",
        ),
        (["detect", "train", "--out-indices", "2,x"], "expected comma-separated integers"),
        (["detect", "train", "--data-dir", str(garments), "--out", str(run)], "holds an earlier run"),
        (["detect", "train", "--out", str(run), "--resume", "--lr", "0.5"], "lr=0.01 but this command asks for 0.5"),
        (["detect", "train", "--detector", "ssd"], "invalid choice"),
        (["detect", "eval", "--checkpoint", str(tmp_path / "missing")], "no such run folder"),
        (["detect", "eval", "--checkpoint", str(run), "--dataset", "coco:" + str(tmp_path)], "found neither"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, (argv, err)
    classifier = tmp_path / "classifier.safetensors"
    save_tensors_atomic(classifier, {"w": torch.zeros(1)}, {"attnlab_model": "resnet20"})
    assert main(["detect", "eval", "--checkpoint", str(classifier)]) == 2
    assert "not an attnlab detector" in capsys.readouterr().err


def test_detect_summary_says_precision_and_fp16_needs_cuda(garments, tmp_path):
    cfg = tiny_detect(garments, tmp_path / "run").to_dict()
    with pytest.raises(AttnlabError, match="precision fp16 needs CUDA"):
        DetectConfig.from_dict({**cfg, "precision": "fp16"})
    with pytest.raises(AttnlabError, match="unknown setting 'amp'"):
        DetectConfig.from_dict({**cfg, "amp": "bf16"})


def test_a_cram_backbones_hooks_run_in_detection(garments, tmp_path, monkeypatch):
    """The one engine calls the mechanisms' hooks for a detector too: CRAM's β anneals over the run and, when
    configured, the equivariance term (computed on the batch the backbone saw) joins the loss and moves the weights."""
    import attnlab.layers.cram_equivariance as cram

    progress, penalties = [], []
    anneal, penalty = cram.anneal_beta, cram.equivariance_penalty
    monkeypatch.setattr(cram, "anneal_beta", lambda model, p: (progress.append(p), anneal(model, p))[1])

    def counted(model, x, *args, **kwargs):
        value = penalty(model, x, *args, **kwargs)
        penalties.append((tuple(x.shape), float(value.detach())))
        return value

    monkeypatch.setattr(cram, "equivariance_penalty", counted)
    runs = {}
    for name, mechanisms in (("plain", {}), ("equi", {"cram": {"equivariance": 0.5}})):
        cfg = tiny_detect(garments, tmp_path / name, model="cram_resnet20", epochs=1, mechanisms=mechanisms)
        train_detector(cfg, log=lambda _: None)
        runs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    steps = 2  # 16 training images, batch 8
    assert progress == [0.0, 0.5] * 2  # both runs anneal, step by step
    assert len(penalties) == steps and all(shape[0] == 8 and value >= 0 for shape, value in penalties)
    assert any(not torch.equal(runs["plain"][k], runs["equi"][k]) for k in runs["plain"])
    with pytest.raises(AttnlabError, match="mechanisms.cram.equivariance needs a model with CRAM layers"):
        train_detector(tiny_detect(garments, tmp_path / "plain_backbone", mechanisms={"cram": {"equivariance": 0.1}}))


def test_the_non_finite_policy_applies_to_detection(garments, tmp_path, monkeypatch):
    """A NaN loss stops a detection run with the classifier's message, or (nonfinite: skip) is skipped and counted."""
    build = task_module.build_detector

    def poisoned(cfg, data):
        model = build(cfg, data)
        model.rpn.register_forward_hook(lambda m, args, out: (out[0], {k: v * float("nan") for k, v in out[1].items()}))
        return model

    monkeypatch.setattr(task_module, "build_detector", poisoned)
    with pytest.raises(AttnlabError, match="non-finite loss at epoch 1; no epoch finished"):
        train_detector(tiny_detect(garments, tmp_path / "stop", epochs=1), log=lambda _: None)
    train_detector(tiny_detect(garments, tmp_path / "skip", epochs=1, nonfinite="skip"), log=lambda _: None)
    (record,) = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert record["skipped_steps"] == 2 and math.isnan(record["train_loss"])


def test_compare_detection_preset_trains_reports_and_decides_on_ap(garments, tmp_path, capsys):
    """`compare --preset aw-detection` trains detectors (the preset's task), reports AP, decides its claims on AP and
    reuses its finished runs; a classification flag that detection does not have is one line."""
    recipe = tmp_path / "tiny.yaml"
    tiny = tiny_detect(garments, tmp_path / "unused", epochs=1).to_dict()
    keep = ("epochs", "batch_size", "eval_batch_size", "lr", "fpn_channels", "subset", "val_size", "detector_kwargs")
    recipe.write_text(json.dumps({k: tiny[k] for k in keep}))
    out = tmp_path / "cmp"
    argv = ["compare", "--preset", "aw-detection", "--config", str(recipe), "--seeds", "1", "--data-dir", str(garments)]
    argv += [f"--data-arg={k}={json.dumps(v)}" for k, v in TINY_DATA.items()]
    assert main([*argv, "--out", str(out)]) == 0
    capsys.readouterr()
    run = out / "runs" / "detection-fashion-mnist" / "aw_se_resnet20" / "seed0"
    config = DetectConfig.from_yaml(run / "config.yaml")
    assert config.model == "aw_se_resnet20" and config.fpn_channels == 8 and config.out_indices == [2, 3]
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:8] == ["dataset", "model", "arch", "seed", "val_ap", "test_ap", "test_ap50", "test_ap75"]
    assert "test_acc" not in header and "flops" not in header and {"backbone_flops", "latency_ms"} <= set(header)
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("dataset,model,baseline,n,test_ap_mean,test_ap_std") and len(summary) == 5
    report = (out / "report.md").read_text()
    assert "adds detection AP as a backbone, also on top of activation attention (se_resnet20)" in report
    assert "aw_se_resnet20 beats se_resnet20 on detection-fashion-mnist" in report and "test AP ×100" in report
    assert "| backbone MFLOPs | latency ms |" in report  # runs committed before these were recorded leave them out
    assert (out / "figures" / "curves_detection-fashion-mnist.png").is_file()

    assert main([*argv, "--out", str(out), "--resume"]) == 0  # every run finished with the same settings
    assert "4 of 4 runs already finished" in capsys.readouterr().out
    before = (out / "report.md").read_text()
    assert main(["report", str(out)]) == 0 and (out / "report.md").read_text() == before
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "b"), "--label-smoothing", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "label_smoothing" in err
    assert main([*argv, "--out", str(tmp_path / "c"), "--task", "classify"]) == 2
    assert "trains task detect; drop --task classify" in capsys.readouterr().err


def test_detect_train_and_eval_on_a_coco_folder(tmp_path, capsys):
    write_coco(tmp_path / "coco", n=12)
    out = tmp_path / "run"
    argv = [
        "detect",
        "train",
        "--dataset",
        f"coco:{tmp_path / 'coco'}",
        "--out",
        str(out),
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "0.02",
        "--fpn-channels",
        "16",
        "--out-indices",
        "2,3",
        "--val-size",
        "2",
        "--min-size",
        "48",
        "--max-size",
        "48",
        "--detector-arg",
        "box_batch_size_per_image=64",
    ]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    capsys.readouterr()
    assert main(["detect", "eval", "--checkpoint", str(out / "model.safetensors"), "--split", "val"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 2 and result["ap"] == records[-1]["val_ap"]


@pytest.mark.slow
def test_detect_under_torchrun_two_processes_matches_metrics_of_its_own_weights(garments, tmp_path, capsys):
    out = tmp_path / "ddp"
    argv = [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "attnlab",
        "detect",
        "train",
        "--data-dir",
        str(garments),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--fpn-channels",
        "8",
        "--out-indices",
        "2,3",
        "--subset",
        "16",
        "--val-size",
        "4",
        "--precision",  # bf16 rounding differs with the batch a kernel sees; the test is about the gather
        "fp32",
        *[f"--data-arg={k}={json.dumps(v)}" for k, v in TINY_DATA.items()],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("epoch 1/1") == 1  # rank 0 alone logs and writes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    # the metric gathered over both ranks' shards is that of one process evaluating the whole test split (up to the
    # order of tied scores, which COCO's matching follows, and kernels that differ with the batch size)
    assert main(["detect", "eval", "--checkpoint", str(out)]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert all(alone[k] == pytest.approx(summary[f"test_{k}"], abs=2e-3) for k in ("ap", "ap50", "ar100"))


def test_detection_resumes_inside_an_epoch_to_bit_identical_weights(garments, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    train_detector(tiny_detect(garments, whole, epochs=1, batch_size=4), log=lambda _: None)
    stopped = tmp_path / "stopped"
    with after_each_checkpoint(monkeypatch, interrupt_at(0, 2)), pytest.raises(KeyboardInterrupt):
        train_detector(tiny_detect(garments, stopped, epochs=1, batch_size=4, checkpoint_every=1), log=lambda _: None)
    assert (stopped / "checkpoints" / "epoch-0000-step-000002.json").exists()
    lines = []
    train_detector(
        tiny_detect(garments, stopped, epochs=1, batch_size=4, checkpoint_every=1), resume=True, log=lines.append
    )
    assert any("at step 2 of epoch 1" in line for line in lines)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(stopped / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
