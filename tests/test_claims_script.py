"""``scripts/claims.py`` takes finished runs instead of training them only where that is honest, and ``--status``
counts exactly those: a committed run (no weights; of this preset or, with the very same settings, of another) only when
no analysis of the preset still needs its weights, another preset's run only with its weights and the very same
settings. Run folders are made by hand; nothing trains."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from attnlab.experiment import make_plan
from attnlab.experiment.plan import run_dir

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "claims.py"


@pytest.fixture(scope="module")
def claims():
    spec = importlib.util.spec_from_file_location("claims_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(root: Path, model: str, seed: int, weights: bool, **changes) -> Path:
    """A finished run of preset ``consistency``'s ``cpu`` budget under ``root``, ``changes`` made to its settings."""
    plan = make_plan(preset="consistency", budget="cpu")
    entry = next(e for e in plan.entries if e.name == model)
    folder = run_dir(root, "fashion-mnist", entry, seed)
    cfg = plan.run_config("fashion-mnist", entry, seed, folder)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dataclasses.replace(cfg, **changes).to_yaml())
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "skipped_steps": 0}) + "\n")
    (folder / "summary.json").write_text(json.dumps({"model": model, "seed": seed, "test_acc": 0.9}))
    if weights:
        (folder / "model.safetensors").write_bytes(b"")
        (folder / "checkpoints").mkdir()
    return folder


def test_status_and_prepare_take_the_same_finished_runs(claims, tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    keep, other, other_kept = results / "consistency", runs / "aw", results / "aw"
    fake_run(other, "resnet20", 0, weights=True)  # shared: same settings, weights
    fake_run(other, "resnet20", 1, weights=False)  # no weights: not shared
    fake_run(other, "resnet20", 2, weights=True, lr=0.05)  # other settings: not shared
    fake_run(other, "se_resnet20", 0, weights=True, compile=True)  # differs only in a neutral setting: shared
    fake_run(keep, "cbam_resnet20", 0, weights=False)  # committed, but the consistency analysis needs its weights
    fake_run(keep, "resnet20", 1, weights=False)  # committed and not analysed: restored
    fake_run(other_kept, "resnet20", 2, weights=False)  # committed by another preset, not analysed here: restored
    fake_run(other_kept, "se_resnet20", 1, weights=False)  # committed by another preset, but analysed here
    fake_run(other_kept, "cbam_resnet20", 1, weights=False, lr=0.05)  # other settings: not restored
    others = [(runs / name, results / name) for name in ("aw", "fmm")]

    line = claims.status("consistency", "cpu", runs, keep, others)
    assert line.startswith("consistency: runs 4/12 finished, 0 half-trained, 120 run-epochs left")
    assert line.endswith("analyses 0/3 committed")

    claims.prepare("consistency", "cpu", runs, keep, others)
    out = runs / "consistency" / "runs" / "fashion-mnist"
    taken = sorted(p.parent.relative_to(out).as_posix() for p in out.glob("*/seed*/summary.json"))
    assert taken == ["resnet20/seed0", "resnet20/seed1", "resnet20/seed2", "se_resnet20/seed0"]
    assert not (out / "resnet20/seed0/checkpoints").exists()  # weights travel, checkpoints stay with their run
    assert claims.status("consistency", "cpu", runs, keep, others) == line
