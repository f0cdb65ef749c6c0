"""Tiny training runs shared by the engine and reliability tests: synthetic data, a few hundred images, seconds each."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from attnlab.train import TrainConfig

SYNTH = {"shape": [1, 12, 12], "size": 384, "test_size": 128, "num_classes": 4}


def tiny(out: Path, **overrides) -> TrainConfig:
    """resnet20 on 320 synthetic 12×12 images (5 steps per epoch), 2 epochs unless overridden."""
    values = dict(
        model="resnet20",
        dataset="synthetic",
        dataset_options=SYNTH,
        epochs=2,
        batch_size=64,
        val_size=64,
        out=str(out),
        lr=0.05,
    )
    return TrainConfig(**{**values, **overrides})


def cli_train(out: Path, epochs: int = 4) -> list[str]:
    """The same run as `tiny` as an `attnlab train` command line."""
    return [
        sys.executable,
        "-m",
        "attnlab",
        "train",
        "--model",
        "resnet20",
        "--dataset",
        "synthetic",
        *[f"--data-arg={k}={json.dumps(v)}" for k, v in SYNTH.items()],
        "--epochs",
        str(epochs),
        "--batch-size",
        "64",
        "--val-size",
        "64",
        "--lr",
        "0.05",
        "--out",
        str(out),
    ]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def kill_when(cmd: list[str], marker: Path, timeout: float = 120) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``marker`` exists (e.g. a run's first checkpoint)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "the command ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def resume_here(out: Path) -> int:
    """``attnlab train --out OUT --resume`` in this process (a fresh one costs seconds of imports; `cli_resume` is
    that, for the tests of the command itself): the exit code."""
    from attnlab.cli import main

    return main(["train", "--out", str(out), "--resume", "--no-progress"])


def cli_resume(out: Path):
    """``attnlab train --out OUT --resume`` in a fresh process: the rest of the settings come from the run itself."""
    import subprocess

    cmd = [sys.executable, "-m", "attnlab", "train", "--out", str(out), "--resume"]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True)
