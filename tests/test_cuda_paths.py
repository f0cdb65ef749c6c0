"""The code that runs only on a GPU, exercised here with torch.cuda's answers faked (this machine has none; a typo in
`device_name` once ended every CUDA run with an AttributeError at its summary). The device tool's GPU checks run the
real thing when a GPU is lent."""

from __future__ import annotations

import math
import subprocess

import pytest
import torch
from tiny_runs import SYNTH, cli_resume, cli_train, kill_when, metrics, subprocess_env, tiny

from attnlab.data import batches, load_dataset
from attnlab.train import train
from attnlab.train.classify import data_on_gpu
from attnlab.train.engine import device_name


def test_device_name_of_a_gpu_is_torchs_name_for_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"Fake GPU {device}")
    assert device_name(torch.device("cuda", 1)) == "Fake GPU cuda:1"


def test_a_small_dataset_moves_to_the_device_and_a_large_one_stays_in_host_memory():
    bundle = load_dataset("synthetic", None, val_size=32, **SYNTH)
    size = bundle.nbytes
    assert size == (SYNTH["size"] + SYNTH["test_size"]) * (12 * 12 + 8)  # uint8 1×12×12 image and int64 label each
    moved = data_on_gpu(bundle, torch.device("meta"), free_bytes=4 * size)  # "meta": a device that is not the CPU
    assert {s.images.device.type for s in (moved.train, moved.val, moved.test)} == {"meta"}
    assert (moved.num_classes, moved.mean, moved.crop_padding) == (bundle.num_classes, bundle.mean, bundle.crop_padding)
    kept = data_on_gpu(bundle, torch.device("meta"), free_bytes=4 * size - 1)
    assert kept is bundle


# ---------------------------------------------------------------------------------- on a GPU (skipped where none is)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (studies/claims_gpu.sh runs these)")


@gpu
def test_batches_from_a_dataset_kept_on_the_gpu_equal_those_copied_over_per_batch():
    bundle = load_dataset("synthetic", None, val_size=32, **SYNTH)
    kept = data_on_gpu(bundle, torch.device("cuda"), free_bytes=torch.cuda.mem_get_info()[0])
    assert kept.train.images.is_cuda
    for (x, y), (x_kept, y_kept) in zip(
        batches(bundle.train, bundle, 16, train=True, epoch=2, seed=3, device="cuda"),
        batches(kept.train, kept, 16, train=True, epoch=2, seed=3, device="cuda"),
        strict=True,
    ):
        assert x_kept.is_cuda and torch.equal(x, x_kept) and torch.equal(y, y_kept)


@gpu
def test_a_gpu_run_learns_what_the_cpu_run_learns_and_names_its_device(tmp_path):
    cpu = train(tiny(tmp_path / "cpu", precision="fp32"), log=_quiet)
    with torch.backends.cudnn.flags(allow_tf32=False):  # fp32 means fp32 on both sides (TF32 off, restored after)
        tf32_matmul = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            gpu_run = train(tiny(tmp_path / "gpu", precision="fp32", device="cuda"), log=_quiet)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32_matmul
    assert gpu_run["device"] == torch.cuda.get_device_name()
    assert gpu_run["val_loss"] == pytest.approx(cpu["val_loss"], rel=1e-3)


@gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_autocast_runs_killed_after_an_epoch_resume_where_they_stopped(tmp_path, precision):
    """bf16 and fp16 autocast (fp16 with its GradScaler, whose state is checkpointed) train finite, and a run killed
    after its first checkpoint resumes with the states it saved (the CUDA RNG's among them) to the uninterrupted
    run's numbers, within cuDNN's non-deterministic kernels."""
    flags = ["--device", "cuda", "--precision", precision]
    whole, split = tmp_path / "whole", tmp_path / "split"
    done = subprocess.run([*cli_train(whole), *flags], env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    kill_when([*cli_train(split), *flags], split / "checkpoints" / "epoch-0001.json")
    resumed = cli_resume(split)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
    ours, theirs = metrics(split), metrics(whole)
    assert [m["epoch"] for m in ours] == [m["epoch"] for m in theirs] == [1, 2, 3, 4]
    assert all(math.isfinite(m["val_loss"]) for m in ours)
    assert ours[-1]["val_loss"] == pytest.approx(theirs[-1]["val_loss"], rel=0.02)


@gpu
def test_compiled_training_on_the_gpu(tmp_path):
    got = train(tiny(tmp_path / "run", precision="bf16", device="cuda", compile=True, epochs=1), log=_quiet)
    assert got["compile"] is True and math.isfinite(got["val_loss"])


def _quiet(_line: str) -> None:
    pass
