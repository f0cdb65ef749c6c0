"""Shared test settings: one thread per worker (the suite runs under xdist on 2 cores), fixed hypothesis profile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from tiny_runs import cli_train

from attnlab.cli import main

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

settings.register_profile(
    "attnlab", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("attnlab")


@pytest.fixture(scope="session")
def cli_reference(tmp_path_factory) -> Path:
    """`cli_train` (4 epochs) run once to the end, uninterrupted: what every kill-and-resume test must reproduce bit for
    bit. Read it, never write into it."""
    out = tmp_path_factory.mktemp("cli-reference") / "run"
    assert main([*cli_train(out)[3:], "--no-progress"]) == 0  # in this process: a fresh one costs seconds of imports
    return out
