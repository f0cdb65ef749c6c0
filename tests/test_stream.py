"""The streaming imagefolder path (`attnlab.data.stream`) on folders and tar files the tests write: the same batches
as in memory, the choice by memory budget, bit-identical resume inside an epoch with two workers, bad files and
failed workers as one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_runs import after_each_checkpoint, interrupt_at, same_weights, subprocess_env

from attnlab import AttnlabError
from attnlab.analysis.runner import run_analysis
from attnlab.data import batches, load_dataset
from attnlab.train import TrainConfig, train
from attnlab.train.checkpoint import latest_checkpoint
from attnlab.train.load import evaluate_trained

MODES = ("RGB", "L", "P", "RGBA")


def make_folder(root: Path, per_class: int = 12, test_per_class: int = 3, seed: int = 0) -> Path:
    """``root/train`` and ``root/test`` of three classes, PNG and JPEG files of several sizes and PIL modes."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c, name in enumerate(("ant", "bee", "cat")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (18 + i % 4, 16 + i % 3, 3), dtype=np.uint8) + 60 * c
                image = Image.fromarray(pixels).convert(MODES[i % len(MODES)])
                image.save(root / split / name / f"{i:02d}.{'jpg' if i % 5 == 4 and image.mode != 'P' else 'png'}")
    return root


def tar_folder(source: Path, target: Path, shards: int = 1) -> Path:
    """``target/train.tar`` and ``target/test.tar`` holding ``source``'s split folders, members CLASS/NAME; with
    ``shards`` > 1, ``target/train/`` holds that many tars, the files dealt out in turn."""
    target.mkdir(parents=True)
    for split in ("train", "test"):
        paths = sorted((source / split).rglob("*.*"), reverse=True)  # an order timm re-sorts
        places = (
            [target / f"{split}.tar"]
            if shards == 1 or split == "test"
            else [target / split / f"shard-{k}.tar" for k in range(shards)]
        )
        places[0].parent.mkdir(exist_ok=True)
        for k, place in enumerate(places):
            with tarfile.open(place, "w") as tar:
                for path in paths[k :: len(places)]:
                    tar.add(path, arcname=str(path.relative_to(source / split)))
    return target


def all_batches(bundle, split: str, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(batches(getattr(bundle, split), bundle, 8, **kwargs))


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(p, q) for (x, p), (y, q) in zip(a, b))


def tiny_run(out: Path, folder: Path, options: dict, **settings) -> TrainConfig:
    """resnet20 on the folder at 16 px, 2 epochs, batch 8."""
    values = dict(epochs=2, batch_size=8, val_size=6, out=str(out), lr=0.05, channels_last=False)
    dataset_options = {"image_size": 16, **options}
    return TrainConfig(
        model="resnet20", dataset=f"imagefolder:{folder}", dataset_options=dataset_options, **{**values, **settings}
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images"))


def test_streamed_splits_give_the_in_memory_batches_from_folders_and_tar_files(folder, tmp_path):
    memory = load_dataset(f"imagefolder:{folder}", val_size=6, image_size=16, stream=False)
    streamed = load_dataset(f"imagefolder:{folder}", val_size=6, image_size=16, stream=True, workers=2)
    tarred = load_dataset(f"imagefolder:{tar_folder(folder, tmp_path / 'tars')}", val_size=6, image_size=16)
    assert not memory.streamed and streamed.streamed and tarred.streamed is False  # a small tar fits the budget
    tar_streamed = load_dataset(f"imagefolder:{tmp_path / 'tars'}", val_size=6, image_size=16, stream=True)
    shards = tar_folder(folder, tmp_path / "shards", shards=3)
    sharded = load_dataset(f"imagefolder:{shards}", val_size=6, image_size=16, stream=True)
    assert sharded.train.files.name(0) == f"{shards / 'train' / 'shard-2.tar'}:ant/00.png"
    for bundle in (streamed, tarred, tar_streamed, sharded):
        assert (bundle.mean, bundle.std, bundle.classes) == (memory.mean, memory.std, memory.classes)
        assert bundle.in_chans == 3 and bundle.image_size == (16, 16)
        for split in ("train", "val", "test"):
            assert torch.equal(getattr(bundle, split).labels, getattr(memory, split).labels), split
            for kwargs in ({"train": False}, {"train": True, "epoch": 1, "seed": 3, "rank": 1, "world_size": 2}):
                assert same(all_batches(bundle, split, **kwargs), all_batches(memory, split, **kwargs)), kwargs
    state = torch.get_rng_state()
    all_batches(streamed, "train", train=True)
    assert torch.equal(torch.get_rng_state(), state)  # the training process's generator is left alone
    assert same(  # a resumed epoch: the rest of the same batches
        all_batches(streamed, "train", train=True, epoch=2, start=2),
        all_batches(memory, "train", train=True, epoch=2)[2:],
    )
    assert torch.equal(streamed.test.take(torch.tensor([4, 1])).materialize().images, memory.test.images[[4, 1]])
    few = load_dataset(f"imagefolder:{folder}", val_size=6, image_size=16, stream=True, stats_images=5)
    assert few.mean != memory.mean and "normalisation statistics from 5 of the 30 training images" in few.notes[-1]


def test_the_path_is_chosen_by_the_memory_budget_and_streaming_only_options(folder):
    decoded = 45 * 3 * 16 * 16  # bytes
    small = load_dataset(f"imagefolder:{folder}", image_size=16, memory_budget=decoded / 2**30)
    assert not small.streamed
    big = load_dataset(f"imagefolder:{folder}", image_size=16, memory_budget=(decoded - 1) / 2**30)
    assert big.streamed and "GiB decoded > memory_budget" in big.notes[-1]
    assert load_dataset(f"imagefolder:{folder}", image_size=16, auto_augment="rand-m9-mstd0.5").streamed
    with pytest.raises(AttnlabError, match=r"^imagefolder option mixup needs the streaming path; drop stream=false$"):
        load_dataset(f"imagefolder:{folder}", image_size=16, stream=False, mixup=0.2)
    with pytest.raises(AttnlabError, match="workers"):
        load_dataset(f"imagefolder:{folder}", workers=-1)


def test_a_streamed_run_stopped_inside_an_epoch_resumes_bit_identical_with_two_workers(folder, tmp_path, monkeypatch):
    """With timm's train transforms, RandAugment and Mixup drawn in the workers: the same batches after a resume."""
    options = {"stream": True, "workers": 2, "timm_train": True, "auto_augment": "rand-m9-mstd0.5", "mixup": 0.4}
    whole = train(tiny_run(tmp_path / "whole", folder, options), log=lambda _: None)
    with after_each_checkpoint(monkeypatch, interrupt_at(0, 2)), pytest.raises(KeyboardInterrupt):
        train(tiny_run(tmp_path / "cut", folder, options, checkpoint_every=2), log=lambda _: None)
    resumed = train(tiny_run(tmp_path / "cut", folder, options, checkpoint_every=2), resume=True, log=lambda _: None)
    assert same_weights(tmp_path / "whole" / "model.safetensors", tmp_path / "cut" / "model.safetensors")
    assert resumed["test_acc"] == whole["test_acc"] and resumed["data_path"] == "stream"
    assert resumed["skipped_images"] == 0
    first = (tmp_path / "cut" / "config.yaml").read_text().splitlines()[0]
    assert first == "# data: streamed from disk by 2 worker process(es), 4 batches ahead each"
    # evaluated afterwards through the same path: the run's own numbers
    again = evaluate_trained(tmp_path / "cut", split="test")
    assert again["acc"] == whole["test_acc"] and again["images"] == 9
    # and analysed: the analysis reads just the test images it takes, through the same path
    options = {"points": 3, "grid": 3, "surface_images": 4, "hessian_images": 4, "hessian_iters": 2, "trace_samples": 1}
    report = run_analysis("landscape", [tmp_path / "cut"], tmp_path / "landscape", images=6, **options)
    assert report["images"] == {"cut": 6}


def test_bad_files_while_streaming_stop_with_one_line_or_are_skipped_and_counted(folder, tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", per_class=8, test_per_class=1)
    bundle = load_dataset(f"imagefolder:{data}", val_size=6, image_size=16, stream=True)
    spoiled = [Path(bundle.train.files.name(int(i))).relative_to(data) for i in bundle.val.indices[:3]]

    def spoils_three_files_after_epoch_1(directory, epoch, step):
        if epoch == 1:  # the folder changes under the running job: a file gone, one truncated, one not an image
            gone, truncated, text = (directory.parents[1] / "data" / name for name in spoiled)
            gone.unlink()
            truncated.write_bytes(truncated.read_bytes()[:40])
            text.write_text("not an image")

    with after_each_checkpoint(monkeypatch, spoils_three_files_after_epoch_1), pytest.raises(AttnlabError) as e:
        train(tiny_run(tmp_path / "run", data, {"stream": True}), log=lambda _: None)
    assert str(e.value) == (
        f"{data / spoiled[0]}: the file is gone (it was there when the run started) "
        "(--data-arg skip_bad=true leaves such files out and counts them)"
    )
    epoch, _, _ = latest_checkpoint(tmp_path / "run" / "checkpoints")  # intact: the run resumes from it
    assert epoch == 1
    for i in (1, 2):
        with pytest.raises(AttnlabError) as e:
            list(batches(bundle.val.take(torch.tensor([i])), bundle, 8, train=False))
        assert "\n" not in str(e.value) and str(e.value).startswith(f"{data / spoiled[i]}: unreadable image (")
    other = make_folder(tmp_path / "again" / "data", per_class=8, test_per_class=1)  # the same files, unspoiled

    def spoils_then_stops_after_the_last_checkpoint(directory, epoch, step):
        spoils_three_files_after_epoch_1(directory, epoch, step)
        interrupt_at(2)(directory, epoch, step)

    # skipped, counted and checkpointed; then resumed where only the test split, which has none, is left to read
    again = tiny_run(tmp_path / "again" / "run", other, {"stream": True, "skip_bad": True})
    with (
        after_each_checkpoint(monkeypatch, spoils_then_stops_after_the_last_checkpoint),
        pytest.raises(KeyboardInterrupt),
    ):
        train(again, log=lambda _: None)
    skipped = train(again, resume=True, log=lambda _: None)
    assert skipped["skipped_images"] == 3
    assert json.loads((tmp_path / "again" / "run" / "summary.json").read_text())["skipped_images"] == 3


def test_a_dead_or_stuck_worker_is_one_line_not_a_hang(folder, monkeypatch):
    import attnlab.data.stream as stream

    opened = stream.open_image

    def dies_in_a_worker(file, mode):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return opened(file, mode)

    def told_to_stop_in_a_worker(file, mode):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGUSR2)  # a scheduler signals the whole job: the trainer answers it
        return opened(file, mode)

    bundle = load_dataset(f"imagefolder:{folder}", val_size=6, image_size=16, stream=True, timeout=0.5)
    expected = all_batches(bundle, "test", train=False)
    monkeypatch.setattr(stream, "open_image", told_to_stop_in_a_worker)
    assert same(all_batches(bundle, "test", train=False), expected)
    monkeypatch.setattr(stream, "open_image", dies_in_a_worker)
    with pytest.raises(AttnlabError, match=r"a data loader worker failed at batch 0 \(DataLoader worker \(pid"):
        all_batches(bundle, "test", train=False)

    slept = []  # each forked worker has its own copy

    def hangs_once_in_a_worker(file, mode):
        if torch.utils.data.get_worker_info() is not None and not slept:
            slept.append(True)
            time.sleep(3)
        return opened(file, mode)

    monkeypatch.setattr(stream, "open_image", hangs_once_in_a_worker)
    started = time.perf_counter()
    with pytest.raises(AttnlabError, match=r"at batch 0 \(DataLoader timed out after 0.5 seconds\)"):
        all_batches(bundle, "test", train=False)
    assert time.perf_counter() - started < 10  # the error at the timeout; then the stuck workers are ended


def test_a_comparison_trains_its_runs_through_the_streaming_path(folder, tmp_path, capsys):
    from attnlab.cli import main

    out = tmp_path / "compare"
    args = ["compare", "--models", "resnet20,se_resnet20", "--seeds", "1", "--dataset", f"imagefolder:{folder}"]
    args += ["--data-arg", "stream=true", "--data-arg", "workers=0", "--data-arg", "image_size=16", "--epochs", "1"]
    args += ["--batch-size", "8", "--val-size", "6", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/*/seed0/summary.json"))]
    assert len(summaries) == 2 and {s["data_path"] for s in summaries} == {"stream"}
    assert (out / "report.md").is_file() and "streaming 45 images from disk" in capsys.readouterr().out


def test_two_processes_under_torchrun_count_the_files_each_one_skipped(tmp_path):
    """Each rank streams its own shard, so each meets its own bad files: the summary counts every rank's."""
    data = make_folder(tmp_path / "data", per_class=8, test_per_class=1)
    for name in ("ant/01.png", "bee/02.png", "cat/03.png", "cat/06.png"):
        (data / "train" / name).write_text("not an image")
    # statistics from 2 images: every rank reading all training images up front would meet every bad file itself
    options = {"stream": True, "skip_bad": True, "workers": 0, "image_size": 16, "stats_images": 2}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "attnlab"]
    train_args = ["train", "--model", "resnet20", "--dataset", f"imagefolder:{data}", "--epochs", "1"]
    settings = ["--batch-size", "4", "--val-size", "4", "--out", str(tmp_path / "run")]
    data_args = [f"--data-arg={k}={json.dumps(v)}" for k, v in options.items()]
    done = subprocess.run(
        launch + train_args + settings + data_args, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["data_path"] == "stream"
    assert summary["skipped_images"] == 4
