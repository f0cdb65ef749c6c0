"""The code that runs only on a GPU, exercised here with torch.cuda's answers faked (this machine has none; a typo in
`device_name` once ended every CUDA run with an AttributeError at its summary). The device tool's GPU checks run the
real thing when a GPU is lent."""

from __future__ import annotations

import torch
from tiny_runs import SYNTH

from attnlab.data import load_dataset
from attnlab.train.engine import data_on_gpu, device_name


def test_device_name_of_a_gpu_is_torchs_name_for_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"Fake GPU {device}")
    assert device_name(torch.device("cuda", 1)) == "Fake GPU cuda:1"


def test_a_small_dataset_moves_to_the_device_and_a_large_one_stays_in_host_memory():
    bundle = load_dataset("synthetic", None, val_size=32, **SYNTH)
    size = bundle.nbytes
    assert size == sum(s.images.nbytes + s.labels.nbytes for s in (bundle.train, bundle.val, bundle.test))
    moved = data_on_gpu(bundle, torch.device("meta"), free_bytes=4 * size)  # "meta": a device that is not the CPU
    assert {s.images.device.type for s in (moved.train, moved.val, moved.test)} == {"meta"}
    assert (moved.num_classes, moved.mean, moved.crop_padding) == (bundle.num_classes, bundle.mean, bundle.crop_padding)
    kept = data_on_gpu(bundle, torch.device("meta"), free_bytes=4 * size - 1)
    assert kept is bundle
